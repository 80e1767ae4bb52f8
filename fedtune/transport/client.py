"""Node side of the federation protocol: ``FederationClient``.

Typical use by the node's loop (``fedtune.client``)::

    with FederationClient("server.example:7443", "site-a", key="keys/nodes/site-a.key",
                          ca_file="keys/ca.pem", fingerprint=fp) as fc:
        while (instr := fc.wait_for_instructions()) is not None:
            if instr.phase == "stop":
                break
            reply = run_phase(instr)                 # -> fedtune.types.ClientReply
            fc.submit(reply, phase=instr.phase)

Calls that fail because the server refused or dropped the connection are retried with exponential backoff
(with jitter); an expired session (server restart) is renewed by registering again. A connection that cannot
work as configured (a host name that does not resolve, a TLS certificate for another host or from another
CA, TLS on one side only) raises ``ConnectionSetupError`` at once: retrying cannot help.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.adapters import nbytes
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.bulk import LaneUnreachable, upload
from fedtune.transport.codec import DEFAULT_CHUNK_SIZE, EncodingSpec, Limits
from fedtune.transport.errors import (
    AuthenticationError,
    ConfigMismatch,
    ConnectionSetupError,
    MessageRejected,
    PermissionDeniedError,
    TransportError,
)
from fedtune.transport.keys import load_node_key
from fedtune.transport.messages import frames_to_instructions, reply_pieces, reply_to_frames, update_header
from fedtune.transport.security import (
    SESSION_METADATA_KEY,
    channel_credentials,
    check_plaintext_allowed,
    is_loopback,
    sign_challenge,
    split_host,
)
from fedtune.transport.server import GRPC_OPTIONS, SERVICE, RoundStatus, _raw
from fedtune.transport.wire import prefetch
from fedtune.types import ClientReply, Instructions
from fedtune.untrusted import clean

log = logging.getLogger(__name__)
_T = TypeVar("_T")
BULK_MIN_BYTES = 1 << 20
"""Smaller updates go over gRPC: a second connection gains nothing for a few hundred KB."""
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
_ERRORS: dict[grpc.StatusCode, type[TransportError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError, grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: MessageRejected, grpc.StatusCode.FAILED_PRECONDITION: ConfigMismatch,
}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``initial_s * factor**attempt`` capped at ``max_s``, +-``jitter`` fraction."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    jitter: float = 0.2
    max_attempts: int = 10

    def delay(self, attempt: int) -> float:
        d = min(self.max_s, self.initial_s * self.factor**attempt)
        return d * (1 + random.uniform(-self.jitter, self.jitter))


@dataclass(frozen=True)
class SubmitResult:
    accepted: bool
    message: str
    bytes_sent: int


def _as_error(e: grpc.RpcError) -> TransportError:
    code, details = e.code(), e.details() or str(e)  # type: ignore[attr-defined]
    return _ERRORS.get(code, TransportError)(f"{code.name}: {details}", code)


_SETUP_SIGNS = (  # (kind, text in gRPC's UNAVAILABLE details), first match wins
    ("dns", "errors resolving"), ("dns", "address lookup failed"),
    ("tls_hostname", "Hostname Verification"), ("tls_hostname", "hostname mismatch"),
    ("tls_plaintext", "WRONG_VERSION_NUMBER"), ("tls_ca", "certificate signature failure"),
    ("tls_ca", "CERTIFICATE_VERIFY_FAILED"), ("tls_ca", "unable to get local issuer"),
    ("tls", "Tls handshake failed"), ("tls", "Handshake failed"),
)


def _speaks_tls(address: str, timeout_s: float = 3.0) -> bool:
    """Whether the server at ``address`` completes a TLS handshake (certificate not checked)."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock, \
                ctx.wrap_socket(sock):
            return True
    except (OSError, ValueError):
        return False


def setup_error(e: grpc.RpcError, address: str, tls: bool) -> ConnectionSetupError | None:
    """The ``ConnectionSetupError`` an ``UNAVAILABLE`` failure stands for, or None when it is a refused or
    dropped connection (worth retrying). A plaintext connection that the server closes at once is probed
    for TLS, which is what a TLS server does to plaintext."""
    if e.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
        return None
    details = e.details() or str(e)  # type: ignore[attr-defined]
    for kind, sign in _SETUP_SIGNS:
        if sign in details:
            return ConnectionSetupError(f"{address}: {details}", kind)
    if not tls and "Socket closed" in details and _speaks_tls(address):
        return ConnectionSetupError(f"{address}: the server speaks TLS and closed this plaintext connection "
                                    f"({details})", "plaintext_tls")
    return None


class FederationClient:
    """Connects a node to a federation server, see the module docstring.

    ``key`` is the node's Ed25519 private key (object or PEM file); ``ca_file`` turns on TLS (the default
    whenever the address is not loopback: plaintext elsewhere needs ``insecure=True``). Heartbeats go out
    every ``heartbeat_s`` until the server sends its own interval at registration; with them (``heartbeat``)
    the node holds a presence stream open, whose end tells the server at once that the node is gone. ``base_updates`` is what
    every registration reports: how many base-weight updates the node's model holds (keep it current).
    Updates of at least ``bulk_min_bytes`` go over the server's bulk lane (``bulk``) when it offers one and
    ``bulk`` is on; over gRPC otherwise, or when the lane cannot be reached.
    """

    def __init__(
        self, address: str, node: str, *, key: Ed25519PrivateKey | str | Path | None = None,
        ca_file: str | Path | None = None, insecure: bool = False, fingerprint: str = "",
        encoding: EncodingSpec = "dense", chunk_size: int = DEFAULT_CHUNK_SIZE, limits: Limits | None = None,
        backoff: Backoff | None = None, heartbeat: bool = True, tls_server_name: str | None = None,
        heartbeat_s: float = 10.0, base_updates: int = 0, bulk: bool = True,
        bulk_min_bytes: int = BULK_MIN_BYTES,
    ) -> None:
        if ca_file is None:
            check_plaintext_allowed(address, insecure)
            if not is_loopback(address):
                log.warning("WARNING: node %s talks to %s in plaintext (insecure): its key signs in the open and its "
                            "updates travel unencrypted unless a proxy adds TLS", node, address)
        self.address, self.node, self.fingerprint = address, node, fingerprint
        self.key = load_node_key(key) if isinstance(key, str | Path) else key
        self.ca_file, self.tls_server_name = ca_file, tls_server_name
        self.encoding, self.chunk_size, self.limits = encoding, chunk_size, limits
        self.backoff = backoff or Backoff()
        self.heartbeat_enabled = heartbeat
        self.heartbeat_interval_s = heartbeat_s
        self.base_updates = base_updates
        self.bulk, self.bulk_min_bytes = bulk, bulk_min_bytes
        self._bulk_port = 0  # what the last registration offered
        self.bytes_down = 0
        self._token: str | None = None
        self._channel: grpc.Channel | None = None
        self._stub: fpb_grpc.FederationStub | None = None
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._presence_thread: threading.Thread | None = None
        self._presence_call: grpc.Future | None = None

    # -- connection ---------------------------------------------------------------------------------
    def connect(self) -> Self:
        """Open the channel, register, start the heartbeat thread.

        Raises:
            AuthenticationError / PermissionDeniedError / ConfigMismatch: the server refused this node.
            ConnectionSetupError: the connection cannot work as configured (name lookup, TLS).
            TransportError: the server stayed unreachable through every retry.
        """
        ms = int(self.backoff.initial_s * 1000)
        options: list[tuple[str, int | str]] = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", ms), ("grpc.min_reconnect_backoff_ms", ms),
                   ("grpc.max_reconnect_backoff_ms", int(self.backoff.max_s * 1000))]
        if self.ca_file is not None:
            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            self._channel = grpc.secure_channel(self.address, channel_credentials(self.ca_file), options)
        else:
            self._channel = grpc.insecure_channel(self.address, options)
        self._stub = fpb_grpc.FederationStub(self._channel)
        # the streaming calls exchange pre-serialized frames (see ``wire``)
        self._get_instructions = self._channel.unary_stream(
            f"/{SERVICE}/GetInstructions", request_serializer=fpb.InstructionsRequest.SerializeToString,
            response_deserializer=_raw)
        self._submit_update = self._channel.stream_unary(
            f"/{SERVICE}/SubmitUpdate", request_serializer=_raw, response_deserializer=fpb.SubmitAck.FromString)
        self._retry(self.register, renew=False)
        if self.heartbeat_enabled and self._hb_thread is None:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.node}",
                                               daemon=True)
            self._hb_thread.start()
            self._presence_thread = threading.Thread(target=self._presence_loop, name=f"presence-{self.node}",
                                                     daemon=True)
            self._presence_thread.start()
        return self

    def register(self) -> None:
        """Signed-challenge registration; stores the session token. Raises: TransportError subclasses."""
        assert self._stub is not None, "connect() first"
        ch = self._stub.Challenge(fpb.ChallengeRequest(node=self.node))
        sig, pub = b"", b""
        if self.key is not None:
            sig = sign_challenge(self.key, ch.nonce, self.node)
            pub = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        rep = self._stub.Register(fpb.RegisterRequest(node=self.node, nonce=ch.nonce, signature=sig,
                                                      public_key=pub, config_fingerprint=self.fingerprint,
                                                      base_updates=self.base_updates))
        self._token = rep.session_token
        self.heartbeat_interval_s = rep.heartbeat_interval_s or self.heartbeat_interval_s
        self._bulk_port = rep.bulk_port if self.bulk else 0

    def report_base(self, held: int) -> None:
        """Register again, reporting that the node's model holds ``held`` base updates: the server rebuilds
        this node's pending instructions from there. Raises: as ``connect``."""
        self.base_updates = held
        self._retry(self.register, renew=False)

    def close(self) -> None:
        self._stop.set()
        call = self._presence_call
        if call is not None:
            call.cancel()
        for thread in (self._hb_thread, self._presence_thread):
            if thread is not None:
                thread.join(timeout=5)
        self._hb_thread = self._presence_thread = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------------------
    def _md(self) -> list[tuple[str, str]]:
        return [(SESSION_METADATA_KEY, self._token or "")]

    def _retry(self, call: Callable[[], _T], renew: bool = True, retry: Collection[grpc.StatusCode] = RETRYABLE) -> _T:
        attempt, renewed = 0, False
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if renew and not renewed and code == grpc.StatusCode.UNAUTHENTICATED:
                    renewed = True
                    self._retry(self.register, renew=False)
                    continue
                setup = setup_error(e, self.address, self.ca_file is not None)
                if setup is not None:
                    raise setup from None
                if code not in retry or attempt + 1 >= self.backoff.max_attempts:
                    raise _as_error(e) from None
                delay = self.backoff.delay(attempt)
                # debug: a caller with its own reconnect loop (the node) reports once it gives up
                log.debug("server %s unreachable (%s); retrying in %.1f s", self.address, code.name, delay)
                if self._stop.wait(delay):
                    raise TransportError("client closed while retrying", code) from None
                attempt += 1

    def poll(self, wait_s: float = 30.0) -> Instructions | None:
        """One long poll: instructions for this node, or ``None`` when none came within ``wait_s``.

        Raises:
            MessageRejected: the server sent a malformed or oversize stream.
            TransportError: as ``connect``.
        """
        def call() -> Instructions | None:
            assert self._stub is not None, "connect() first"
            stream = self._get_instructions(fpb.InstructionsRequest(wait_s=wait_s), metadata=self._md(),
                                            timeout=wait_s + 600)
            return frames_to_instructions(prefetch(self._count(stream)), self.limits)
        return self._retry(call)

    def _count(self, stream: Iterator[bytes]) -> Iterator[bytes]:
        for frame in stream:
            self.bytes_down += len(frame)
            yield frame

    def wait_for_instructions(self, timeout: float | None = None, poll_s: float = 30.0) -> Instructions | None:
        """Poll until instructions arrive; ``None`` after ``timeout`` seconds (``None``: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            left = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
            if left <= 0:
                return None
            instr = self.poll(left)
            if instr is not None:
                return instr
        return None

    def submit(self, reply: ClientReply, phase: str = "train") -> SubmitResult:
        """Stream ``reply`` (header, then tensors) to the server; retried whole on a broken connection.

        Raises:
            MessageRejected / PermissionDeniedError: the server refused the update (reason in the message).
            TransportError: as ``connect``.
        """
        size = nbytes(reply.state or {}) + nbytes(reply.mask or {})
        if self._bulk_port and reply.error is None and size >= self.bulk_min_bytes:
            # one try on the lane (a new session if the server restarted); if it cannot be reached, is busy or
            # breaks mid-upload (someone may be flooding it), the update goes over gRPC
            try:
                return self._retry(lambda: self._submit_bulk(reply, phase), retry=())
            except TransportError as e:
                if e.code not in RETRYABLE:
                    raise
                log.warning("bulk lane: %s; uploading over gRPC", clean(e.reason))
                if isinstance(e, LaneUnreachable):
                    self._bulk_port = 0  # until a registration offers the lane again
        sent = [0]

        def frames() -> Iterator[bytes]:
            sent[0] = 0
            for frame in prefetch(reply_to_frames(reply, phase, self.encoding, self.chunk_size)):
                sent[0] += len(frame)
                yield frame

        def call() -> SubmitResult:
            assert self._stub is not None, "connect() first"
            ack = self._submit_update(frames(), metadata=self._md())
            return SubmitResult(ack.accepted, ack.message, sent[0])
        return self._retry(call)

    def _submit_bulk(self, reply: ClientReply, phase: str) -> SubmitResult:
        assert self._token is not None, "connect() first"
        header = update_header(reply, phase).SerializeToString()
        ack, sent = upload(split_host(self.address), self._bulk_port, self._token, header,
                           reply_pieces(reply, self.encoding, self.chunk_size), ca_file=self.ca_file,
                           server_name=self.tls_server_name)
        return SubmitResult(ack.accepted, ack.message, sent)

    def heartbeat(self) -> RoundStatus:
        """Tell the server this node is alive; returns its round and phase. Raises: TransportError."""
        def call() -> RoundStatus:
            assert self._stub is not None, "connect() first"
            rep = self._stub.Heartbeat(fpb.HeartbeatRequest(), metadata=self._md(), timeout=30)
            return RoundStatus(rep.round, rep.phase)
        return self._retry(call)

    def status(self) -> tuple[RoundStatus, dict[str, float]]:
        """Round, phase and the seconds since each connected node was last seen. Raises: TransportError."""
        def call() -> tuple[RoundStatus, dict[str, float]]:
            assert self._stub is not None, "connect() first"
            rep = self._stub.Status(fpb.StatusRequest(), metadata=self._md(), timeout=30)
            return (RoundStatus(rep.round, rep.phase, dict(rep.detail)),
                    {c.node: c.seconds_since_seen for c in rep.clients})
        return self._retry(call)

    def _presence_loop(self) -> None:
        """Hold a presence stream open while the node runs, so that the server learns at once when its
        connection closes; opened again (after a short backoff) whenever it ends while the node runs on."""
        attempt = 0
        while not self._stop.is_set():
            assert self._channel is not None, "connect() first"
            opened = time.monotonic()
            call = self._channel.unary_stream(f"/{SERVICE}/Presence", request_serializer=_raw,
                                              response_deserializer=_raw)(b"", metadata=self._md())
            self._presence_call = call
            if self._stop.is_set():  # closed while the call was being made
                call.cancel()
                return
            try:
                for _ in call:
                    pass
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                    return  # a server without presence streams notices a lost node by its silence
            if time.monotonic() - opened > self.heartbeat_interval_s:
                attempt = 0
            # an ended session is renewed by the next heartbeat or call: try again soon after
            if self._stop.wait(min(self.backoff.delay(attempt), self.heartbeat_interval_s)):
                return
            attempt += 1

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat()
            except TransportError as e:
                log.warning("heartbeat of %s failed: %s", self.node, clean(e))
