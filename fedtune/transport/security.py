"""Channel security and node authentication.

TLS is the default. Plaintext is allowed only on loopback addresses, or with an explicit ``insecure=True``
(for example behind a TLS-terminating proxy). Nodes authenticate with a signed challenge: ``Challenge``
returns a fresh nonce, the node signs ``b"fedtune/v1/register\\0" + nonce + node`` with its Ed25519 key and
``Register`` checks the signature against the public key listed for that node in the server's allow-list
file. The allow-list is re-read when it changes, so revoking a node takes effect on its next call.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.names import name_problem
from fedtune.transport.errors import (
    AuthenticationError,
    InsecureTransportError,
    MessageRejected,
    PermissionDeniedError,
)
from fedtune.transport.keys import AllowEntry, read_allowlist

SIGN_PREFIX = b"fedtune/v1/register\x00"
SESSION_METADATA_KEY = "x-fedtune-session"
OBSERVER = "observer"
"""Config fingerprint a read-only peer (``fedtune status``) registers with: it never receives instructions."""
NONCE_BYTES = 32


def split_host(address: str) -> str:
    """Host part of ``host:port``, ``[v6]:port`` or a bare host."""
    if address.startswith("["):
        return address[1:address.index("]")]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def is_loopback(address: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (with or without a port)."""
    host = split_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(address: str, insecure: bool = False, side: str = "client") -> None:
    """Raises: InsecureTransportError when ``address`` is not loopback and ``insecure`` is not set; the
    message names the keys of ``side`` (``client`` or ``server``) to change."""
    if not insecure and not is_loopback(address):
        files = "ca.pem" if side == "client" else "server.pem, server.key"
        raise InsecureTransportError(
            f"refusing plaintext gRPC on {address!r}: set {side}.keys_dir to the folder made by `fedtune keys` "
            f"({files}), or set {side}.insecure = true (--insecure) if a proxy terminates TLS"
        )


def check_exposure(address: str, *, tls: bool, authenticated: bool, insecure: bool = False,
                   allow_anyone: bool = False) -> list[str]:
    """What a server on ``address`` risks, as warnings to log loudly; refuse what was not chosen explicitly.

    Off loopback, plaintext needs ``insecure`` (a proxy terminates TLS) and a server without an allow-list
    needs ``allow_anyone`` as well: anyone who reaches the port could join under any node name. Either
    choice is returned as a warning, for the operator's console and the log.

    Raises:
        InsecureTransportError: plaintext or no node authentication off loopback, without its flag.
    """
    if is_loopback(address):
        return []
    if not tls:
        check_plaintext_allowed(address, insecure, side="server")
    if not authenticated and not allow_anyone:
        raise InsecureTransportError(
            f"refusing to serve {address!r} without node authentication: anyone who reaches the port could join "
            "as any node. Give server.keys_dir (an allow-list from `fedtune keys`), or, on a network you trust, "
            "choose it explicitly with server.no_node_auth=true (--no-node-auth)")
    warnings = []
    if not tls:
        warnings.append(f"WARNING: plaintext gRPC on {address} (server.insecure): session tokens and updates "
                        "travel unencrypted unless a proxy terminates TLS in front of this server")
    if not authenticated:
        warnings.append(f"WARNING: no node authentication on {address} (server.no_node_auth): anyone who reaches "
                        "the port can join the federation under any node name")
    return warnings


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS credentials of the server from PEM files. Raises: FileNotFoundError."""
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def channel_credentials(ca_file: str | Path) -> grpc.ChannelCredentials:
    """TLS credentials of a node, trusting only the federation's CA. Raises: FileNotFoundError."""
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())


def sign_challenge(key: Ed25519PrivateKey, nonce: bytes, node: str) -> bytes:
    """The signature a node sends to ``Register``."""
    return key.sign(SIGN_PREFIX + nonce + node.encode())


def _check_name(node: str) -> None:
    problem = name_problem(node)
    if problem is not None:
        raise MessageRejected(problem)


@dataclass
class Session:
    node: str
    token: str
    last_seen: float
    created: float = 0.0
    lists_all: bool = False
    """May see every node through ``Status`` (the operator's observer key, or any observer without an
    allow-list)."""


class NodeAuth:
    """Challenges, allow-list checks and sessions of the server; the policies are the README's
    "Security" section:

    - ``Challenge`` answers every well-formed name alike, listed, unknown or revoked: its nonce is
      ``expiry | random | HMAC(server secret, expiry | random | node)``, so it costs the server no memory
      and tells an outsider nothing. Only a peer that signs the nonce with the listed key learns more
      (that it was revoked); anyone else gets one message for "unknown" and "wrong key".
    - A nonce opens at most one session: it is remembered as used once its signature checked out, until
      it expires. A failed attempt stores nothing.
    - ``register`` only checks; ``open_session`` replaces a node's session, and the servicer calls it after
      the coordinator admitted the node, so a refused registration leaves the live session alone.
    - Sessions expire after ``session_idle_s`` without a call and ``session_max_s`` after they opened;
      a node then registers again (``FederationClient`` does it by itself).

    With ``allowlist_file=None`` every node name is accepted without a signature: only for loopback tests
    and simulation, never for a real federation.
    """

    def __init__(self, allowlist_file: str | Path | None, nonce_ttl_s: float = 60.0,
                 session_idle_s: float = 600.0, session_max_s: float = 86400.0) -> None:
        self.allowlist_file = Path(allowlist_file) if allowlist_file else None
        self.nonce_ttl_s, self.session_idle_s, self.session_max_s = nonce_ttl_s, session_idle_s, session_max_s
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._used: dict[bytes, float] = {}  # nonces that opened a session -> their expiry (monotonic)
        self._sessions: dict[str, Session] = {}
        self._allow: dict[str, AllowEntry] = {}
        self._mtime: float | None = None
        self._reload()

    def _reload(self) -> None:
        if self.allowlist_file is None:
            return
        mtime = os.stat(self.allowlist_file).st_mtime
        if mtime != self._mtime:
            self._allow, self._mtime = read_allowlist(self.allowlist_file), mtime
            for token, s in list(self._sessions.items()):
                entry = self._allow.get(s.node)
                if entry is None or entry.revoked:
                    del self._sessions[token]

    def _check_listed(self, node: str) -> AllowEntry | None:
        """For a node holding a session. Raises: AuthenticationError (unlisted), PermissionDeniedError (revoked)."""
        if self.allowlist_file is None:
            return None
        self._reload()
        entry = self._allow.get(node)
        if entry is None:
            raise AuthenticationError(f"node {node!r} is not in the server's allow-list")
        if entry.revoked:
            raise PermissionDeniedError(f"node {node!r} has been revoked")
        return entry

    def _mac(self, body: bytes, node: str) -> bytes:
        return hmac.new(self._secret, body + node.encode(), hashlib.sha256).digest()[:NONCE_BYTES - len(body)]

    def challenge(self, node: str) -> bytes:
        """A fresh nonce for ``node``, the same kind of answer for every valid name (see the class docstring).

        Raises: MessageRejected (not a valid node name)."""
        _check_name(node)
        body = struct.pack(">d", time.monotonic() + self.nonce_ttl_s) + secrets.token_bytes(8)
        return body + self._mac(body, node)

    def register(self, node: str, nonce: bytes, signature: bytes, public_key: bytes) -> AllowEntry | None:
        """Check the signed nonce of ``node``; its allow-list entry (None without an allow-list). Opens no
        session: ``open_session`` does, once the node is admitted.

        Raises:
            AuthenticationError: an unknown, expired or reused nonce; or (one message for both) a node not
                on the allow-list or a key or signature that does not match the listed one.
            PermissionDeniedError: the listed key signed, but the node was revoked.
            MessageRejected: not a valid node name (``fedtune.names``), with or without an allow-list.
        """
        _check_name(node)
        now = time.monotonic()
        body = nonce[:16]
        if (len(nonce) != NONCE_BYTES or not hmac.compare_digest(nonce[16:], self._mac(body, node))
                or struct.unpack(">d", body[:8])[0] < now):
            raise AuthenticationError("unknown or expired challenge nonce; request a new one")
        with self._lock:
            self._reload()
            entry = self._allow.get(node) if self.allowlist_file is not None else None
            if self.allowlist_file is not None:
                # one message for both (a function, not a local: a raised local would be kept alive by its
                # own traceback's frame, and with it the gRPC call, until the next garbage collection)
                def refused() -> AuthenticationError:
                    return AuthenticationError(f"node {node!r} could not authenticate: it is not in the server's "
                                               "allow-list, or its key does not match the listed one")
                if entry is None or (public_key and public_key != entry.public_key):
                    raise refused()
                try:
                    Ed25519PublicKey.from_public_bytes(entry.public_key).verify(
                        signature, SIGN_PREFIX + nonce + node.encode())
                except (InvalidSignature, ValueError):
                    raise refused() from None
            self._used = {n: t for n, t in self._used.items() if t >= now}
            if nonce in self._used:
                raise AuthenticationError("reused challenge nonce; request a new one")
            self._used[nonce] = struct.unpack(">d", body[:8])[0]
            if entry is not None and entry.revoked:
                raise PermissionDeniedError(f"node {node!r} has been revoked")
            return entry

    def open_session(self, node: str, *, lists_all: bool = False) -> Session:
        """A new session of ``node`` (checked by ``register``), replacing any earlier one of the node."""
        with self._lock:
            self._expire_locked()
            for token, s in list(self._sessions.items()):
                if s.node == node:
                    del self._sessions[token]
            now = time.time()
            session = Session(node=node, token=secrets.token_urlsafe(32), last_seen=now, created=now,
                              lists_all=lists_all)
            self._sessions[session.token] = session
            return session

    def _expire_locked(self) -> None:
        now = time.time()
        for token, s in list(self._sessions.items()):
            if now - s.last_seen > self.session_idle_s or now - s.created > self.session_max_s:
                del self._sessions[token]

    def session(self, token: str | None) -> Session:
        """The live session of ``token``, touched. Raises: AuthenticationError, PermissionDeniedError."""
        with self._lock:
            self._expire_locked()
            s = self._sessions.get(token or "")
            if s is None:
                raise AuthenticationError("unknown or expired session: register again")
            self._check_listed(s.node)
            if token not in self._sessions:  # dropped by an allow-list reload just now
                raise PermissionDeniedError(f"node {s.node!r} has been revoked")
            s.last_seen = time.time()
            return s

    def current(self, token: str) -> bool:
        """Whether ``token`` is a live session (not expired, replaced or revoked); unlike ``session``, this
        does not count as a call of its node."""
        with self._lock:
            self._reload()
            self._expire_locked()
            return token in self._sessions

    def sessions(self) -> list[Session]:
        """The sessions that have not expired."""
        with self._lock:
            self._expire_locked()
            return list(self._sessions.values())
