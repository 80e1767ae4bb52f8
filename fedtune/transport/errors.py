"""Errors raised by the transport. Each carries the gRPC status code a server answers with."""

from __future__ import annotations

import grpc

from fedtune.untrusted import clean

MAX_REASON = 2000
"""Characters of a transport error's reason (longer ones are cut, saying how much)."""


class TransportError(Exception):
    """Base class of every transport failure; ``code`` is the gRPC status the peer sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        # a reason often quotes what a peer sent: bounded and without control characters wherever it goes
        # (the peer's status details, logs, a round's failures in metrics.jsonl)
        reason = clean(reason, MAX_REASON)
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class MessageRejected(TransportError):
    """A message from a peer is malformed, inconsistent, oversize or not finite; ``reason`` says which."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AuthenticationError(TransportError):
    """The peer is unknown or failed the signed challenge."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(TransportError):
    """The peer is known but not allowed to take part (revoked, or refused by the coordinator)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InsecureTransportError(TransportError):
    """Plaintext was requested for a non-loopback address without the explicit insecure flag."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigMismatch(TransportError):
    """The node's model / quantization / adapter fingerprint differs from the server's."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConnectionSetupError(TransportError):
    """The connection cannot work as configured, so retrying cannot help: ``kind`` says why.

    ``dns``: the server's host name does not resolve; ``tls_hostname``: the server's certificate does not
    list the host connected to; ``tls_ca``: the certificate is not signed by the given CA; ``tls_plaintext``:
    TLS was asked of a server that speaks plaintext; ``plaintext_tls``: plaintext was sent to a TLS server;
    ``tls``: another TLS handshake failure.
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind
