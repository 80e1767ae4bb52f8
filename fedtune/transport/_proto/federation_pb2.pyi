from . import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChallengeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("nonce", "expires_in_s")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    expires_in_s: float
    def __init__(self, nonce: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node", "nonce", "signature", "public_key", "config_fingerprint", "base_updates")
    NODE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    node: str
    nonce: bytes
    signature: bytes
    public_key: bytes
    config_fingerprint: str
    base_updates: int
    def __init__(self, node: _Optional[str] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., config_fingerprint: _Optional[str] = ..., base_updates: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("session_token", "heartbeat_interval_s", "bulk_port")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    heartbeat_interval_s: float
    bulk_port: int
    def __init__(self, session_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class InstructionsRequest(_message.Message):
    __slots__ = ("wait_s",)
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    def __init__(self, wait_s: _Optional[float] = ...) -> None: ...

class InstructionsHeader(_message.Message):
    __slots__ = ("kind", "round", "phase", "client_id", "train_json", "has_rank", "rank", "extra_json")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[InstructionsHeader.Kind]
        INSTRUCTIONS: _ClassVar[InstructionsHeader.Kind]
    NONE: InstructionsHeader.Kind
    INSTRUCTIONS: InstructionsHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAIN_JSON_FIELD_NUMBER: _ClassVar[int]
    HAS_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: InstructionsHeader.Kind
    round: int
    phase: str
    client_id: str
    train_json: str
    has_rank: bool
    rank: int
    extra_json: str
    def __init__(self, kind: _Optional[_Union[InstructionsHeader.Kind, str]] = ..., round: _Optional[int] = ..., phase: _Optional[str] = ..., client_id: _Optional[str] = ..., train_json: _Optional[str] = ..., has_rank: _Optional[bool] = ..., rank: _Optional[int] = ..., extra_json: _Optional[str] = ...) -> None: ...

class InstructionsChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: InstructionsHeader
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[InstructionsHeader, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "phase", "node", "num_examples", "metrics", "error", "has_rank", "rank")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HAS_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    node: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    error: str
    has_rank: bool
    rank: int
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., node: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., has_rank: _Optional[bool] = ..., rank: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitAck(_message.Message):
    __slots__ = ("accepted", "message", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    bytes_received: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round", "phase")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("round", "phase")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("node", "last_seen_unix", "seconds_since_seen")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    node: str
    last_seen_unix: float
    seconds_since_seen: float
    def __init__(self, node: _Optional[str] = ..., last_seen_unix: _Optional[float] = ..., seconds_since_seen: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "phase", "clients", "detail")
    class DetailEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    clients: _containers.RepeatedCompositeFieldContainer[ClientInfo]
    detail: _containers.ScalarMap[str, str]
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., clients: _Optional[_Iterable[_Union[ClientInfo, _Mapping]]] = ..., detail: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PresenceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PresenceReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
