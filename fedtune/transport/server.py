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
from google.protobuf.message import DecodeError

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
    MessageRejected,
    PermissionDeniedError,
    TransportError,
)
from fedtune.transport.guards import (
    POLL,
    PRESENCE,
    SHORT,
    STREAMS_PER_CONNECTION,
    UPLOAD,
    CallGate,
    Watchdog,
    Watched,
)
from fedtune.transport.messages import UpdateHeader, instructions_to_frames, parse_update_header
from fedtune.transport.security import (
    NONCE_BYTES,
    OBSERVER,
    SESSION_METADATA_KEY,
    NodeAuth,
    Session,
    check_exposure,
    server_credentials,
    split_host,
)
from fedtune.transport.wire import frame_header, parse_frame, prefetch
from fedtune.types import Instructions
from fedtune.untrusted import MAX_NAME, clean, failure

log = logging.getLogger(__name__)
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 2 * MAX_CHUNK_SIZE),
    ("grpc.max_send_message_length", 2 * MAX_CHUNK_SIZE),
    # HTTP/2 DATA frames up to 16 MiB instead of 16 KiB: a chunk arrives in a few slices rather than ~128,
    # which gRPC Python turns into as many bytes objects before it joins them into the message
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
]
STREAM_WINDOW_BYTES = 4 << 20
MAX_FINGERPRINT = 16 << 10
"""Bytes of a config fingerprint a node may register with (fedtune's own are a few hundred)."""
PUBLIC_DETAIL = ("rounds", "deadline_in_s")
"""``Status`` details every node may see; the rest (who is live, who is awaited) only the operator."""
MAX_TOKEN = 128
"""Characters of a session token the server looks up (its own have 43)."""
PRESENCE_CHECK_S = 5.0
"""How often an open presence stream checks that its session is still live (not expired, replaced, revoked)."""
FORGET_CLOSED_S = 3600.0
"""A closed presence stream is remembered this long (then the node's silence tells as before)."""


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

    def upload_window(self, node: str) -> float:
        """Seconds ``node`` has to upload its update of the open phase (until the round's deadline). Called
        before an upload takes a slot, so that only a node asked for an update holds one.

        Raises:
            MessageRejected: the node may not upload now (not sampled, an observer, already answered).
        """

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        """Consume one update. ``tensors`` decodes lazily and raises MessageRejected on bad input;
        raise MessageRejected yourself for a wrong round/phase. Returns a note for the node's ack."""

    def status(self, detail: bool = True) -> RoundStatus:
        """Current round and phase; with ``detail``, what ``fedtune status`` shows (may cost O(nodes))."""


_F = TypeVar("_F", bound=Callable[..., Any])


def _guard(fn: _F) -> _F:
    """Map transport errors to their gRPC status, anything else to INTERNAL (logged)."""

    @functools.wraps(fn)
    def unary(self: FederationServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except TransportError as e:  # refused registrations are logged, at a bounded rate, by ``RefusalLog``
            context.abort(e.code, e.reason)
        except Exception as e:  # noqa: BLE001 - logged with its traceback (untrusted.failure)
            log.error("%s failed: %s", fn.__name__, failure(e))
            context.abort(grpc.StatusCode.INTERNAL, f"internal server error in {fn.__name__}")

    return unary  # type: ignore[return-value]


class RefusalLog:
    """Refused registrations in the log, at most ``per_minute`` lines a minute: the rest are counted in one
    line when the next minute starts, so a flood of bad registrations cannot grow the log without bound."""

    def __init__(self, per_minute: int = 20) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._start, self._shown, self._hidden = time.monotonic(), 0, 0

    def add(self, peer: str, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= 60.0:
                if self._hidden:
                    log.warning("%d more registration(s) refused in the last minute (not shown)", self._hidden)
                self._start, self._shown, self._hidden = now, 0, 0
            if self._shown >= self.per_minute:
                self._hidden += 1
                return
            self._shown += 1
        log.warning("registration from %s refused: %s", clean(peer, 100), clean(reason))


class FederationServicer(fpb_grpc.FederationServicer):
    """gRPC servicer of ``fedtune.v1.Federation``; see the module docstring."""

    def __init__(
        self, coordinator: Coordinator, auth: NodeAuth, *, limits: Limits | None = None,
        downlink_encoding: EncodingSpec = "dense", chunk_size: int = DEFAULT_CHUNK_SIZE,
        heartbeat_interval_s: float = 10.0, max_wait_s: float = 30.0, max_concurrent_uploads: int | None = 8,
        upload_queue_timeout_s: float = 600.0, upload_idle_s: float = 10.0, max_workers: int = 64,
    ) -> None:
        self.coordinator, self.auth = coordinator, auth
        self.limits = limits or Limits()
        self.downlink_encoding, self.chunk_size = downlink_encoding, chunk_size
        self.heartbeat_interval_s, self.max_wait_s = heartbeat_interval_s, max_wait_s
        # Uploads beyond this wait before their first byte is read, so flow control keeps their data on the
        # node: server memory stays ~ max_concurrent_uploads x (one tensor + gRPC buffers), not N x update.
        self._uploads = threading.BoundedSemaphore(max_concurrent_uploads) if max_concurrent_uploads else None
        self.upload_queue_timeout_s = upload_queue_timeout_s
        # An upload takes a slot only for a node asked for an update, one upload per node at a time, and is cut
        # when its node sends nothing for ``upload_idle_s`` (``guards``); a wait for a slot ends by the round's
        # deadline. Polls and uploads leave a reserve of the ``max_workers`` threads to short calls.
        self.gate = CallGate(max_workers)
        self.watchdog = Watchdog(upload_idle_s)
        self.upload_idle_s = upload_idle_s
        self.bulk_port = 0  # set by ``start_server`` when it opens the bulk lane
        self.refusals = RefusalLog()
        self._presence_lock = threading.Lock()
        self._present: dict[str, int] = {}  # node -> presence streams open
        self._closed: dict[str, float] = {}  # node with none open -> Unix time its last one closed

    def _session(self, context: grpc.ServicerContext) -> Session:
        token = dict(context.invocation_metadata()).get(SESSION_METADATA_KEY)
        return self.auth.session(token if isinstance(token, str) and len(token) <= MAX_TOKEN else None)

    def last_seen(self) -> dict[str, float]:
        """Unix time of the last call of every node with a live session (for dropping silent nodes)."""
        now, busy = time.time(), self.gate.nodes_in_calls()
        return {s.node: now if s.node in busy else s.last_seen for s in self.auth.sessions()}

    def disconnected(self) -> dict[str, float]:
        """Nodes whose connection closed: Unix time their last presence stream ended, for each node with none
        open that has made no call since (a node that registered again, or still heartbeats, is not here)."""
        now = time.time()
        with self._presence_lock:
            for node in [n for n, t in self._closed.items() if now - t > FORGET_CLOSED_S]:
                del self._closed[node]
            closed = dict(self._closed)
        calls = {s.node: s.last_seen for s in self.auth.sessions()}
        return {n: t for n, t in closed.items() if calls.get(n, 0.0) <= t}

    def _presence(self, node: str, opened: bool) -> None:
        with self._presence_lock:
            n = self._present.get(node, 0) + (1 if opened else -1)
            if n > 0:
                self._present[node] = n
                self._closed.pop(node, None)
            else:
                self._present.pop(node, None)
                self._closed[node] = time.time()

    def Presence(self, request: fpb.PresenceRequest, context: grpc.ServicerContext) -> Iterator[fpb.PresenceReply]:
        """Sends nothing: held open by a node until its connection closes (the process ended, the network
        dropped), its session ends or the server stops; ``disconnected`` then lists the node."""
        try:
            session = self._session(context)
            with self.gate.call(session.node, PRESENCE):
                ended = threading.Event()
                if not context.add_callback(ended.set):
                    return  # the call ended already
                self._presence(session.node, opened=True)
                try:
                    while not ended.wait(PRESENCE_CHECK_S) and self.auth.current(session.token):
                        pass
                finally:
                    self._presence(session.node, opened=False)
        except TransportError as e:
            context.abort(e.code, e.reason)
        except Exception as e:  # noqa: BLE001 - logged with its traceback (untrusted.failure)
            log.error("Presence failed: %s", failure(e))
            context.abort(grpc.StatusCode.INTERNAL, "internal server error in Presence")
        yield from ()

    @_guard
    def Challenge(self, request: fpb.ChallengeRequest, context: grpc.ServicerContext) -> fpb.ChallengeReply:
        return fpb.ChallengeReply(nonce=self.auth.challenge(request.node), expires_in_s=self.auth.nonce_ttl_s)

    @_guard
    def Register(self, request: fpb.RegisterRequest, context: grpc.ServicerContext) -> fpb.RegisterReply:
        try:
            return self._register(request)
        except TransportError as e:
            self.refusals.add(context.peer(), e.reason)
            raise

    def _register(self, request: fpb.RegisterRequest) -> fpb.RegisterReply:
        for what, value, most in (("nonce", request.nonce, NONCE_BYTES), ("signature", request.signature, 64),
                                  ("public_key", request.public_key, 32),
                                  ("config_fingerprint", request.config_fingerprint, MAX_FINGERPRINT)):
            if len(value) > most:  # before anything stores, logs or compares it
                raise MessageRejected(f"{what} has length {len(value)}: at most {most} is accepted")
        entry = self.auth.register(request.node, request.nonce, request.signature, request.public_key)
        observer = request.config_fingerprint == OBSERVER
        if entry is not None and entry.observer and not observer:
            raise PermissionDeniedError(f"{request.node!r} holds an observer key (fedtune status): it cannot "
                                        "register as a training node")
        # the coordinator may refuse the node (another config): only then is a session opened, so a refused
        # registration never replaces the node's live session
        self.coordinator.register(request.node, request.config_fingerprint, request.base_updates)
        session = self.auth.open_session(request.node, lists_all=observer and (entry is None or entry.observer))
        return fpb.RegisterReply(session_token=session.token, heartbeat_interval_s=self.heartbeat_interval_s,
                                 bulk_port=self.bulk_port)

    def GetInstructions(self, request: fpb.InstructionsRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Yields serialized ``InstructionsChunk`` messages (see ``wire``)."""
        try:
            session = self._session(context)
            wait = min(max(request.wait_s, 0.0), self.max_wait_s)
            with self.gate.call(session.node, POLL):  # until the node has read its instructions
                instr = self.coordinator.next_instructions(session.node, wait)
                if instr is None:
                    yield frame_header(fpb.InstructionsHeader(kind=fpb.InstructionsHeader.NONE).SerializeToString())
                    return
                yield from prefetch(instructions_to_frames(instr, self.downlink_encoding, self.chunk_size))
        except TransportError as e:
            context.abort(e.code, e.reason)
        except Exception as e:  # noqa: BLE001 - logged with its traceback (untrusted.failure)
            log.error("GetInstructions failed: %s", failure(e))
            context.abort(grpc.StatusCode.INTERNAL, "internal server error in GetInstructions")

    @_guard
    def SubmitUpdate(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> fpb.SubmitAck:
        """Reads serialized ``UpdateChunk`` messages (see ``wire``)."""
        session = self._session(context)
        with self._admitted(session.node, context.cancel) as watched:
            request_iterator = watched.reads(request_iterator)
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
        cancel: Callable[[], None] = lambda: None, authenticated: Callable[[], None] | None = None,
    ) -> fpb.SubmitAck:
        """An upload on the bulk lane (``bulk.BulkListener``): the same session, upload bounds, checks and
        coordinator as ``SubmitUpdate``. ``ready`` tells the node to start streaming once it is admitted;
        ``cancel`` breaks the connection (the watchdog's cut); ``authenticated`` is called once the token is
        valid and the node may upload.

        Raises:
            TransportError: as ``SubmitUpdate`` answers with a status.
        """
        session = self.auth.session(token)
        with self._admitted(session.node, cancel, authenticated) as watched:
            ready()

            idle = f"update stream cut: the node sent nothing for {self.upload_idle_s:g} s"

            @contextlib.contextmanager
            def reasons() -> Iterator[None]:
                """A lane read that failed: say whether the node went idle, the watchdog cut it or it left."""
                try:
                    yield
                except TimeoutError:  # the lane's socket timeout: its idle bound
                    raise MessageRejected(idle) from None
                except (MessageRejected, OSError) as e:
                    cut = watched.error()
                    if cut is not None:
                        raise cut from None
                    if isinstance(e, OSError):
                        raise MessageRejected(f"update stream cancelled by the node: {e}") from None
                    raise

            def cut_aware(decoder: TensorDecoder) -> Iterator[DecodedTensor]:
                with reasons():
                    yield from tensors(decoder)
            with reasons():
                header = read_header()
            return self._consume(session, header, cut_aware, received)

    @contextlib.contextmanager
    def _admitted(self, node: str, cancel: Callable[[], None],
                  authenticated: Callable[[], None] | None = None) -> Iterator[Watched]:
        """Admit one upload of ``node``: one at a time per node, only when the coordinator asked it for an
        update, then a slot (uploads beyond ``max_concurrent_uploads`` wait here, before their first tensor
        byte is read, until the round's deadline at most); the watchdog cuts the stream (``cancel``) when the
        node goes idle or the round ends. ``authenticated``: called once the node has passed those checks.

        Raises:
            TransportError: RESOURCE_EXHAUSTED (another upload of this node is open, or no slot came free in
                time); MessageRejected when the node may not upload now.
        """
        with self.gate.call(node, UPLOAD):
            window = self.coordinator.upload_window(node)
            if authenticated is not None:
                authenticated()
            if self._uploads is not None and not self._uploads.acquire(
                    timeout=max(0.0, min(self.upload_queue_timeout_s, window))):
                raise TransportError("server busy: too many concurrent uploads, retry later",
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
            try:
                left = self.coordinator.upload_window(node)
                with self.watchdog.watch(cancel, left) as watched:
                    yield watched
            finally:
                if self._uploads is not None:
                    self._uploads.release()

    def _consume(
        self, session: Session, header_bytes: bytes, tensors: Callable[[TensorDecoder], Iterator[DecodedTensor]],
        received: list[int],
    ) -> fpb.SubmitAck:
        header = parse_update_header(header_bytes)
        if header.node != session.node:
            raise PermissionDeniedError(f"session of {session.node!r} cannot submit for {clean(header.node, MAX_NAME)!r}")
        stream = tensors(TensorDecoder(self.limits))
        note = self.coordinator.submit(session.node, header, stream)
        for _ in stream:  # validate whatever the coordinator did not read
            pass
        return fpb.SubmitAck(accepted=True, message=note or "", bytes_received=received[0])

    @_guard
    def Heartbeat(self, request: fpb.HeartbeatRequest, context: grpc.ServicerContext) -> fpb.HeartbeatReply:
        with self.gate.call(self._session(context).node, SHORT):
            st = self.coordinator.status(detail=False)
        return fpb.HeartbeatReply(round=st.round, phase=st.phase)

    @_guard
    def Status(self, request: fpb.StatusRequest, context: grpc.ServicerContext) -> fpb.StatusReply:
        session = self._session(context)
        with self.gate.call(session.node, SHORT):
            st, now = self.coordinator.status(), time.time()
        seen = self.last_seen()
        if not session.lists_all:  # a node sees the round and itself; only the operator sees every node
            seen = {session.node: seen.get(session.node, now)}
            st = RoundStatus(st.round, st.phase, {k: v for k, v in st.detail.items() if k in PUBLIC_DETAIL})
        clients = [fpb.ClientInfo(node=n, last_seen_unix=t, seconds_since_seen=now - t) for n, t in sorted(seen.items())]
        return fpb.StatusReply(round=st.round, phase=st.phase, clients=clients, detail=st.detail)


SERVICE = "fedtune.v1.Federation"


def _raw(b: bytes) -> bytes:
    return b


def parsed(fn: Any, req: Any) -> Any:
    """A handler of raw request bytes that parses them as ``req`` for ``fn``: a request that does not parse is
    the peer's mistake (INVALID_ARGUMENT, the reason bounded), not an INTERNAL error."""
    def handler(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = req.FromString(raw)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, clean(f"malformed {req.__name__}: {e}"))
        return fn(request, context)
    return handler


def method_handlers(servicer: FederationServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers, except that the two streaming calls exchange pre-serialized frames, and that
    a request that does not parse is the peer's mistake (INVALID_ARGUMENT), not an INTERNAL error."""
    def unary(fn: Any, req: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(parsed(fn, req), _raw, lambda m: m.SerializeToString())

    return {
        "Challenge": unary(servicer.Challenge, fpb.ChallengeRequest),
        "Register": unary(servicer.Register, fpb.RegisterRequest),
        "Heartbeat": unary(servicer.Heartbeat, fpb.HeartbeatRequest),
        "Status": unary(servicer.Status, fpb.StatusRequest),
        "Presence": grpc.unary_stream_rpc_method_handler(
            parsed(servicer.Presence, fpb.PresenceRequest), _raw, fpb.PresenceReply.SerializeToString),
        "GetInstructions": grpc.unary_stream_rpc_method_handler(
            parsed(servicer.GetInstructions, fpb.InstructionsRequest), _raw, _raw),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate, _raw, fpb.SubmitAck.SerializeToString),
    }


def concurrent_calls(max_workers: int) -> int:
    """Calls the server holds at once (running or queued for a thread); more are refused (RESOURCE_EXHAUSTED)."""
    return 4 * max_workers


PENDING_CALLS_DEFAULT = 1000
"""gRPC core's own bound on calls that arrived but that the Python server has not picked up yet."""


def server_options(max_workers: int, stream_window_bytes: int = STREAM_WINDOW_BYTES) -> list[tuple[str, int]]:
    """The gRPC server's channel options. The Python server picks up one arrived call at a time; when many
    arrive at once (every node of a large federation uploads as its round opens) the others wait in gRPC
    core, whose backlog bound (``PENDING_CALLS_DEFAULT``) refuses the rest, and a refused call reaches the
    node as CANCELLED, not as RESOURCE_EXHAUSTED. A server sized for ``max_workers`` threads lets as many
    calls wait as it would hold at once (``concurrent_calls``), and twice that before every new one is
    refused; a node's calls stay bounded by ``STREAMS_PER_CONNECTION`` per connection."""
    pending = max(PENDING_CALLS_DEFAULT, concurrent_calls(max_workers))
    return [*GRPC_OPTIONS, ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", stream_window_bytes),
            ("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending)]


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


def keepalive_options(keepalive_s: float) -> list[tuple[str, int]]:
    """gRPC server options that ping a connection quiet for ``keepalive_s`` and close it when the ping is not
    answered within ``keepalive_s``. gRPC's ``keepalive_timeout_ms`` alone does not close it (the ping's own
    ``http2.ping_timeout_ms``, one minute by default, does), and by default it sends only two pings while no
    data goes out, so an idle stream would stop being checked."""
    ms = max(1, round(keepalive_s * 1000))
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms),
            ("grpc.http2.max_pings_without_data", 0)]


def start_server(
    coordinator: Coordinator, address: str = "127.0.0.1:0", *, cert_file: str | Path | None = None,
    key_file: str | Path | None = None, insecure: bool = False, allowlist_file: str | Path | None = None,
    allow_anyone: bool = False,
    max_workers: int = 64, stream_window_bytes: int = STREAM_WINDOW_BYTES, bulk_port: int | None = 0,
    session_idle_s: float = 600.0, session_max_s: float = 86400.0, keepalive_s: float | None = None,
    **servicer_kwargs: Any,
) -> FederationServer:
    """Start serving ``coordinator`` on ``address`` with TLS (``cert_file`` + ``key_file``) or, on loopback
    or with ``insecure=True``, in plaintext. ``allowlist_file=None`` admits any node name without a
    signature: on loopback (tests, simulation), or elsewhere only with ``allow_anyone=True``; either choice
    off loopback is logged as a warning (``security.check_exposure``). ``max_workers`` threads serve the calls:
    each connected node holds one while it long-polls or uploads, and a reserve of them is kept for short calls
    (heartbeats). ``stream_window_bytes`` fixes the HTTP/2 flow-control
    window of each stream (gRPC's BDP probing otherwise lets every waiting upload buffer tens of MB on the
    server; 4 MiB still fills a 100 ms / 300 Mbit/s path). ``bulk_port``: where the bulk upload lane
    (``bulk``) listens on the same host, with the same TLS (0: any free port; None: no lane, uploads go over
    gRPC only). A session expires after ``session_idle_s`` without a call or ``session_max_s`` after it
    opened (the node registers again). ``keepalive_s``: a connection that sends nothing for this long is
    pinged (HTTP/2 PING) and closed when the ping is not answered within as long again, which ends its node's
    presence stream: a peer cut off without closing its connection is noticed (None: never pinged).
    Extra keyword arguments go to ``FederationServicer`` (``limits``,
    ``max_concurrent_uploads``, ``downlink_encoding``, ...).

    The port is bound exclusively (gRPC's default SO_REUSEPORT would let two servers share it and split the
    nodes between them).

    Raises:
        InsecureTransportError: off loopback, plaintext without ``insecure=True`` or no allow-list without
            ``allow_anyone=True``.
        OSError: the port is in use or the address cannot be bound.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both cert_file and key_file for TLS, or neither")
    for warning in check_exposure(address, tls=cert_file is not None, authenticated=allowlist_file is not None,
                                  insecure=insecure, allow_anyone=allow_anyone):
        log.warning("%s", warning)
    check_port_free(address)
    auth = NodeAuth(allowlist_file, session_idle_s=session_idle_s, session_max_s=session_max_s)
    servicer = FederationServicer(coordinator, auth, max_workers=max_workers, **servicer_kwargs)
    options = server_options(max_workers, stream_window_bytes)
    if keepalive_s is not None:
        options += keepalive_options(keepalive_s)
    # Calls beyond the threads queue for one (a burst of short calls is served, not refused): long calls
    # (polls, uploads) never take the last threads (``guards.CallGate``), so queued short calls start soon.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=concurrent_calls(max_workers))
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
            bulk = BulkListener(split_host(address), bulk_port, servicer.bulk_submit, tls,
                                idle_s=servicer.upload_idle_s)
        except OSError as e:
            raise RuntimeError(f"cannot open the bulk lane on {split_host(address)}:{bulk_port}: {e}") from None
        servicer.bulk_port = bulk.port
    server.start()
    return FederationServer(server, servicer, port, bulk)
