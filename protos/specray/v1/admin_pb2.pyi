# ruff: noqa
# fmt: off
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScaleRequest(_message.Message):
    __slots__ = ("drafts", "targets")
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    drafts: int
    targets: int
    def __init__(self, drafts: _Optional[int] = ..., targets: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("state", "seconds")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    state: ReplicaState
    seconds: float
    def __init__(self, state: _Optional[_Union[ReplicaState, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ReplicaState
    def __init__(self, state: _Optional[_Union[ReplicaState, _Mapping]] = ...) -> None: ...

class GetDiagnosticsRequest(_message.Message):
    __slots__ = ("reset_rounds",)
    RESET_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    reset_rounds: bool
    def __init__(self, reset_rounds: _Optional[bool] = ...) -> None: ...

class GetDiagnosticsResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("backend", "drafts", "targets", "tensor_parallel_size", "running", "waiting", "target_moves", "draft_moves", "expert_parallel_size")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    TARGET_MOVES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MOVES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    backend: str
    drafts: int
    targets: int
    tensor_parallel_size: int
    running: int
    waiting: int
    target_moves: int
    draft_moves: int
    expert_parallel_size: int
    def __init__(self, backend: _Optional[str] = ..., drafts: _Optional[int] = ..., targets: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., target_moves: _Optional[int] = ..., draft_moves: _Optional[int] = ..., expert_parallel_size: _Optional[int] = ...) -> None: ...
