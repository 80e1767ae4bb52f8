"""Secure aggregation with dropouts (Bonawitz et al. 2017) over a k-regular neighbour graph (SecAgg+, Bell et
al. 2020), as pure functions and two small state holders: no torch, no transport, no strategy.

One round, four phases (``SecAggClient`` on each client, ``SecAggServer`` on the server):

1. advertise: each client makes two X25519 key pairs (``c`` to encrypt shares, ``s`` to agree masks) and
   signs both public keys, the round and its id with its Ed25519 identity; the server relays the adverts.
2. share keys: each client checks every neighbour's signature against the identity it trusts (a server
   that substitutes a key is detected), draws a self-mask seed ``b``, splits ``b`` and its ``s`` secret key
   t-of-k with Shamir over the prime field 2^521 - 1, and encrypts each neighbour's two shares with
   ChaCha20-Poly1305 under HKDF(X25519(c_i, c_j)); the server only relays ciphertexts.
3. masked upload: ``y_i = x_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(HKDF(X25519(s_i, s_j)))`` in
   Z_2^32, where ``x_i`` is the fixed-point update (``quantize``) and PRG is AES-256-CTR keyed with the full
   256-bit derived key (not a 32-bit seed into a non-cryptographic generator). The server adds the ``y_i``.
4. unmask: each survivor sends, for each neighbour, the share of ``b`` (the neighbour uploaded) or of the
   ``s`` key (it dropped out), never both; the server rebuilds them from any t shares and removes the
   self masks of the survivors and the pair masks between survivors and dropped clients.

Fewer than ``t`` shares for a secret the sum needs raise ``SecAggAbort``: the round fails cleanly, nothing is
revealed. The server object holds adverts, ciphertexts and the running sum of masked vectors only; it
never sees an unmasked update (tests instrument it).
"""

from __future__ import annotations

import json
import math
import random
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every 256-bit secret."""
MODULUS_BITS = 32
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecAggAbort(ValueError):
    """The round cannot finish securely (fewer than t clients or shares): it fails, revealing nothing."""


class KeySubstitution(ValueError):
    """A relayed public key whose signature does not verify against the peer's identity."""


# ------------------------------------------------------------------ fixed point, PRG, Shamir


def fixed_point_scale(bound: float, clients: float) -> float:
    """The scale that lets ``clients`` values each in [-bound, bound] add up in Z_2^32 without wrapping
    (``clients`` may include headroom for noise: a float)."""
    return (2 ** (MODULUS_BITS - 1) - 1) / (bound * max(clients, 1))


def quantize(x: np.ndarray, scale: float, *, overwrite: bool = False) -> np.ndarray:
    """``round(x * scale)`` as uint32 (two's complement of negative values). ``overwrite``: ``x`` (float64)
    may be used as the scratch space (its values are lost), saving a vector-sized array.

    Raises:
        ValueError: a value outside the signed 32-bit range (or not finite): ``scale`` does not fit ``x``.
    """
    if overwrite and x.dtype == np.float64:
        v = np.multiply(x, scale, out=x)
    else:
        v = np.multiply(x, scale, dtype=np.float64)
    np.rint(v, out=v)
    if v.size and not (-(2**31) <= v.min() and v.max() < 2**31):  # NaN fails both comparisons
        raise ValueError(f"fixed point: values outside the 32-bit range at scale {scale:g} (or not finite)")
    return v.astype(np.int32).view(np.uint32)


def dequantize(total: np.ndarray, scale: float) -> np.ndarray:
    """The float sum from a uint32 sum of quantized values (read as signed)."""
    return total.astype(np.uint32).view(np.int32).astype(np.float64) / scale


def _encryptor(key: bytes) -> Any:
    """AES-256-CTR keyed with the 32-byte ``key``, counter from 0 (every key masks once)."""
    if len(key) != 32:
        raise ValueError(f"a mask key has 32 bytes, got {len(key)}")
    return Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()


def _keystream(key: bytes, words: int) -> Iterator[tuple[int, np.ndarray]]:
    """The keystream of ``key`` as ``(first word, uint32 chunk)`` pairs of one reused cache-sized buffer: the
    cipher writes into it with ``update_into`` and the chunk is a view, so no mask-sized array is allocated
    or copied."""
    enc = _encryptor(key)
    buf = np.empty(_CHUNK_WORDS + 16, dtype=np.uint32)  # update_into wants room past the data
    view = memoryview(buf.data).cast("B")
    for start in range(0, words, _CHUNK_WORDS):
        n = min(_CHUNK_WORDS, words - start)
        enc.update_into(_ZEROS[:4 * n], view)
        yield start, buf[:n]


def prg(key: bytes, words: int) -> np.ndarray:
    """``words`` uint32 of the mask keyed with ``key`` (the keystream ``add_mask`` adds)."""
    out = np.empty(words, dtype=np.uint32)
    for start, chunk in _keystream(key, words):
        out[start:start + chunk.size] = chunk
    return out


def add_masks(y: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> np.ndarray:
    """``y += sum(sign * prg(key, y.size))`` over ``masks`` (``(key, sign)`` pairs) modulo 2^32, in place
    (``y`` is uint32).

    AES-256-CTR (the full 256-bit HKDF output as key, never a 32-bit seed into a non-cryptographic generator)
    with the CPU's AES instructions. ``y`` is walked once, one cache-sized chunk at a time, and every mask's
    keystream for that chunk is written into one reused buffer and added while both are in cache: a client's
    k + 1 masks (the server's self and dropped-pair masks) cost one pass over ``y``, and no mask-sized array
    is allocated (``benchmarks/privacy.py``: over 5x numpy's ``RandomState``).
    """
    streams = [(_encryptor(key), np.add if sign > 0 else np.subtract) for key, sign in masks]
    buf = np.empty(_CHUNK_WORDS + 16, dtype=np.uint32)  # update_into wants room past the data
    view = memoryview(buf.data).cast("B")
    for start in range(0, y.size, _CHUNK_WORDS):
        n = min(_CHUNK_WORDS, y.size - start)
        seg, chunk = y[start:start + n], buf[:n]
        for enc, op in streams:
            enc.update_into(_ZEROS[:4 * n], view)
            op(seg, chunk, out=seg)
    return y


def add_mask(y: np.ndarray, key: bytes, sign: int = 1) -> np.ndarray:
    """``y += sign * prg(key, y.size)`` modulo 2^32, in place (``add_masks`` with one mask)."""
    return add_masks(y, [(key, sign)])


_CHUNK_WORDS = 2**16  # 256 KiB of keystream: stays in the core's L2 cache while it is added
_ZEROS = memoryview(bytes(4 * _CHUNK_WORDS))


def shamir_split(secret: int, t: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares ``{x: p(x)}`` of ``secret`` (< PRIME) with a random polynomial of degree t - 1."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must be below the field's prime")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def shamir_combine(shares: Mapping[int, int], t: int) -> int:
    """The secret from any ``t`` of its shares (Lagrange interpolation at 0).

    Raises:
        SecAggAbort: fewer than ``t`` shares.
    """
    if len(shares) < t:
        raise SecAggAbort(f"{len(shares)} shares, {t} needed")
    points = sorted(shares.items())[:t]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


def neighbours(ids: Iterable[str], k: int, seed: int) -> dict[str, list[str]]:
    """A k-regular graph over ``ids`` (k rounded up to even): the ids shuffled by ``seed`` on a ring, each
    joined to the k/2 on either side; everyone to everyone when k >= len(ids) - 1."""
    ring = sorted(ids)
    random.Random(seed).shuffle(ring)
    n = len(ring)
    if k >= n - 1:
        return {c: sorted(set(ring) - {c}) for c in ring}
    half = (k + 1) // 2
    return {c: sorted({ring[(i + d) % n] for d in range(-half, half + 1) if d != 0}) for i, c in enumerate(ring)}


def default_neighbours(n: int) -> int:
    """SecAgg+'s O(log n) degree: 2 ceil(log2 n) + 2, capped at n - 1."""
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))) + 2)


# ------------------------------------------------------------------ keys


def _kdf(shared: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(shared)


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def _signed(round: int, cid: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"fedtune-secagg/1|" + str(round).encode() + b"|" + cid.encode() + b"|" + c_pk + s_pk


def identity_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


@dataclass(frozen=True)
class Advert:
    """A client's public keys for one round, signed with its identity."""

    cid: str
    c_pk: bytes
    s_pk: bytes
    sig: bytes

    def verify(self, round: int, identity: bytes) -> None:
        """Raises ``KeySubstitution`` unless ``identity`` signed these keys for ``round``."""
        try:
            Ed25519PublicKey.from_public_bytes(identity).verify(self.sig, _signed(round, self.cid, self.c_pk, self.s_pk))
        except (InvalidSignature, ValueError):
            raise KeySubstitution(f"the public keys relayed for {self.cid[:64]!r} are not signed by its identity "
                                  "(a substituted key: the server or the network is tampering)") from None

    def to_plain(self) -> dict[str, str]:
        return {"cid": self.cid, "c_pk": self.c_pk.hex(), "s_pk": self.s_pk.hex(), "sig": self.sig.hex()}

    @classmethod
    def from_plain(cls, d: Mapping[str, str]) -> Advert:
        return cls(str(d["cid"]), bytes.fromhex(d["c_pk"]), bytes.fromhex(d["s_pk"]), bytes.fromhex(d["sig"]))


def _sign(a: str, b: str) -> int:
    return 1 if a < b else -1


def pair_mask_key(own_s: X25519PrivateKey, peer_s_pk: bytes, round: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _kdf(own_s.exchange(X25519PublicKey.from_public_bytes(peer_s_pk)), f"mask|{round}|{lo}|{hi}")


# ------------------------------------------------------------------ client


@dataclass
class SecAggClient:
    """One client's side of one round. ``to_plain`` / ``from_plain`` keep it between phases as hex strings."""

    cid: str
    round: int
    identity: Ed25519PrivateKey
    c_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    b: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    adverts: dict[str, Advert] = field(default_factory=dict)
    held: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Shares other clients gave this one: ``{from: {"b": [x, y], "s": [x, y]}}``."""
    revealed: set[str] = field(default_factory=set)
    share_keys_by_peer: dict[str, bytes] = field(default_factory=dict)
    """The ChaCha20-Poly1305 key of each neighbour's shares (HKDF of the ``c`` agreement, the same both ways),
    derived when sharing and kept for decrypting the shares received in the upload phase."""
    participants: int = 0
    """How many clients the server named in the share phase (the Shamir x of each): the most that can share
    distributed DP's noise, so what a client checks the noise the server asks of it against."""

    def advertise(self) -> Advert:
        c_pk, s_pk = _pub(self.c_sk), _pub(self.s_sk)
        return Advert(self.cid, c_pk, s_pk, self.identity.sign(_signed(self.round, self.cid, c_pk, s_pk)))

    def share_keys(self, adverts: Mapping[str, Advert], identities: Mapping[str, bytes], xs: Mapping[str, int],
                   t: int) -> dict[str, bytes]:
        """Encrypted shares of ``b`` and the ``s`` key for each neighbour in ``adverts`` (``xs``: every
        participant's Shamir x).

        Raises:
            KeySubstitution: a neighbour's keys are not signed by the identity this client trusts for it.
            SecAggAbort: fewer than ``t`` neighbours (its secrets could not be rebuilt).
        """
        for cid, ad in adverts.items():
            if cid not in identities:
                raise KeySubstitution(f"no trusted identity for {cid[:64]!r}")
            if ad.cid != cid:
                raise KeySubstitution(f"the advert relayed for {cid[:64]!r} names {ad.cid[:64]!r}")
            ad.verify(self.round, identities[cid])
        peers = {c: a for c, a in adverts.items() if c != self.cid}
        if len(peers) < t:
            raise SecAggAbort(f"{len(peers)} neighbours advertised keys, the threshold is {t}")
        self.adverts = dict(peers)
        self.participants = len(xs)
        ids = sorted(peers)
        s_raw = self.s_sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
        b_sh = shamir_split(int.from_bytes(self.b, "big"), t, [xs[c] for c in ids])
        s_sh = shamir_split(int.from_bytes(s_raw, "big"), t, [xs[c] for c in ids])
        out = {}
        for c in ids:
            body = json.dumps({"from": self.cid, "to": c, "round": self.round,
                               "b": [xs[c], hex(b_sh[xs[c]])], "s": [xs[c], hex(s_sh[xs[c]])]}).encode()
            nonce = secrets.token_bytes(12)
            out[c] = nonce + self._aead(c).encrypt(nonce, body, self._ad(self.cid, c))
        return out

    def _aead(self, peer: str) -> ChaCha20Poly1305:
        key = self.share_keys_by_peer.get(peer)
        if key is None:
            lo, hi = sorted((self.cid, peer))
            shared = self.c_sk.exchange(X25519PublicKey.from_public_bytes(self.adverts[peer].c_pk))
            key = self.share_keys_by_peer[peer] = _kdf(shared, f"share|{self.round}|{lo}|{hi}")
        return ChaCha20Poly1305(key)

    def _ad(self, sender: str, to: str) -> bytes:
        return f"{self.round}|{sender}|{to}".encode()

    def masked(self, x: np.ndarray, inbox: Mapping[str, bytes], senders: Iterable[str]) -> np.ndarray:
        """``x`` (uint32) masked with the self mask and a pair mask per neighbour in ``senders`` (the
        clients that shared keys); keeps the shares in ``inbox`` (ciphertexts addressed to this client).

        Raises:
            ValueError: a share that does not decrypt or is not for this client and round.
        """
        for sender, blob in inbox.items():
            if sender not in self.adverts:
                raise ValueError(f"a share from {sender[:64]!r}, not a neighbour")
            try:
                body = json.loads(self._aead(sender).decrypt(blob[:12], blob[12:], self._ad(sender, self.cid)))
            except (InvalidTag, ValueError):
                raise ValueError(f"the share from {sender[:64]!r} does not decrypt (tampered)") from None
            if body.get("from") != sender or body.get("to") != self.cid or body.get("round") != self.round:
                raise ValueError(f"the share from {sender[:64]!r} is addressed to another client or round")
            self.held[sender] = {"b": [int(body["b"][0]), int(body["b"][1], 16)],
                                 "s": [int(body["s"][0]), int(body["s"][1], 16)]}
        masks = [(self.b, 1)] + [
            (pair_mask_key(self.s_sk, self.adverts[peer].s_pk, self.round, self.cid, peer), _sign(self.cid, peer))
            for peer in senders if peer != self.cid and peer in self.adverts]
        return add_masks(np.array(x, dtype=np.uint32), masks)

    def unmask(self, survivors: Iterable[str], dropped: Iterable[str]) -> dict[str, dict[str, list[int]]]:
        """For each neighbour whose shares this client holds: the share of ``b`` if it survived, of its ``s``
        key if it dropped out.

        Raises:
            ValueError: a client named both survivor and dropped (asking for both would unmask it).
        """
        alive, gone = set(survivors), set(dropped)
        both = alive & gone
        if both:
            raise ValueError(f"{min(both)[:64]!r} is named both survivor and dropped: refusing to reveal both")
        out = {}
        for peer, sh in self.held.items():
            kind = "b" if peer in alive else "s" if peer in gone else None
            if kind is None:
                continue
            if peer in self.revealed:
                raise ValueError(f"already revealed a share of {peer[:64]!r} this round")
            self.revealed.add(peer)
            out[peer] = {kind: sh[kind]}
        return out

    def to_plain(self) -> dict[str, object]:
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return {"cid": self.cid, "round": self.round, "c_sk": self.c_sk.private_bytes(*raw).hex(),
                "s_sk": self.s_sk.private_bytes(*raw).hex(), "b": self.b.hex(),
                "adverts": {c: a.to_plain() for c, a in self.adverts.items()},
                "held": {c: {k: [v[0], hex(v[1])] for k, v in h.items()} for c, h in self.held.items()},
                "revealed": sorted(self.revealed), "participants": self.participants,
                "share_keys": {c: k.hex() for c, k in self.share_keys_by_peer.items()}}

    @classmethod
    def from_plain(cls, d: Mapping[str, object], identity: Ed25519PrivateKey) -> SecAggClient:
        def text(key: str) -> str:
            return str(d[key])

        adverts, held, revealed = d.get("adverts") or {}, d.get("held") or {}, d.get("revealed") or []
        keys = d.get("share_keys") or {}
        if not (isinstance(adverts, dict) and isinstance(held, dict) and isinstance(revealed, list)
                and isinstance(keys, dict)):
            raise ValueError("damaged secure-aggregation state")  # noqa: TRY004 (a failed reply)
        return cls(cid=text("cid"), round=int(text("round")), identity=identity,
                   c_sk=X25519PrivateKey.from_private_bytes(bytes.fromhex(text("c_sk"))),
                   s_sk=X25519PrivateKey.from_private_bytes(bytes.fromhex(text("s_sk"))),
                   b=bytes.fromhex(text("b")),
                   adverts={c: Advert.from_plain(a) for c, a in adverts.items()},
                   held={c: {k: [int(v[0]), int(v[1], 16)] for k, v in h.items()} for c, h in held.items()},
                   revealed={str(r) for r in revealed}, participants=int(str(d.get("participants", 0))),
                   share_keys_by_peer={str(c): bytes.fromhex(str(k)) for c, k in keys.items()})


# ------------------------------------------------------------------ server


@dataclass
class SecAggServer:
    """The server's side of one round: relays, a running sum, and the unmasking. Never an unmasked update."""

    round: int
    t: int
    k: int
    seed: int
    adverts: dict[str, Advert] = field(default_factory=dict)
    graph: dict[str, list[str]] = field(default_factory=dict)
    inboxes: dict[str, dict[str, bytes]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    total: np.ndarray | None = None

    def _need(self, have: int, what: str) -> None:
        if have < self.t:
            raise SecAggAbort(f"round {self.round}: {have} clients {what}, secure aggregation needs at least "
                              f"t = {self.t}; the round fails and nothing is revealed")

    def take_adverts(self, adverts: Iterable[Advert]) -> dict[str, list[str]]:
        """Record the adverts (U1); returns each client's neighbours among them."""
        self.adverts = {a.cid: a for a in adverts}
        self._need(len(self.adverts), "advertised keys")
        self.graph = neighbours(self.adverts, self.k, self.seed)
        return self.graph

    def xs(self) -> dict[str, int]:
        """Every participant's Shamir x coordinate (1-based, by sorted id)."""
        return {c: i + 1 for i, c in enumerate(sorted(self.adverts))}

    def neighbour_adverts(self, cid: str) -> dict[str, Advert]:
        return {c: self.adverts[c] for c in self.graph[cid]}

    def take_shares(self, sent: Mapping[str, Mapping[str, bytes]]) -> None:
        """Record each sender's ciphertexts (U2), to relay to their addressees."""
        self.shared = sorted(sent)
        self._need(len(self.shared), "shared keys")
        for sender, blobs in sent.items():
            for to, blob in blobs.items():
                if to in self.graph.get(sender, []):
                    self.inboxes.setdefault(to, {})[sender] = blob

    def inbox(self, cid: str) -> dict[str, bytes]:
        return {s: b for s, b in self.inboxes.get(cid, {}).items() if s in self.shared}

    def senders(self, cid: str) -> list[str]:
        """The neighbours ``cid`` masks with: those that shared keys."""
        return [c for c in self.graph.get(cid, []) if c in self.shared]

    def add(self, cid: str, y: np.ndarray) -> None:
        """Add one masked vector (U3) to the running sum; the vector itself is not kept."""
        if cid not in self.shared or cid in self.uploaded:
            raise ValueError(f"unexpected masked vector from {cid[:64]!r}")
        y = np.asarray(y, dtype=np.uint32)
        if self.total is not None and y.shape != self.total.shape:
            raise ValueError(f"masked vector of {cid[:64]!r} has {y.size} words, expected {self.total.size}")
        if self.total is None:
            self.total = y.copy()
        else:
            self.total += y
        self.uploaded.append(cid)

    def dropped(self) -> list[str]:
        return [c for c in self.shared if c not in self.uploaded]

    def unmask(self, answers: Mapping[str, Mapping[str, Mapping[str, list[int]]]]) -> np.ndarray:
        """The sum of the survivors' vectors from the survivors' shares (``{responder: {peer: {"b"|"s": [x, y]}}}``).

        Raises:
            SecAggAbort: fewer than t uploads, or fewer than t shares for a secret the sum needs.
        """
        self._need(len(self.uploaded), "uploaded masked vectors")
        assert self.total is not None
        alive, gone = set(self.uploaded), set(self.dropped())
        shares: dict[tuple[str, str], dict[int, int]] = {}
        for responder, per_peer in answers.items():
            if responder not in alive:
                continue
            for peer, given in per_peer.items():
                if responder not in self.graph.get(peer, []):
                    continue
                for kind, (x, y) in given.items():
                    if (kind == "b" and peer in alive) or (kind == "s" and peer in gone):
                        shares.setdefault((peer, kind), {})[int(x)] = int(y)
        masks = [(self._rebuild(shares, u, "b").to_bytes(32, "big"), -1) for u in sorted(alive)]
        for u in sorted(gone):
            s_sk = X25519PrivateKey.from_private_bytes(self._rebuild(shares, u, "s").to_bytes(32, "big"))
            # each survivor v added sign(v, u) * mask: take it away
            masks += [(pair_mask_key(s_sk, self.adverts[v].s_pk, self.round, u, v), -_sign(v, u))
                      for v in self.graph[u] if v in alive]
        return add_masks(self.total.copy(), masks)

    def _rebuild(self, shares: Mapping[tuple[str, str], dict[int, int]], u: str, kind: str) -> int:
        got = shares.get((u, kind), {})
        if len(got) < self.t:
            what = "self-mask seed" if kind == "b" else "mask key"
            raise SecAggAbort(f"round {self.round}: {len(got)} shares of the {what} of {u[:64]!r}, t = {self.t} "
                              "needed; the round fails and nothing is revealed")
        return shamir_combine(got, self.t)


def threshold(k: int, fraction: float) -> int:
    """Shares needed to rebuild a secret shared among ``k`` neighbours: more than ``fraction`` of them, and at
    least 2 (one survivor's "sum" would be its own update)."""
    return max(2, min(k, math.floor(fraction * k) + 1))
