"""Strict decoding of ``specray.v1`` requests at the gRPC edge.

grpc answers a request it cannot deserialize with INTERNAL, which blames the
server for the caller's bytes. And protobuf quietly keeps going past what it
does not understand: an unknown field, a known field sent with the wrong wire
type (both land in the unknown-field set) and a ``uint32`` wider than 32 bits
(cut to its low bits: 2³² + 5 becomes 5). Each of these is a caller's bug that
a silently changed request would hide, so :class:`StrictDecoding` refuses them
all with INVALID_ARGUMENT and a message naming the field and the byte offset.

:func:`check_wire` walks the wire format once before protobuf parses it. It
reads field keys and lengths only: length-delimited payloads are skipped in C
(bytes slicing, UTF-8 decoding, a regular expression over packed ids), so the
walk costs a few microseconds per field, not per token.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from specray.deploy.handler_interceptor import HandlerInterceptor

WIRE_TYPE_NAMES = {
    0: "varint",
    1: "64-bit",
    2: "length-delimited",
    3: "group start",
    4: "group end",
    5: "32-bit",
}
_VARINT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
    }
)
_FIXED32_TYPES = frozenset(
    {FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_FLOAT}
)
_FIXED64_TYPES = frozenset(
    {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE}
)
_LENGTH_TYPES = frozenset(
    {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE}
)
# In a packed run of varints: one that does not end in the payload, and one
# wider than 32 bits (five bytes whose fifth carries more than 4 bits, or more
# than five bytes; four continuation bytes in a row always share one varint).
_UNFINISHED_VARINT = re.compile(rb"[\x80-\xff]\Z")
_WIDER_THAN_32_BITS = re.compile(rb"[\x80-\xff]{4}[\x10-\xff]")


class WireError(ValueError):
    """Bytes a strict reading refuses."""


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that could not be decoded; its handler aborts."""

    reason: str


def _wire_type_of(field: FieldDescriptor) -> int:
    if field.type in _VARINT_TYPES:
        return 0
    if field.type in _FIXED64_TYPES:
        return 1
    if field.type in _FIXED32_TYPES:
        return 5
    return 2


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return f"a {field.message_type.name} message"
    names = {
        value: key.removeprefix("TYPE_").lower()
        for key, value in vars(FieldDescriptor).items()
        if key.startswith("TYPE_")
    }
    kind = names.get(field.type, "value")
    return f"repeated {kind}" if _is_repeated(field) else f"a {kind}"


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


class _Reader:
    """Reads ``data``, which starts at byte ``base`` of the whole request."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.base = base
        self.pos = 0

    @property
    def at(self) -> int:
        return self.base + self.pos

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def varint(self, what: str) -> int:
        start, value, shift = self.at, 0, 0
        while True:
            if self.pos >= len(self.data):
                raise WireError(f"{what} at byte {start} is truncated (the request ends)")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise WireError(f"{what} at byte {start} is a varint longer than 10 bytes")
        if value >= 1 << 64:
            raise WireError(f"{what} at byte {start} is a varint wider than 64 bits")
        return value

    def take(self, size: int, what: str) -> bytes:
        start, remaining = self.pos, len(self.data) - self.pos
        if size > remaining:
            raise WireError(
                f"{what} at byte {self.at} needs {size:,} bytes, but only {remaining:,} "
                "remain (the request is truncated)"
            )
        self.pos += size
        return self.data[start : self.pos]


def check_wire(data: bytes, descriptor: Descriptor, prefix: str = "", base: int = 0) -> None:
    """Raise :class:`WireError` for the first thing in ``data`` (a serialized
    ``descriptor`` message) that a strict reading refuses. ``prefix`` and
    ``base`` place a nested message: its field path and its first byte."""
    reader = _Reader(data, base)
    chosen: dict[str, str] = {}  # oneof -> the member sent (protobuf keeps the last silently)
    while not reader.done:
        start = reader.at
        key = reader.varint(f"a field key of {descriptor.name}")
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        if field is not None:
            name = f"`{prefix}{field.name}` (field {number})"
        else:
            name = f"field {number} of `{prefix[:-1]}`" if prefix else f"field {number}"
        if number == 0:
            raise WireError(f"the field key at byte {start} has field number 0, which is invalid")
        if wire_type not in (0, 1, 2, 5):
            kind = WIRE_TYPE_NAMES.get(wire_type, "invalid")
            raise WireError(
                f"{name} at byte {start} has wire type {wire_type} ({kind}), which proto3 "
                "never uses"
            )
        if field is None:
            raise WireError(
                f"{name} (wire type {WIRE_TYPE_NAMES[wire_type]}) at byte {start} is not a "
                f"field of {descriptor.full_name}; this server speaks specray.v1 as published "
                "and refuses fields it would otherwise ignore"
            )
        expected = _wire_type_of(field)
        packed = _is_repeated(field) and expected != 2 and wire_type == 2
        if wire_type != expected and not packed:
            raise WireError(
                f"{name} at byte {start} was sent as wire type {wire_type} "
                f"({WIRE_TYPE_NAMES[wire_type]}), but it is {_type_name(field)} "
                f"(wire type {expected}, {WIRE_TYPE_NAMES[expected]})"
            )
        oneof = field.containing_oneof
        if oneof is not None and chosen.setdefault(oneof.name, field.name) != field.name:
            raise WireError(
                f"{name} at byte {start}: `{prefix}{chosen[oneof.name]}` is already set, and "
                f"only one of `{oneof.name}` may be"
            )
        if wire_type == 0:
            value = reader.varint(name)
            if field.type == FieldDescriptor.TYPE_UINT32 and value >= 1 << 32:
                raise WireError(
                    f"{name} at byte {start} is a uint32, got {value:,} (wider than 32 bits)"
                )
        elif wire_type in (1, 5):
            reader.take(8 if wire_type == 1 else 4, name)
        else:
            payload = reader.take(reader.varint(f"the length of {name}"), name)
            payload_at = reader.at - len(payload)
            if packed:
                _check_packed(payload, field, name, start)
            elif field.type == FieldDescriptor.TYPE_STRING:
                _check_utf8(payload, name, start)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                check_wire(payload, field.message_type, f"{prefix}{field.name}.", payload_at)


def _check_packed(payload: bytes, field: FieldDescriptor, name: str, start: int) -> None:
    expected = _wire_type_of(field)
    if expected == 0:
        if _UNFINISHED_VARINT.search(payload):
            raise WireError(f"{name} at byte {start} ends inside a varint")
        if field.type == FieldDescriptor.TYPE_UINT32 and _WIDER_THAN_32_BITS.search(payload):
            raise WireError(f"{name} at byte {start} holds a value wider than 32 bits")
    elif len(payload) % (8 if expected == 1 else 4):
        raise WireError(f"{name} at byte {start} is not a whole number of values")


def _check_utf8(payload: bytes, name: str, start: int) -> None:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WireError(
            f"{name} at byte {start} is not valid UTF-8 (byte {error.start} of the string)"
        ) from None


def strict_decoder(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer that never raises: a refused request becomes
    :class:`Undecodable` with the reason."""
    descriptor = message_class.DESCRIPTOR

    def decode(data: bytes) -> Message | Undecodable:
        try:
            check_wire(data, descriptor)
            return message_class.FromString(data)
        except WireError as error:
            return Undecodable(f"malformed {descriptor.full_name}: {error}")
        except DecodeError as error:  # anything the walk above does not know about
            return Undecodable(f"malformed {descriptor.full_name}: {error}")

    return decode


class StrictDecoding(HandlerInterceptor):
    """Decode the unary requests of ``services`` strictly; a malformed one is
    answered INVALID_ARGUMENT before the servicer sees it."""

    def __init__(self, services: Iterable[ServiceDescriptor]) -> None:
        self._decoders: dict[str, Callable[[bytes], Message | Undecodable]] = {}
        for service in services:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                self._decoders[path] = strict_decoder(GetMessageClass(method.input_type))

    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        decode = self._decoders.get(call.method)
        if decode is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            inner_stream = handler.unary_stream
            if not inspect.isasyncgenfunction(inner_stream):
                return handler

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                async for response in inner_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream, decode, handler.response_serializer)
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, decode, handler.response_serializer)
