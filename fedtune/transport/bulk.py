"""The bulk lane: updates streamed over a plain TCP (or TLS) socket next to the gRPC service.

gRPC Python copies every message twice on receipt and once more on sending (bytes objects in, bytes
objects out), which held a 1 GiB upload to about a third of what the loopback carries. On this lane the
node sends each tensor's bytes straight from its memory (``sendall`` of a memoryview) and the server
receives them straight into the decoded tensor's buffer (``recv_into``), so an upload costs the kernel's
copies, the digest and the checks. Everything else is the gRPC path's: the node authenticates with the
session token its signed registration gave it, the header is an ``UpdateHeader`` and every tensor a
``TensorMeta`` followed by its payload in chunks (digest, declared sizes, limits and finiteness checked by
the same ``TensorDecoder``), the same coordinator consumes it under the same concurrent-upload bound,
and a refusal carries a gRPC status code and reason. The server offers the lane in ``RegisterReply``
(``bulk_port``); a node that cannot reach it uses gRPC.

One upload per connection, all integers little-endian::

    node -> server   MAGIC, u16 token length, token (UTF-8)
    server -> node   OK | ERROR
    node -> server   HEADER, then per tensor META and DATA records, then END
    server -> node   ACK (a serialized SubmitAck) | ERROR

    record := u8 kind, u32 length, body    (DATA: the body is ``length`` payload bytes)
    ERROR body := u8 gRPC status code, UTF-8 reason
"""

from __future__ import annotations

import logging
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import tensor_pb2 as tpb
from fedtune.transport.codec import DecodedTensor, TensorDecoder
from fedtune.transport.errors import MessageRejected, TransportError
from fedtune.untrusted import clean, failure

log = logging.getLogger(__name__)
MAGIC = b"FTBULK1\n"
HEADER, META, DATA, END, OK, ACK, ERROR = range(1, 8)
_RECORD = struct.Struct("<BI")
MAX_SMALL_RECORD = 1 << 20
"""Largest HEADER / META / ACK / ERROR body (DATA is bounded by the tensor's declared size)."""
MAX_TOKEN_LEN = 256
IO_TIMEOUT_S = 120.0
"""The node's bound on a silent server mid-upload (the server cuts a silent node after its ``idle_s``)."""
HANDSHAKE_S = 5.0
"""From accept to a session token read (TLS handshake included): a connection slower than this is dropped."""
MAX_UNAUTHENTICATED = 64
"""Connections that have not shown a valid token yet: a cap of their own, so that anyone who can reach the
port cannot take the slots of authenticated uploads (a refused node uploads over gRPC instead)."""
LINGER_S = 2.0
LINGER_MAX_BYTES = 64 << 20
"""After refusing an upload, what the server still reads (and drops) so that its answer arrives."""
CONNECT_TIMEOUT_S = 10.0
ADMISSION_TIMEOUT_S = 900.0
"""How long a node waits to be admitted (longer than the server's upload queue timeout)."""


class LaneError(grpc.RpcError):
    """A failure on the bulk lane, shaped like gRPC's so callers retry and map it the same way."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LaneUnreachable(TransportError):
    """No connection to the bulk lane could be opened (a firewall, or the server is down)."""

    code = grpc.StatusCode.UNAVAILABLE


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def recv_exact(sock: Any, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: Any, view: memoryview) -> None:
    """Fill ``view`` from ``sock``. Raises: ConnectionError when the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {len(view)} bytes")
        got += n


def send_record(sock: Any, kind: int, body: bytes = b"") -> None:
    sock.sendall(_RECORD.pack(kind, len(body)) + body)


def read_record_head(sock: Any) -> tuple[int, int]:
    """(kind, length) of the next record."""
    return _RECORD.unpack(recv_exact(sock, _RECORD.size))


def read_small(sock: Any, n: int, what: str) -> bytes:
    if n > MAX_SMALL_RECORD:
        raise MessageRejected(f"{what} of {n} bytes exceeds the limit of {MAX_SMALL_RECORD}")
    return bytes(recv_exact(sock, n))


def error_body(code: grpc.StatusCode, reason: str) -> bytes:
    return bytes([code.value[0]]) + reason.encode()[:MAX_SMALL_RECORD - 1]


def lane_error(body: bytes) -> LaneError:
    code = _CODES.get(body[0], grpc.StatusCode.UNKNOWN) if body else grpc.StatusCode.UNKNOWN
    return LaneError(code, body[1:].decode(errors="replace"))


# ------------------------------------------------------------------------------------------ server


class BulkListener:
    """Accepts bulk-lane connections on ``host:port`` (0: any free port) and hands each upload to
    ``submit(token, header_bytes, tensors, received)`` (the servicer) on a thread of its own.

    ``ssl_context``: TLS with the gRPC server's certificate; None: plaintext (same rules as gRPC).
    Until a connection has shown a session token it costs no thread: one thread accepts every connection
    and runs its handshake (TLS, preamble, token) without blocking, and drops it after ``handshake_s``. At
    most ``max_unauthenticated`` connections may be at that stage: a new one takes the place of the oldest,
    so idle connections cannot keep a node that says who it is at once from the lane (it needs a few ms).
    A connection with a token gets a thread, and at most ``max_unauthenticated`` may be waiting for the
    servicer to check it; at most ``max_connections`` authenticated ones are open (the servicer admits one
    per node, and only nodes asked for an update); an authenticated upload whose node sends nothing for
    ``idle_s`` is cut.
    """

    def __init__(
        self, host: str, port: int, submit: Callable[..., fpb.SubmitAck], ssl_context: ssl.SSLContext | None,
        max_connections: int = 256, *, idle_s: float = IO_TIMEOUT_S, handshake_s: float = HANDSHAKE_S,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
    ) -> None:
        self._sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                          backlog=128)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._submit, self._ssl = submit, ssl_context
        self._slots = threading.BoundedSemaphore(max_connections)
        self._checking = threading.BoundedSemaphore(max_unauthenticated)
        self.idle_s, self.handshake_s, self.max_unauthenticated = idle_s, handshake_s, max_unauthenticated
        self.refused = 0
        """Connections dropped before they showed a token: their place was taken, or time ran out."""
        self.uploads = 0
        """Updates accepted over the lane so far."""
        self._count_lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._handshake_loop, name="bulk-handshakes", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _handshake_loop(self) -> None:
        """Accept connections and run their handshakes, all on this thread (``_Hello``)."""
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        pending: dict[int, _Hello] = {}  # in arrival order: the first is the oldest
        try:
            while not self._closed.is_set():
                now = time.monotonic()
                timeout = min([0.5, *(h.deadline - now for h in pending.values())])
                for key, _ in sel.select(max(0.0, timeout)):
                    if key.fileobj is self._sock:
                        self._accept(sel, pending)
                    elif (h := pending.get(key.fd)) is not None:
                        self._step(sel, pending, h)
                now = time.monotonic()
                for h in [h for h in pending.values() if h.deadline <= now]:
                    self._drop(sel, pending, h, "no session token within the handshake deadline"
                               if not h.refused else "")
        except (OSError, ValueError):  # the listener was closed
            pass
        finally:
            for h in list(pending.values()):
                self._drop(sel, pending, h, "")
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, pending: dict[int, _Hello]) -> None:
        for _ in range(64):  # a burst at a time, so that the connections already here progress too
            try:
                conn, peer = self._sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            if len(pending) >= self.max_unauthenticated:
                self._drop(sel, pending, next(iter(pending.values())), "its place was taken by a newer connection")
            sock: Any = conn
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            h = _Hello(sock, peer, time.monotonic() + self.handshake_s, tls=self._ssl is not None)
            pending[sock.fileno()] = h
            sel.register(sock, selectors.EVENT_READ)

    def _step(self, sel: selectors.BaseSelector, pending: dict[int, _Hello], h: _Hello) -> None:
        """Advance one handshake with what has arrived; hand it to a thread once its token is read."""
        try:
            if h.refused:  # drain what the node still sends, so that the refusal is not lost in a reset
                if not h.sock.recv(1 << 16):
                    self._drop(sel, pending, h, "")
                return
            token = h.advance()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except MessageRejected as e:
            self._note_drop(h.peer, e.reason)
            h.refuse(e.code, e.reason)
            h.deadline = min(h.deadline, time.monotonic() + LINGER_S)
            return
        except (OSError, ssl.SSLError) as e:  # a reset, a bad TLS hello, a connection closed early
            self._drop(sel, pending, h, f"{e}")
            return
        if token is None:
            return
        sel.unregister(h.sock)
        del pending[h.sock.fileno()]
        if not self._checking.acquire(blocking=False):
            self._note_drop(h.peer, "too many connections with a token waiting to be checked")
            h.sock.close()
            return
        h.sock.setblocking(True)
        threading.Thread(target=self._serve, args=(h.sock, h.peer, token, [h.received]), name="bulk-upload",
                         daemon=True).start()

    def _drop(self, sel: selectors.BaseSelector, pending: dict[int, _Hello], h: _Hello, why: str) -> None:
        pending.pop(h.sock.fileno(), None)
        try:
            sel.unregister(h.sock)
        except (KeyError, ValueError):
            pass
        _shutdown(h.sock)
        h.sock.close()
        if why:
            self._note_drop(h.peer, why)

    def _note_drop(self, peer: Any, why: str) -> None:
        with self._count_lock:
            self.refused += 1
            n = self.refused
        if n % 1000 == 1:  # a flood of idle connections must not flood the log
            log.warning("bulk lane: dropped %s before it showed a session token: %s (%d dropped so far)", peer,
                        clean(why), n)

    def _serve(self, sock: Any, peer: Any, token: str, received: list[int]) -> None:
        held = [self._checking]  # the bound this connection counts against: unchecked, then authenticated

        def authenticated() -> None:
            if not self._slots.acquire(blocking=False):
                raise TransportError("server busy: too many bulk uploads open, use gRPC",
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
            held[0] = self._slots
            self._checking.release()
            sock.settimeout(self.idle_s)

        try:
            sock.settimeout(self.handshake_s)
            ack = self._upload(sock, token, received, authenticated)
            with self._count_lock:
                self.uploads += 1
            send_record(sock, ACK, ack.SerializeToString())
        except TransportError as e:
            log.warning("bulk upload from %s refused: %s", peer, clean(e.reason))
            self._refuse(sock, e.code, e.reason)
        except (OSError, ssl.SSLError) as e:  # timeouts, resets: nothing to answer
            log.warning("bulk connection from %s dropped: %s", peer, clean(e))
        except Exception as e:  # noqa: BLE001 - logged with its traceback (untrusted.failure)
            log.error("bulk upload from %s failed: %s", peer, failure(e))
            self._refuse(sock, grpc.StatusCode.INTERNAL, "internal server error in bulk upload")
        finally:
            sock.close()
            held[0].release()

    @staticmethod
    def _refuse(sock: Any, code: grpc.StatusCode, reason: str) -> None:
        """Send the ERROR, then read and drop what the node still sends until it hangs up (a bounded
        while): closing with unread data would reset the connection and could destroy the ERROR in flight."""
        try:
            send_record(sock, ERROR, error_body(code, reason))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(LINGER_S)
            sink = bytearray(1 << 20)
            for _ in range(LINGER_MAX_BYTES >> 20):
                if not sock.recv_into(sink):
                    break
        except (OSError, ssl.SSLError):
            pass

    def _upload(self, sock: Any, token: str, received: list[int],
                authenticated: Callable[[], None]) -> fpb.SubmitAck:
        def ready() -> None:  # authenticated and admitted: let the node stream
            send_record(sock, OK)
        return self._submit(token, ready, lambda: self._header(sock, received), self._tensors(sock, received),
                            received, cancel=lambda: _shutdown(sock), authenticated=authenticated)

    @staticmethod
    def _header(sock: Any, received: list[int]) -> bytes:
        kind, n = read_record_head(sock)
        if kind != HEADER:
            raise MessageRejected("an update must start with an UpdateHeader")
        received[0] += _RECORD.size + n
        return read_small(sock, n, "update header")

    @staticmethod
    def _tensors(sock: Any, received: list[int]) -> Callable[[TensorDecoder], Iterator[DecodedTensor]]:
        """The update's tensors. A connection that closes mid-update is a node that went away (it may send
        again), as a cancelled gRPC stream is; an END before the last byte is a truncated update."""
        def read(decoder: TensorDecoder) -> Iterator[DecodedTensor]:
            while True:
                try:
                    kind, n = read_record_head(sock)
                except ConnectionError as e:
                    raise MessageRejected(f"update stream cancelled by the node: {e}") from None
                received[0] += _RECORD.size + n
                if kind == END:
                    decoder.close()
                    return
                if kind == META:
                    body = read_small(sock, n, "tensor metadata")
                    try:
                        meta = tpb.TensorMeta.FromString(body)
                    except DecodeError as e:
                        raise MessageRejected(f"malformed tensor metadata: {e}") from None
                    out = decoder.start(meta)
                elif kind == DATA:
                    if n == 0:
                        raise MessageRejected("an empty data record")
                    try:
                        out = decoder.fill(n, lambda view: recv_into_exact(sock, view))
                    except ConnectionError as e:
                        raise MessageRejected(f"update stream cancelled by the node: {e}") from None
                else:
                    raise MessageRejected(f"unexpected record kind {kind} in an update")
                if out is not None:
                    yield out
                    del out
        return read


class _Hello:
    """The handshake of one bulk-lane connection, advanced without blocking as bytes arrive: the TLS
    handshake (if any), then the preamble and the session token. A refusal is sent at once and the
    connection kept (drained) until the node hangs up or ``LINGER_S`` pass."""

    def __init__(self, sock: Any, peer: Any, deadline: float, tls: bool) -> None:
        self.sock, self.peer, self.deadline = sock, peer, deadline
        self.shaken = not tls
        self.buf = bytearray()
        self.refused = False

    @property
    def received(self) -> int:
        return len(self.buf)

    def advance(self) -> str | None:
        """Read what has arrived; the token once it is complete, else None.

        Raises:
            MessageRejected: not a fedtune bulk connection, or an oversize token.
            ssl.SSLWantReadError / BlockingIOError: nothing more to read yet.
            OSError: the connection broke or closed early.
        """
        if not self.shaken:
            self.sock.do_handshake()
            self.shaken = True
        while True:
            need = len(MAGIC) + 2
            if len(self.buf) >= need:
                (n,) = struct.unpack_from("<H", self.buf, len(MAGIC))
                if n > MAX_TOKEN_LEN:
                    raise MessageRejected(f"session token of {n} bytes exceeds {MAX_TOKEN_LEN}")
                need += n
                if len(self.buf) == need:
                    return bytes(self.buf[len(MAGIC) + 2:]).decode(errors="replace")
            got = self.sock.recv(need - len(self.buf))  # never past the token: the upload's bytes stay queued
            if not got:
                raise MessageRejected(f"not a fedtune bulk connection: it closed after {len(self.buf)} bytes")
            self.buf += got
            if not MAGIC.startswith(bytes(self.buf[:len(MAGIC)])):
                raise MessageRejected("not a fedtune bulk connection (bad preamble)")

    def refuse(self, code: grpc.StatusCode, reason: str) -> None:
        """Send the ERROR record (small: it fits the socket's buffer) and half-close; the caller drains."""
        self.refused = True
        try:
            self.sock.send(_RECORD.pack(ERROR, len(body := error_body(code, reason))) + body)
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, ssl.SSLError):
            pass


def _shutdown(sock: Any) -> None:
    """Break a connection another thread is blocked on (its recv returns or fails at once)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def server_ssl_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# ------------------------------------------------------------------------------------------ node


def upload(
    host: str, port: int, token: str, header: bytes, pieces: Iterator[tuple[bytes | None, memoryview]], *,
    ca_file: str | Path | None, server_name: str | None, timeout_s: float = IO_TIMEOUT_S,
) -> tuple[fpb.SubmitAck, int]:
    """Send one update; returns the server's ack and the bytes sent. ``pieces``: per chunk, the serialized
    ``TensorMeta`` on a tensor's first chunk (else None) and the payload bytes.

    Raises:
        LaneUnreachable: no connection could be opened.
        LaneError: the server refused the update (its status code and reason), or the connection broke
            (UNAVAILABLE, so the caller's backoff retries it).
    """
    try:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise LaneUnreachable(f"cannot reach the bulk lane at {host}:{port}: {e}") from None
    sock: Any = raw
    sent = 0
    try:
        raw.settimeout(timeout_s)
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            sock = ctx.wrap_socket(raw, server_hostname=server_name or host)
        tok = token.encode()
        sock.sendall(MAGIC + struct.pack("<H", len(tok)) + tok)
        sent += len(MAGIC) + 2 + len(tok)
        sock.settimeout(ADMISSION_TIMEOUT_S)  # the server holds a node here while its uploads are full
        _expect(sock, OK)
        sock.settimeout(timeout_s)
        send_record(sock, HEADER, header)
        sent += _RECORD.size + len(header)
        for meta, data in pieces:
            if meta is not None:
                send_record(sock, META, meta)
                sent += _RECORD.size + len(meta)
            if len(data):
                if _readable(sock):  # the server answered mid-stream: it refused the update
                    _expect(sock, ACK)
                sock.sendall(_RECORD.pack(DATA, len(data)))
                sock.sendall(data)
                sent += _RECORD.size + len(data)
        send_record(sock, END)
        sent += _RECORD.size
        return fpb.SubmitAck.FromString(_expect(sock, ACK)), sent
    except (OSError, ssl.SSLError) as e:
        # the server may have answered before closing (a rejected update): prefer its reason
        raise _pending_error(sock) or LaneError(grpc.StatusCode.UNAVAILABLE, f"bulk upload broke: {e}") from None
    finally:
        sock.close()


def _expect(sock: Any, kind: int) -> bytes:
    got, n = read_record_head(sock)
    body = read_small(sock, n, "server reply")
    if got == ERROR:
        raise lane_error(body)
    if got != kind:
        raise LaneError(grpc.StatusCode.INTERNAL, f"bulk lane: expected record {kind}, got {got}")
    return body


def _readable(sock: Any) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], 0)[0])


def _pending_error(sock: Any) -> LaneError | None:
    """An ERROR record the server sent before it closed the connection, if one can still be read."""
    try:
        sock.settimeout(2.0)
        kind, n = read_record_head(sock)
        if kind == ERROR:
            return lane_error(read_small(sock, n, "server reply"))
    except Exception:  # noqa: BLE001 - nothing readable: the connection broke
        return None
    return None
