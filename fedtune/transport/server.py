"""Server side of the federation protocol: a gRPC servicer around a ``Coordinator``.

The servicer does the protocol work (authentication, sessions, streaming, decoding, validation) and
hands plain Python objects to the coordinator, whose round loop (``fedtune.server``) implements the small
``Coordinator`` protocol below. Every failure reaches the peer as a gRPC status with a readable message;
no input can take the server down.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.bulk import BulkListener, server_ssl_context
from fedtune.transport.codec import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    DecodedTensor,
    EncodingSpec,
    Limits,
    TensorDecoder,
)
from fedtune.transport.errors import (
    AuthenticationError,
    MessageRejected,
    PermissionDeniedError,
    TransportError,
)
from fedtune.transport.messages import UpdateHeader, instructions_to_frames, parse_update_header
from fedtune.transport.security import (
    SESSION_METADATA_KEY,
    NodeAuth,
    Session,
    check_plaintext_allowed,
    server_credentials,
    split_host,
)
from fedtune.transport.wire import frame_header, parse_frame, prefetch
from fedtune.types import Instructions

log = logging.getLogger(__name__)
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 2 * MAX_CHUNK_SIZE),
    ("grpc.max_send_message_length", 2 * MAX_CHUNK_SIZE),
    # HTTP/2 DATA frames up to 16 MiB instead of 16 KiB: a chunk arrives in a few slices rather than ~128,
    # which gRPC Python turns into as many bytes objects before it joins them into the message
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
]
STREAM_WINDOW_BYTES = 4 << 20


@dataclass(frozen=True)
class RoundStatus:
    round: int
    phase: str
    detail: dict[str, str] = field(default_factory=dict)


class Coordinator(Protocol):
    """What the server's round loop provides to the transport. Called from gRPC worker threads."""

    def register(self, node: str, fingerprint: str, base_updates: int = 0) -> None:
        """Admit an authenticated node whose model holds ``base_updates`` base-weight updates (0: a fresh
        process). Raises ConfigMismatch / PermissionDeniedError to refuse it."""

    def next_instructions(self, node: str, timeout: float) -> Instructions | None:
        """Block up to ``timeout`` s for this node's instructions of the current phase; ``None`` if none.
        Must be idempotent until the node submits (a node that lost the stream polls again)."""

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        """Consume one update. ``tensors`` decodes lazily and raises MessageRejected on bad input;
        raise MessageRejected yourself for a wrong round/phase. Returns a note for the node's ack."""

    def status(self) -> RoundStatus:
        """Current round and phase."""


_F = TypeVar("_F", bound=Callable[..., Any])


def _guard(fn: _F) -> _F:
    """Map transport errors to their gRPC status, anything else to INTERNAL (logged)."""

    @functools.wraps(fn)
    def unary(self: FederationServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except TransportError as e:
            if isinstance(e, AuthenticationError | PermissionDeniedError) and fn.__name__ in ("Challenge", "Register"):
                log.warning("refused at registration (%s): %s", context.peer(), e.reason)  # unknown or revoked
            context.abort(e.code, e.reason)
        except Exception:
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal server error in {fn.__name__}")

    return unary  # type: ignore[return-value]


class FederationServicer(fpb_grpc.FederationServicer):
    """gRPC servicer of ``fedtune.v1.Federation``; see the module docstring."""

    def __init__(
        self, coordinator: Coordinator, auth: NodeAuth, *, limits: Limits | None = None,
        downlink_encoding: EncodingSpec = "dense", chunk_size: int = DEFAULT_CHUNK_SIZE,
        heartbeat_interval_s: float = 10.0, max_wait_s: float = 30.0, max_concurrent_uploads: int | None = 8,
        upload_queue_timeout_s: float = 600.0,
    ) -> None:
        self.coordinator, self.auth = coordinator, auth
        self.limits = limits or Limits()
        self.downlink_encoding, self.chunk_size = downlink_encoding, chunk_size
        self.heartbeat_interval_s, self.max_wait_s = heartbeat_interval_s, max_wait_s
        # Uploads beyond this wait before their first byte is read, so flow control keeps their data on the
        # node: server memory stays ~ max_concurrent_uploads x (one tensor + gRPC buffers), not N x update.
        self._uploads = threading.BoundedSemaphore(max_concurrent_uploads) if max_concurrent_uploads else None
        self.upload_queue_timeout_s = upload_queue_timeout_s
        self.bulk_port = 0  # set by ``start_server`` when it opens the bulk lane

    def _session(self, context: grpc.ServicerContext) -> Session:
        token = dict(context.invocation_metadata()).get(SESSION_METADATA_KEY)
        return self.auth.session(token if isinstance(token, str) else None)

    def last_seen(self) -> dict[str, float]:
        """Unix time of the last call of every node with a live session (for dropping silent nodes)."""
        return {s.node: s.last_seen for s in self.auth.sessions()}

    @_guard
    def Challenge(self, request: fpb.ChallengeRequest, context: grpc.ServicerContext) -> fpb.ChallengeReply:
        return fpb.ChallengeReply(nonce=self.auth.challenge(request.node), expires_in_s=self.auth.nonce_ttl_s)

    @_guard
    def Register(self, request: fpb.RegisterRequest, context: grpc.ServicerContext) -> fpb.RegisterReply:
        session = self.auth.register(request.node, request.nonce, request.signature, request.public_key)
        self.coordinator.register(request.node, request.config_fingerprint, request.base_updates)
        return fpb.RegisterReply(session_token=session.token, heartbeat_interval_s=self.heartbeat_interval_s,
                                 bulk_port=self.bulk_port)

    def GetInstructions(self, request: fpb.InstructionsRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Yields serialized ``InstructionsChunk`` messages (see ``wire``)."""
        try:
            session = self._session(context)
            wait = min(max(request.wait_s, 0.0), self.max_wait_s)
            instr = self.coordinator.next_instructions(session.node, wait)
            if instr is None:
                yield frame_header(fpb.InstructionsHeader(kind=fpb.InstructionsHeader.NONE).SerializeToString())
                return
            yield from prefetch(instructions_to_frames(instr, self.downlink_encoding, self.chunk_size))
        except TransportError as e:
            context.abort(e.code, e.reason)
        except Exception:
            log.exception("GetInstructions failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal server error in GetInstructions")

    @_guard
    def SubmitUpdate(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> fpb.SubmitAck:
        """Reads serialized ``UpdateChunk`` messages (see ``wire``)."""
        session = self._session(context)
        with self._upload_slot():
            first = next(request_iterator, None)
            header_bytes = parse_frame(first)[0] if first is not None else None
            if header_bytes is None:
                raise MessageRejected("an update stream must start with an UpdateHeader")
            received = [len(first or b"")]
            frames = prefetch(request_iterator)  # gRPC reads the next chunks while one is decoded

            def tensors(decoder: TensorDecoder) -> Iterator[DecodedTensor]:
                for raw in frames:
                    _, chunk = parse_frame(raw)
                    if chunk is None:
                        raise MessageRejected("a second header in one update stream")
                    received[0] += len(raw)
                    out = decoder.feed(chunk)
                    if out is not None:
                        yield out
                        del out  # do not pin the previous tensor while the next one streams in
                if not context.is_active():
                    raise MessageRejected("update stream cancelled by the node")
                decoder.close()

            try:
                return self._consume(session, header_bytes, tensors, received)
            finally:
                frames.close()

    def bulk_submit(
        self, token: str, ready: Callable[[], None], read_header: Callable[[], bytes],
        tensors: Callable[[TensorDecoder], Iterator[DecodedTensor]], received: list[int],
    ) -> fpb.SubmitAck:
        """An upload on the bulk lane (``bulk.BulkListener``): the same session, upload bound, checks and
        coordinator as ``SubmitUpdate``. ``ready`` tells the node to start streaming once it is admitted.

        Raises:
            TransportError: as ``SubmitUpdate`` answers with a status.
        """
        session = self.auth.session(token)
        with self._upload_slot():
            ready()
            return self._consume(session, read_header(), tensors, received)

    @contextlib.contextmanager
    def _upload_slot(self) -> Iterator[None]:
        """Uploads beyond ``max_concurrent_uploads`` wait here before their first tensor byte is read."""
        if self._uploads is None:
            yield
            return
        if not self._uploads.acquire(timeout=self.upload_queue_timeout_s):
            raise TransportError("server busy: too many concurrent uploads, retry later",
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
        try:
            yield
        finally:
            self._uploads.release()

    def _consume(
        self, session: Session, header_bytes: bytes, tensors: Callable[[TensorDecoder], Iterator[DecodedTensor]],
        received: list[int],
    ) -> fpb.SubmitAck:
        header = parse_update_header(header_bytes)
        if header.node != session.node:
            raise PermissionDeniedError(f"session of {session.node!r} cannot submit for {header.node!r}")
        stream = tensors(TensorDecoder(self.limits))
        note = self.coordinator.submit(session.node, header, stream)
        for _ in stream:  # validate whatever the coordinator did not read
            pass
        return fpb.SubmitAck(accepted=True, message=note or "", bytes_received=received[0])

    @_guard
    def Heartbeat(self, request: fpb.HeartbeatRequest, context: grpc.ServicerContext) -> fpb.HeartbeatReply:
        self._session(context)
        st = self.coordinator.status()
        return fpb.HeartbeatReply(round=st.round, phase=st.phase)

    @_guard
    def Status(self, request: fpb.StatusRequest, context: grpc.ServicerContext) -> fpb.StatusReply:
        self._session(context)
        st, now = self.coordinator.status(), time.time()
        clients = [fpb.ClientInfo(node=n, last_seen_unix=t, seconds_since_seen=now - t)
                   for n, t in sorted(self.last_seen().items())]
        return fpb.StatusReply(round=st.round, phase=st.phase, clients=clients, detail=st.detail)


SERVICE = "fedtune.v1.Federation"


def _raw(b: bytes) -> bytes:
    return b


def method_handlers(servicer: FederationServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers, except that the two streaming calls exchange pre-serialized frames."""
    def unary(fn: Any, req: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, req.FromString, lambda m: m.SerializeToString())

    return {
        "Challenge": unary(servicer.Challenge, fpb.ChallengeRequest),
        "Register": unary(servicer.Register, fpb.RegisterRequest),
        "Heartbeat": unary(servicer.Heartbeat, fpb.HeartbeatRequest),
        "Status": unary(servicer.Status, fpb.StatusRequest),
        "GetInstructions": grpc.unary_stream_rpc_method_handler(
            servicer.GetInstructions, fpb.InstructionsRequest.FromString, _raw),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate, _raw, fpb.SubmitAck.SerializeToString),
    }


class FederationServer:
    """A running gRPC server; ``port`` is the bound port (useful with ``address="127.0.0.1:0"``)."""

    def __init__(self, server: grpc.Server, servicer: FederationServicer, port: int,
                 bulk: BulkListener | None = None) -> None:
        self.grpc_server, self.servicer, self.port, self.bulk = server, servicer, port, bulk

    def stop(self, grace: float | None = 1.0) -> None:
        if self.bulk is not None:
            self.bulk.close()
        self.grpc_server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def check_port_free(address: str) -> None:
    """Bind ``address`` once, as the server will, so that a port in use is reported plainly (and before a
    caller spends time loading a model), not as a gRPC log line.

    Raises:
        OSError: the port is in use or the host is not an address of this machine, naming ``server.address``.
    """
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return  # any free port: nothing to check
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                              type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT leftovers are fine
            sock.bind(sockaddr)
    except OSError as e:
        why = "the port is in use (another fedtune server?)" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise OSError(f"cannot listen on {address}: {why}; choose a free port with server.address "
                               "(or --address)") from None


def start_server(
    coordinator: Coordinator, address: str = "127.0.0.1:0", *, cert_file: str | Path | None = None,
    key_file: str | Path | None = None, insecure: bool = False, allowlist_file: str | Path | None = None,
    max_workers: int = 64, stream_window_bytes: int = STREAM_WINDOW_BYTES, bulk_port: int | None = 0,
    **servicer_kwargs: Any,
) -> FederationServer:
    """Start serving ``coordinator`` on ``address`` with TLS (``cert_file`` + ``key_file``) or, on loopback
    or with ``insecure=True``, in plaintext. ``allowlist_file=None`` admits any node name without a
    signature (tests and simulation only). ``max_workers`` bounds concurrent calls: each connected node
    holds one thread while it long-polls or uploads. ``stream_window_bytes`` fixes the HTTP/2 flow-control
    window of each stream (gRPC's BDP probing otherwise lets every waiting upload buffer tens of MB on the
    server; 4 MiB still fills a 100 ms / 300 Mbit/s path). ``bulk_port``: where the bulk upload lane
    (``bulk``) listens on the same host, with the same TLS (0: any free port; None: no lane, uploads go over
    gRPC only). Extra keyword arguments go to ``FederationServicer`` (``limits``,
    ``max_concurrent_uploads``, ``downlink_encoding``, ...).

    The port is bound exclusively (gRPC's default SO_REUSEPORT would let two servers share it and split the
    nodes between them).

    Raises:
        InsecureTransportError: plaintext on a non-loopback address without ``insecure=True``.
        OSError: the port is in use or the address cannot be bound.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both cert_file and key_file for TLS, or neither")
    if cert_file is None:
        check_plaintext_allowed(address, insecure, side="server")
    check_port_free(address)
    servicer = FederationServicer(coordinator, NodeAuth(allowlist_file), **servicer_kwargs)
    options = [*GRPC_OPTIONS, ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", stream_window_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=max_workers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, method_handlers(servicer)),))
    try:
        if cert_file is not None and key_file is not None:
            port = server.add_secure_port(address, server_credentials(cert_file, key_file))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address!r} (taken since the check?): choose another server.address")
    bulk = None
    if bulk_port is not None:
        if not 0 <= bulk_port <= 65535:
            raise ValueError(f"bulk_port must be a TCP port (0 for any free one) or None, got {bulk_port}")
        tls = server_ssl_context(cert_file, key_file) if cert_file is not None and key_file is not None else None
        try:
            bulk = BulkListener(split_host(address), bulk_port, servicer.bulk_submit, tls)
        except OSError as e:
            raise RuntimeError(f"cannot open the bulk lane on {split_host(address)}:{bulk_port}: {e}") from None
        servicer.bulk_port = bulk.port
    server.start()
    return FederationServer(server, servicer, port, bulk)
