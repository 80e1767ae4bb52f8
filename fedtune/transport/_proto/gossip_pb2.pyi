from . import federation_pb2 as _federation_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FetchRequest(_message.Message):
    __slots__ = ("round", "exchange", "node")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    round: int
    exchange: int
    node: str
    def __init__(self, round: _Optional[int] = ..., exchange: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class WhereRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class WhereReply(_message.Message):
    __slots__ = ("node", "round", "rounds", "done")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    node: str
    round: int
    rounds: int
    done: bool
    def __init__(self, node: _Optional[str] = ..., round: _Optional[int] = ..., rounds: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...
