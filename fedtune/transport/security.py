"""Channel security and node authentication.

TLS is the default. Plaintext is allowed only on loopback addresses, or with an explicit ``insecure=True``
(for example behind a TLS-terminating proxy). Nodes authenticate with a signed challenge: ``Challenge``
returns a fresh nonce, the node signs ``b"fedtune/v1/register\\0" + nonce + node`` with its Ed25519 key and
``Register`` checks the signature against the public key listed for that node in the server's allow-list
file. The allow-list is re-read when it changes, so revoking a node takes effect on its next call.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.transport.errors import AuthenticationError, InsecureTransportError, PermissionDeniedError
from fedtune.transport.keys import AllowEntry, read_allowlist

SIGN_PREFIX = b"fedtune/v1/register\x00"
SESSION_METADATA_KEY = "x-fedtune-session"


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


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS credentials of the server from PEM files. Raises: FileNotFoundError."""
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def channel_credentials(ca_file: str | Path) -> grpc.ChannelCredentials:
    """TLS credentials of a node, trusting only the federation's CA. Raises: FileNotFoundError."""
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())


def sign_challenge(key: Ed25519PrivateKey, nonce: bytes, node: str) -> bytes:
    """The signature a node sends to ``Register``."""
    return key.sign(SIGN_PREFIX + nonce + node.encode())


@dataclass
class Session:
    node: str
    token: str
    last_seen: float


class NodeAuth:
    """Challenges, allow-list checks and sessions of the server.

    With ``allowlist_file=None`` every node name is accepted without a signature: only for loopback tests
    and simulation, never for a real federation.
    """

    def __init__(self, allowlist_file: str | Path | None, nonce_ttl_s: float = 60.0) -> None:
        self.allowlist_file = Path(allowlist_file) if allowlist_file else None
        self.nonce_ttl_s = nonce_ttl_s
        self._lock = threading.Lock()
        self._nonces: dict[bytes, tuple[str, float]] = {}
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
        """Raises: AuthenticationError (unknown), PermissionDeniedError (revoked)."""
        if self.allowlist_file is None:
            return None
        self._reload()
        entry = self._allow.get(node)
        if entry is None:
            raise AuthenticationError(f"node {node!r} is not in the server's allow-list")
        if entry.revoked:
            raise PermissionDeniedError(f"node {node!r} has been revoked")
        return entry

    def challenge(self, node: str) -> bytes:
        """A fresh single-use nonce for ``node``. Raises: AuthenticationError, PermissionDeniedError."""
        with self._lock:
            self._check_listed(node)
            now = time.monotonic()
            self._nonces = {n: v for n, v in self._nonces.items() if v[1] > now}
            nonce = secrets.token_bytes(32)
            self._nonces[nonce] = (node, now + self.nonce_ttl_s)
            return nonce

    def register(self, node: str, nonce: bytes, signature: bytes, public_key: bytes) -> Session:
        """Check the signed nonce and open a session (replacing any earlier one of the node).

        Raises:
            AuthenticationError: unknown node, unknown/expired/reused nonce, wrong key or bad signature.
            PermissionDeniedError: revoked node.
        """
        with self._lock:
            entry = self._check_listed(node)
            issued = self._nonces.pop(nonce, None)
            if issued is None or issued[0] != node or issued[1] < time.monotonic():
                raise AuthenticationError("unknown, expired or reused challenge nonce; request a new one")
            if entry is not None:
                if public_key and public_key != entry.public_key:
                    raise AuthenticationError(f"public key of {node!r} does not match the allow-list")
                try:
                    Ed25519PublicKey.from_public_bytes(entry.public_key).verify(
                        signature, SIGN_PREFIX + nonce + node.encode())
                except (InvalidSignature, ValueError):
                    raise AuthenticationError(f"bad challenge signature for node {node!r}") from None
            for token, s in list(self._sessions.items()):
                if s.node == node:
                    del self._sessions[token]
            session = Session(node=node, token=secrets.token_urlsafe(32), last_seen=time.time())
            self._sessions[session.token] = session
            return session

    def session(self, token: str | None) -> Session:
        """The live session of ``token``, touched. Raises: AuthenticationError, PermissionDeniedError."""
        with self._lock:
            s = self._sessions.get(token or "")
            if s is None:
                raise AuthenticationError("unknown or expired session: register again")
            self._check_listed(s.node)
            if token not in self._sessions:  # dropped by an allow-list reload just now
                raise PermissionDeniedError(f"node {s.node!r} has been revoked")
            s.last_seen = time.time()
            return s

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())
