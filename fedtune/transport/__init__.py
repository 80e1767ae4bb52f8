"""gRPC transport of fedtune: tensor codec, chunked streaming, servicer, client wrapper, TLS and node auth.

Protobuf types stay inside this package; callers use ``fedtune.types`` dataclasses and torch tensors.
"""

from fedtune.transport.client import Backoff, FederationClient, SubmitResult
from fedtune.transport.codec import (
    DEFAULT_CHUNK_SIZE,
    DecodedTensor,
    Limits,
    TensorDecoder,
    decode_state,
    decode_stream,
    encode_frames,
    encode_state,
    encoded_size,
)
from fedtune.transport.errors import (
    AuthenticationError,
    ConfigMismatch,
    ConnectionSetupError,
    InsecureTransportError,
    MessageRejected,
    PermissionDeniedError,
    TransportError,
)
from fedtune.transport.keys import create_keys, load_node_key, revoke_node
from fedtune.transport.messages import UpdateHeader, collect_reply, instructions_wire_size, reply_wire_size
from fedtune.transport.security import OBSERVER, check_plaintext_allowed, is_loopback
from fedtune.transport.server import Coordinator, FederationServer, RoundStatus, start_server

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "OBSERVER",
    "AuthenticationError",
    "Backoff",
    "ConfigMismatch",
    "ConnectionSetupError",
    "Coordinator",
    "DecodedTensor",
    "FederationClient",
    "FederationServer",
    "InsecureTransportError",
    "Limits",
    "MessageRejected",
    "PermissionDeniedError",
    "RoundStatus",
    "SubmitResult",
    "TensorDecoder",
    "TransportError",
    "UpdateHeader",
    "check_plaintext_allowed",
    "collect_reply",
    "create_keys",
    "decode_state",
    "decode_stream",
    "encode_frames",
    "encode_state",
    "encoded_size",
    "instructions_wire_size",
    "is_loopback",
    "load_node_key",
    "reply_wire_size",
    "revoke_node",
    "start_server",
]
