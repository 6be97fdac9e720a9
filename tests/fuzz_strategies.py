"""Hypothesis strategies for the fuzz test (tests/test_fuzz.py): classes of bad
requests, each a strategy, keyed by a label that becomes a row of the report.

A typed bad request is a valid base request with one setting broken, so the
refusal must name exactly that field. Limits match ``serve_config`` in
tests/serving_helpers.py.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any

from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import strategies as st
from serving_helpers import MODEL_VOCAB

from specray.protos.messages import build_request
from specray.protos.specray.v1 import generation_pb2 as pb

MAX_CONTEXT = 512  # serve_config's max_len (the model allows 2048)
MAX_TOKENS = 256  # serve_config's limits.max_tokens
K = 4  # serve_config's k: the num_speculative_tokens ceiling
CHAR_BOUND = 32 * MAX_CONTEXT  # text longer than this is refused before tokenizing
PROBE = "x = [1, 2, 3]\ny = [1, 2, 3]\n"
PROMPT_KEYS = frozenset({"text", "token_ids", "prompt"})

Strategy = st.SearchStrategy


@dataclass(frozen=True)
class Bad:
    """One broken setting: the field its refusal must name and what to set;
    ``drop_prompt`` removes the base's prompt (no input at all)."""

    field: str
    fields: dict[str, Any]
    drop_prompt: bool = False


@dataclass(frozen=True)
class Case:
    """A whole request and the field its refusal must name."""

    fields: dict[str, Any]
    field: str


@dataclass(frozen=True)
class Wire:
    """Raw request bytes and what the refusal must contain ("" for anything)."""

    data: bytes
    named: str = ""


@dataclass(frozen=True)
class HttpCase:
    """A case and the endpoint it goes to."""

    path: str
    case: Case


# -- values --------------------------------------------------------------------------

valid_ids = st.integers(0, MODEL_VOCAB - 1)
short_text = st.text(string.ascii_letters + string.digits + " \n:()=,", min_size=1, max_size=40)
nan_or_inf = st.sampled_from([math.nan, math.inf, -math.inf])
# float32 bounds: gRPC's float fields hold float32 (7 significant digits reach
# the validator), and hypothesis wants bounds it can represent exactly.
negative = st.floats(max_value=-(2.0**-100), width=32, allow_infinity=False, allow_nan=False)
above_one = st.floats(min_value=1 + 2.0**-10, width=32, allow_infinity=False, allow_nan=False)
non_positive = st.floats(max_value=0, width=32, allow_infinity=False, allow_nan=False)
too_many_tokens = st.integers(300, 400).map(lambda n: " x1 =" * n)  # > 512 tokens


def valid_base(text_field: str = "text", token_ids_field: str = "token_ids") -> Strategy:
    """Valid settings for every field a case does not break."""
    prompt = st.one_of(
        short_text.map(lambda text: {text_field: text}),
        st.lists(valid_ids, min_size=1, max_size=64).map(lambda ids: {token_ids_field: ids}),
    )
    sampling = st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.integers(1, 8),
            "temperature": st.floats(0, 2, width=32),
            "top_p": st.floats(2.0**-7, 1, width=32),
            "top_k": st.integers(0, MODEL_VOCAB),
            "min_p": st.floats(0, 1, width=32),
            "stop": st.lists(short_text, max_size=2),
            "stop_token_ids": st.lists(valid_ids, max_size=3),
            "seed": st.integers(0, 2**63),
            "ignore_eos": st.booleans(),
        },
    )
    return st.builds(lambda p, s: p | s, prompt, sampling)


def setting(name: str, values: Strategy) -> Strategy:
    return values.map(lambda value: Bad(name, {name: value}))


def cases(base: Strategy, bad: Strategy) -> Strategy:
    """The base with the bad setting applied over it."""

    def combine(fields: dict[str, Any], broken: Bad) -> Case:
        if broken.drop_prompt or PROMPT_KEYS & broken.fields.keys():
            fields = {k: v for k, v in fields.items() if k not in PROMPT_KEYS}
        return Case(fields | broken.fields, broken.field)

    return st.builds(combine, base, bad)


def value_classes(text: str, tokens: str, max_id: int) -> dict[str, Strategy]:
    """Out-of-range settings by class; ``text``/``tokens`` are the prompt's
    wire names, ``max_id`` bounds integers (2**32 - 1 over gRPC)."""
    unprintable = st.builds(lambda a, c: a + c, short_text, st.sampled_from(["\n", "\x00", "\x7f"]))
    return {
        "temperature NaN, inf or negative": setting("temperature", nan_or_inf | negative),
        "top_p NaN, <= 0 or > 1": setting("top_p", nan_or_inf | non_positive | above_one),
        "min_p NaN, < 0 or > 1": setting("min_p", nan_or_inf | negative | above_one),
        "top_k above the vocabulary": setting("top_k", st.integers(MODEL_VOCAB + 1, max_id)),
        "max_tokens 0 or over the limit (up to huge)": setting(
            "max_tokens", st.just(0) | st.integers(MAX_TOKENS + 1, max_id)
        ),
        "num_speculative_tokens 0, over k, or with speculation off": st.one_of(
            setting("num_speculative_tokens", st.just(0) | st.integers(K + 1, max_id)),
            st.integers(1, K).map(
                lambda n: Bad(
                    "num_speculative_tokens", {"speculative": False, "num_speculative_tokens": n}
                )
            ),
        ),
        "fixed_speculation with speculation off": st.just(
            Bad("fixed_speculation", {"speculative": False, "fixed_speculation": True})
        ),
        "token id >= vocabulary size": st.builds(
            lambda ids, bad, at: Bad(tokens, {tokens: [*ids[:at], bad, *ids[at:]]}),
            st.lists(valid_ids, max_size=20),
            st.integers(MODEL_VOCAB, max_id),
            st.integers(0, 20),
        ),
        "prompt of token ids filling the context": setting(
            tokens, st.lists(valid_ids, min_size=MAX_CONTEXT, max_size=MAX_CONTEXT + 100)
        ),
        "prompt + max_tokens over the context": st.integers(2, MAX_TOKENS).map(
            # 2 at least: with 1 the prompt alone would fill the context
            lambda n: Bad("max_tokens", {tokens: [7] * (MAX_CONTEXT - n + 1), "max_tokens": n})
        ),
        "empty input": st.sampled_from(
            [Bad(text, {text: ""}), Bad(tokens, {tokens: []}), Bad(text, {}, drop_prompt=True)]
        ),
        "text over the character bound": setting(
            text, st.integers(CHAR_BOUND + 1, CHAR_BOUND + 500).map(lambda n: "a" * n)
        ),
        "text over the context (tokens)": setting(text, too_many_tokens),
        "stop: too many, empty or too long": setting(
            "stop",
            st.one_of(
                st.lists(short_text, min_size=9, max_size=20),
                st.lists(short_text, max_size=7).map(lambda stop: [*stop, ""]),
                st.integers(257, 400).map(lambda n: ["s" * n]),
            ),
        ),
        "stop_token_ids: too many or >= vocabulary size": setting(
            "stop_token_ids",
            st.lists(valid_ids, min_size=33, max_size=60)
            | st.integers(MODEL_VOCAB, max_id).map(lambda bad: [1, bad]),
        ),
        "request_id too long, unprintable or padded": setting(
            "request_id",
            st.text(min_size=129, max_size=200)
            | unprintable
            | short_text.map(lambda rid: f" {rid.strip() or 'r'} "),
        ),
    }


def grpc_value_classes() -> dict[str, Strategy]:
    classes = value_classes("text", "token_ids", 2**32 - 1)
    return {kind: cases(valid_base(), bad) for kind, bad in classes.items()}


def grpc_request(fields: dict[str, Any]) -> pb.GenerateRequest:
    fields = dict(fields)
    prompt: Any = fields.pop("text", None)
    if "token_ids" in fields:
        prompt = fields.pop("token_ids")
    if prompt is None:  # no input at all
        return pb.GenerateRequest(**fields)
    return build_request(prompt, **fields)


# -- gRPC wire bytes ---------------------------------------------------------------------

FIELDS = pb.GenerateRequest.DESCRIPTOR.fields_by_name
WIRE_PAYLOADS = {0: b"\x05", 1: b"\x00" * 8, 2: b"\x01A", 5: b"\x00" * 4}
# Each field's wire type: floats 32-bit, strings and messages length-delimited.
WIRE_TYPES = (
    {name: 0 for name in FIELDS}
    | {name: 5 for name in ("temperature", "top_p", "min_p")}
    | {name: 2 for name in ("request_id", "text", "token_ids", "stop")}
)
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]


def key(number: int, wire_type: int) -> bytes:
    return _VarintBytes(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, 2) + _VarintBytes(len(payload)) + payload


@st.composite
def wrong_wire_type(draw: st.DrawFn) -> Wire:
    valid = grpc_request(draw(valid_base())).SerializeToString()
    name = draw(st.sampled_from(sorted(FIELDS)))
    wrong = draw(st.sampled_from(sorted(set(WIRE_PAYLOADS) - {WIRE_TYPES[name]})))
    if name == "stop_token_ids" and wrong == 2:
        wrong = 5  # length-delimited is packed, which is right for a repeated uint32
    return Wire(valid + key(FIELDS[name].number, wrong) + WIRE_PAYLOADS[wrong], f"`{name}`")


@st.composite
def bad_utf8(draw: st.DrawFn) -> Wire:
    base = draw(valid_base())
    name = draw(st.sampled_from(["request_id", "text", "stop"]))
    if name == "text":  # the bad text is the prompt
        base = {k: v for k, v in base.items() if k not in PROMPT_KEYS}
    good = draw(st.binary(max_size=10)).decode("utf-8", "ignore").encode()
    payload = good + draw(st.sampled_from(BAD_UTF8))
    data = grpc_request(base).SerializeToString() + length_delimited(FIELDS[name].number, payload)
    return Wire(data, f"`{name}`")


@st.composite
def unknown_field(draw: st.DrawFn) -> Wire:
    valid = grpc_request(draw(valid_base())).SerializeToString()
    number = draw(st.integers(15, 2**29 - 1).filter(lambda n: not 19000 <= n <= 19999))
    wire = draw(st.sampled_from(sorted(WIRE_PAYLOADS)))
    return Wire(valid + key(number, wire) + WIRE_PAYLOADS[wire], f"field {number}")


@st.composite
def cut_short(draw: st.DrawFn) -> Wire:
    whole = length_delimited(FIELDS["text"].number, draw(short_text).encode())
    cut = draw(st.integers(1, len(whole) - 1))  # inside the length or the text
    return Wire(whole[:cut], "`text`")


@st.composite
def wide_uint32(draw: st.DrawFn) -> Wire:
    valid = grpc_request(draw(valid_base())).SerializeToString()
    name = draw(st.sampled_from(["max_tokens", "top_k", "num_speculative_tokens"]))
    value = draw(st.integers(2**32, 2**64 - 1))
    return Wire(valid + key(FIELDS[name].number, 0) + _VarintBytes(value), f"`{name}`")


@st.composite
def both_inputs(draw: st.DrawFn) -> Wire:
    ids = b"".join(_VarintBytes(i) for i in draw(st.lists(valid_ids, min_size=1, max_size=5)))
    token_ids = length_delimited(FIELDS["token_ids"].number, length_delimited(1, ids))
    text = length_delimited(FIELDS["text"].number, draw(short_text).encode())
    first, second = draw(st.permutations([text, token_ids]))
    return Wire(first + second, "`token_ids`" if second is token_ids else "`text`")


def random_bytes() -> Strategy:
    """Random bytes with a NaN temperature appended, so that bytes which
    happen to decode are still a bad request."""
    nan = key(FIELDS["temperature"].number, 5) + b"\x00\x00\xc0\x7f"
    return st.binary(max_size=120).map(lambda data: Wire(data + nan))


def wire_classes() -> dict[str, Strategy]:
    return {
        "known field sent with the wrong wire type": wrong_wire_type(),
        "string field not valid UTF-8": bad_utf8(),
        "unknown field number": unknown_field(),
        "message cut short": cut_short(),
        "uint32 field wider than 32 bits": wide_uint32(),
        "both text and token_ids (oneof)": both_inputs(),
        "random bytes": random_bytes(),
    }
