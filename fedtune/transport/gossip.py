"""The gossip peer service (protos/fedtune/v1/gossip.proto): what one peer offers its neighbours, and the
calls it makes to theirs.

A peer *posts* its adapter at each (round, exchange) it reaches on its ``Board``; a neighbour's ``Fetch`` of
that (round, exchange) is answered from the board, waiting for the post until the caller's deadline when the
peer is not there yet. Posts are encoded once, as a node's update (``UpdateHeader`` with phase
``gossip/<exchange>``, then the tensor chunks of ``fedtune.transport.codec``), and served to every neighbour
from the same frames. ``PeerLink.fetch`` decodes what a neighbour sends with the coordinator path's decoder
(``messages.frames_to_reply``: digests, declared sizes against ``Limits`` before any allocation, finite
values) and checks the header names the expected peer, round and exchange; anything else is refused with the
reason, as data (``FetchResult``), never raised into the round.

Security: with ``tls`` (``PeerTLS``) both ends present certificates signed by the federation CA (mutual TLS,
``fedtune keys DIR --peers``): the caller checks the server's certificate carries the neighbour's name, the
server reads the caller's name from its certificate and answers only names on the allow-list that are not
revoked (the list is re-read when it changes). Without TLS (loopback, or ``gossip.insecure``) names are taken
at their word.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedtune.transport._proto import gossip_pb2 as gpb
from fedtune.transport.client import setup_error
from fedtune.transport.codec import Limits
from fedtune.transport.errors import ConnectionSetupError, MessageRejected
from fedtune.transport.keys import read_allowlist
from fedtune.transport.messages import frames_to_reply, reply_to_frames
from fedtune.transport.server import GRPC_OPTIONS, _raw, check_port_free, parsed
from fedtune.types import ClientReply, State
from fedtune.untrusted import MAX_NAME, clean

log = logging.getLogger(__name__)
SERVICE = "fedtune.v1.Gossip"
KEEP_ROUNDS = 2
"""Posts of this many rounds are kept (the current and the previous one): a neighbour never lags more."""


def phase_of(exchange: int) -> str:
    return f"gossip/{exchange}"


def exchange_frames(node: str, round: int, exchange: int, state: State, num_examples: int) -> list[bytes]:
    """``node``'s adapter at (round, exchange) as it goes to a neighbour: an update header with phase
    ``gossip/<exchange>`` and the dense tensor chunks. The simulator counts the bytes of the same frames."""
    reply = ClientReply(client_id=node, round=round, state=state, num_examples=num_examples)
    return list(reply_to_frames(reply, phase_of(exchange), "dense"))


def exchange_bytes(node: str, round: int, exchange: int, state: State, num_examples: int) -> int:
    """The size of ``exchange_frames`` (what one neighbour's fetch of this adapter moves)."""
    return sum(len(f) for f in exchange_frames(node, round, exchange, state, num_examples))


@dataclass(frozen=True)
class PeerTLS:
    """A peer's side of mutual TLS: the federation CA, its own certificate and key, and the allow-list."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    allowlist_file: Path


class Board:
    """What this peer has posted, by (round, exchange), and where it is (see the module docstring)."""

    def __init__(self, node: str, rounds: int) -> None:
        self.node, self.rounds = node, rounds
        self.round, self.done = 0, False
        self._posts: dict[tuple[int, int], list[bytes]] = {}
        self._fetched: dict[tuple[int, int], set[str]] = {}
        self.bytes_served = 0
        """Bytes of posts handed to neighbours' fetches so far (whole or in part), over the whole run."""
        self._cond = threading.Condition()

    def enter(self, round: int) -> None:
        """This peer is in ``round`` now (``Where`` says so); older posts than the previous round go."""
        with self._cond:
            self.round = round
            for key in [k for k in self._posts if k[0] <= round - KEEP_ROUNDS]:
                del self._posts[key]
            self._cond.notify_all()

    def post(self, round: int, exchange: int, state: State, num_examples: int) -> None:
        """Offer ``state`` as this peer's adapter at (round, exchange), encoded once for every neighbour."""
        frames = exchange_frames(self.node, round, exchange, state, num_examples)
        with self._cond:
            self._posts[(round, exchange)] = frames
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def take(self, round: int, exchange: int, caller: str, timeout: float) -> list[bytes] | str:
        """The frames posted at (round, exchange), waiting up to ``timeout`` s; or why there are none."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frames = self._posts.get((round, exchange))
                if frames is not None:
                    return frames
                if round < self.round - KEEP_ROUNDS + 1 or (round <= self.round and self.done):
                    return f"{self.node} is in round {self.round}: round {round} is gone"
                if round > self.rounds:
                    return f"{self.node} runs {self.rounds} rounds, not {round}"
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"{self.node} did not reach round {round} exchange {exchange} in time"
                self._cond.wait(left)

    def served(self, round: int, exchange: int, caller: str, nbytes: int, whole: bool) -> None:
        """``caller``'s fetch of (round, exchange) moved ``nbytes`` (``whole``: all of the post)."""
        with self._cond:
            self.bytes_served += nbytes
            if whole:
                self._fetched.setdefault((round, exchange), set()).add(caller)
            self._cond.notify_all()

    def wait_fetched(self, round: int, exchange: int, callers: set[str], timeout: float) -> set[str]:
        """Wait until every one of ``callers`` fetched (round, exchange), or ``timeout``; who did not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                missing = callers - self._fetched.get((round, exchange), set())
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(min(left, 0.2))


class AllowedPeers:
    """Names on the allow-list that are not revoked, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path, self._mtime, self._names = path, -1.0, frozenset[str]()
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        with self._lock:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._names = frozenset(e.node for e in read_allowlist(self.path).values()
                                        if not e.revoked and not e.observer)
                self._mtime = mtime
            return name in self._names


class GossipServicer:
    """``Fetch`` and ``Where`` over a ``Board``; only ``peers`` (and, with TLS, allow-listed names) are served."""

    def __init__(self, board: Board, peers: set[str], allowlist: Path | None) -> None:
        self.board, self.peers = board, peers
        self.allowed = AllowedPeers(allowlist) if allowlist is not None else None
        self.refused: list[str] = []

    def _caller(self, claimed: str, context: grpc.ServicerContext) -> str:
        """The caller's name: from its certificate with TLS (its claim must agree), else as claimed."""
        name = clean(claimed, MAX_NAME)
        if self.allowed is not None:
            names = context.auth_context().get("x509_common_name") or []
            cert_name = names[0].decode("utf-8", "replace") if names else ""
            if cert_name != claimed:
                self._refuse(context, f"the certificate names {clean(cert_name, MAX_NAME)!r}, the call {name!r}")
            if cert_name not in self.allowed:
                self._refuse(context, f"peer {name!r} is not on the allow-list (or revoked)")
        if claimed not in self.peers:
            self._refuse(context, f"{name!r} is not one of this gossip's peers (gossip.peers)")
        return claimed

    def _refuse(self, context: grpc.ServicerContext, why: str) -> None:
        log.warning("refused a gossip call from %s: %s", clean(context.peer(), MAX_NAME), why)
        self.refused.append(why)
        del self.refused[:-100]
        context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def Fetch(self, request: gpb.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        caller = self._caller(request.node, context)
        left = context.time_remaining()
        frames = self.board.take(request.round, request.exchange, caller, 60.0 if left is None else max(left, 0.0))
        if isinstance(frames, str):
            context.abort(grpc.StatusCode.NOT_FOUND, frames)
            return
        sent = 0
        try:
            for frame in frames:
                yield frame
                sent += len(frame)
        finally:  # counted as handed to gRPC, also when the caller goes away in the middle
            self.board.served(request.round, request.exchange, caller, sent, whole=sent == sum(map(len, frames)))

    def Where(self, request: gpb.WhereRequest, context: grpc.ServicerContext) -> gpb.WhereReply:
        self._caller(request.node, context)
        b = self.board
        return gpb.WhereReply(node=b.node, round=b.round, rounds=b.rounds, done=b.done)


def _handlers(servicer: GossipServicer) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Fetch": grpc.unary_stream_rpc_method_handler(parsed(servicer.Fetch, gpb.FetchRequest), _raw, _raw),
        "Where": grpc.unary_unary_rpc_method_handler(parsed(servicer.Where, gpb.WhereRequest), _raw,
                                                     gpb.WhereReply.SerializeToString),
    }


@dataclass
class PeerServer:
    grpc_server: grpc.Server
    servicer: GossipServicer
    port: int

    def stop(self, grace: float | None = 1.0) -> None:
        self.grpc_server.stop(grace).wait()


def start_peer_server(board: Board, address: str, peers: set[str], tls: PeerTLS | None,
                      max_workers: int = 16) -> PeerServer:
    """Serve ``board`` on ``address`` (mutual TLS with ``tls``, else plaintext).

    Raises:
        OSError: the port is in use or the address is not this machine's (naming gossip.listen).
    """
    try:
        check_port_free(address)
    except OSError as e:
        raise OSError(str(e).replace("server.address (or --address)", "gossip.listen or this peer's gossip.peers "
                                     "entry")) from None
    servicer = GossipServicer(board, peers, tls.allowlist_file if tls is not None else None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _handlers(servicer)),))
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                                                root_certificates=tls.ca_file.read_bytes(), require_client_auth=True)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address!r}: choose another address in gossip.listen")
    server.start()
    return PeerServer(server, servicer, port)


@dataclass
class FetchResult:
    """A neighbour's adapter, or why there is none (it did not answer in time, refused us, sent bad data)."""

    peer: str
    reply: ClientReply | None = None
    error: str | None = None
    bytes: int = 0


def _why(e: grpc.RpcError, setup: ConnectionSetupError | None) -> str:
    """A failed fetch in words: a connection that cannot work (TLS, name lookup), no answer, or a refusal."""
    if setup is not None:
        return f"cannot connect ({setup.kind}): {clean(str(setup))}"
    code, details = e.code(), clean(e.details() or "", 300)  # type: ignore[attr-defined]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer in time"
    if code == grpc.StatusCode.UNAVAILABLE:  # down, or (a closed socket with TLS) refusing our certificate
        return f"did not answer in time ({details})"
    return f"{code.name}: {details}"


class PeerLink:
    """Calls to one neighbour ``peer`` at ``address`` as ``me``."""

    def __init__(self, me: str, peer: str, address: str, tls: PeerTLS | None, limits: Limits) -> None:
        self.me, self.peer, self.address, self.limits = me, peer, address, limits
        self.allowed = AllowedPeers(tls.allowlist_file) if tls is not None else None
        self.tls = tls is not None
        options: list[tuple[str, Any]] = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200),
                                          ("grpc.min_reconnect_backoff_ms", 200),
                                          ("grpc.max_reconnect_backoff_ms", 1000)]
        if tls is not None:
            options.append(("grpc.ssl_target_name_override", peer))  # its certificate must carry its name
            creds = grpc.ssl_channel_credentials(tls.ca_file.read_bytes(), tls.key_file.read_bytes(),
                                                 tls.cert_file.read_bytes())
            self.channel = grpc.secure_channel(address, creds, options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self._fetch = self.channel.unary_stream(f"/{SERVICE}/Fetch", request_serializer=gpb.FetchRequest.SerializeToString,
                                                response_deserializer=_raw)
        self._where = self.channel.unary_unary(f"/{SERVICE}/Where", request_serializer=gpb.WhereRequest.SerializeToString,
                                               response_deserializer=gpb.WhereReply.FromString)

    def fetch(self, round: int, exchange: int, timeout: float, wait: bool = True) -> FetchResult:
        """The neighbour's adapter at (round, exchange), within ``timeout`` s. ``wait``: wait for the
        neighbour to come up (else a refused connection fails at once)."""
        if self.allowed is not None and self.peer not in self.allowed:
            return FetchResult(self.peer, error="not asked: it is not on the allow-list (or revoked)")
        seen = 0

        def counted(frames: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal seen
            for f in frames:
                seen += len(f)
                yield f

        deadline = time.monotonic() + timeout
        request = gpb.FetchRequest(round=round, exchange=exchange, node=self.me)
        while True:  # a peer not up yet is waited for; one whose TLS cannot work is reported at once
            try:
                call = self._fetch(request, timeout=max(deadline - time.monotonic(), 0.0))
                reply = frames_to_reply(counted(call), self.limits, phase_of(exchange))
                break
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                setup = setup_error(e, self.address, self.tls)
                if code == grpc.StatusCode.UNAVAILABLE and setup is None and wait and time.monotonic() < deadline - 0.2:
                    time.sleep(0.2)
                    continue
                return FetchResult(self.peer, error=_why(e, setup), bytes=seen)
            except MessageRejected as e:
                return FetchResult(self.peer, error=f"refused its adapter: {e.reason}", bytes=seen)
        if (reply.client_id, reply.round) != (self.peer, round):
            return FetchResult(self.peer, error=f"refused its adapter: it is {clean(reply.client_id, MAX_NAME)!r} "
                                                f"round {reply.round}, expected {self.peer!r} round {round}", bytes=seen)
        return FetchResult(self.peer, reply=reply, bytes=seen)

    def where(self, timeout: float) -> tuple[int, bool] | None:
        """The round the neighbour is in and whether it is done, or None when it does not answer within
        ``timeout`` s."""
        try:
            reply = self._where(gpb.WhereRequest(node=self.me), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(reply.round), bool(reply.done)

    def close(self) -> None:
        self.channel.close()
