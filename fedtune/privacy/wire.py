"""How secure aggregation's messages ride on the ordinary round messages: JSON in a uint8 tensor of a reply,
JSON-safe values in ``Instructions.extra``, the masked vector as a uint32 tensor. Bounded and checked: a
blob from the network is data, never code."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.privacy.secagg import identity_public
from fedtune.types import State

MAX_BLOB = 64 * 2**20
PHASES = ("secagg_advertise", "secagg_share", "secagg_upload", "secagg_unmask")


def blob(obj: Any) -> State:
    """``obj`` as JSON in a uint8 tensor (a reply's ``state``)."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    return {"secagg": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def unblob(state: State | None) -> Any:
    """The JSON a reply carries. Raises ValueError for anything else (missing, too large, not JSON)."""
    t = (state or {}).get("secagg")
    if t is None or t.dtype != torch.uint8 or t.ndim != 1:
        raise ValueError("no secure-aggregation message in the reply")
    if t.numel() > MAX_BLOB:
        raise ValueError(f"secure-aggregation message of {t.numel()} bytes, over the {MAX_BLOB}-byte limit")
    try:
        return json.loads(bytes(t.numpy().tobytes()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"secure-aggregation message is not JSON ({exc.__class__.__name__})") from None


def unflat(vector: np.ndarray, like: State, keys: list[str]) -> State:
    out, at = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = torch.from_numpy(np.ascontiguousarray(vector[at:at + n])).float().reshape(like[k].shape)
        at += n
    return out


@functools.lru_cache(maxsize=2**16)
def sim_identity(seed: int, cid: str) -> Ed25519PrivateKey:
    """A virtual client's Ed25519 identity, derived from the run's seed: in a simulation the seed stands in
    for the keys each site would hold and the allow-list of the others' public keys."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"fedtune-sim-identity|{seed}|{cid}".encode()).digest())


@functools.lru_cache(maxsize=2**16)
def sim_public(seed: int, cid: str) -> bytes:
    """The public key of ``sim_identity(seed, cid)`` (cached: every neighbour checks it every round)."""
    return identity_public(sim_identity(seed, cid))
