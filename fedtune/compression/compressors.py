"""Compressors: pure functions from an update (plus the error-feedback residual) to what a client sends.

Each takes ``{name: tensor}`` in float64 (the update plus the residual) and returns what is sent in float32
and the same thing at full shape (what the receiver rebuilds). What is sent is a fixed point of the method's
wire encoding (``fedtune.compression.config.wire_encoding``): top-k / threshold are copies of float32
entries (``sparse_coo``), sign is +-s per block of ``compress.block`` (``sign``, ``sign_b<block>``), int8 / int4 are integer codes times a
power-of-two scale per block (``int8_pow2`` / ``int4_pow2``, the codec's own quantizer). So the receiver
decodes bit for bit what the sender subtracted from its residual. Random-k sends only the k values; the
indices come from a seed both sides know (the client's seed of the round and the tensor's name).

With ``compress.pack`` every tensor is compressed and sent as one flat vector (``PACKED``: the tensors in name
order, each flattened), ``compress_state`` / ``expand_state``; the receiver cuts it back by the shapes it holds.
"""

from __future__ import annotations

import math
import zlib

import torch

from fedtune.compression.config import BLOCK, CompressConfig
from fedtune.transport.encodings import Pow2Blocks

State = dict[str, torch.Tensor]
_QUANT = {"int8": Pow2Blocks(8, BLOCK), "int4": Pow2Blocks(4, BLOCK)}


def k_of(numel: int, c: CompressConfig) -> int:
    """Entries sent of ``numel`` (top-k / random-k): ``compress.count`` or the fraction, at least 1."""
    k = c.count if c.count > 0 else round(c.fraction * numel)
    return max(1, min(numel, k)) if numel else 0


def randk_indices(numel: int, k: int, seed: int, name: str) -> torch.Tensor:
    """The k indices (sorted) random-k sends for tensor ``name``: the same on the client and the server."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
    return torch.randperm(numel, generator=gen)[:k].sort().values


def _keep(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.float32)
    out[idx] = flat[idx].float()
    return out.reshape(x.shape)


def _topk_global(acc: State, k: int) -> State:
    names = list(acc)
    flat = torch.cat([acc[n].reshape(-1) for n in names])
    idx = flat.abs().topk(k, sorted=False).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[idx] = True
    out, start = {}, 0
    for n in names:
        m = acc[n].numel()
        out[n] = _keep(acc[n], torch.nonzero(chosen[start:start + m], as_tuple=True)[0])
        start += m
    return out


def _sign(x: torch.Tensor, block: int) -> torch.Tensor:
    """+-s per block of ``block`` values, s the block's mean magnitude (EF-signSGD's scaled sign)."""
    flat = x.reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat.abs(), (0, -n % block)).reshape(-1, block)
    counts = torch.full((padded.shape[0],), float(block), dtype=padded.dtype)
    if n % block:
        counts[-1] = n % block
    s = (padded.sum(dim=1) / counts).float().repeat_interleave(block)[:n]
    return torch.where(torch.signbit(flat), -s, s).reshape(x.shape)


def _quantize(x: torch.Tensor, codec: Pow2Blocks, gen: torch.Generator | None) -> torch.Tensor:
    x32 = x.float()
    noise = None
    if gen is not None:
        rows = -(-x32.numel() // BLOCK)
        noise = torch.rand(rows, BLOCK, generator=gen)
    e, q = codec.quantize(x32, BLOCK, noise)
    return codec.dequantize(e, q, x32.numel()).reshape(x.shape)


def compress(acc: State, c: CompressConfig, seed: int) -> tuple[State, State]:
    """What is sent of ``acc`` (float64 update plus residual) and that at full shape, both float32.

    ``seed``: random-k's indices and stochastic rounding's noise (the client's seed of the round).
    """
    if c.method == "topk" and c.scope == "global":
        total = sum(t.numel() for t in acc.values())
        kept = _topk_global(acc, k_of(total, c)) if total else {n: t.float() for n, t in acc.items()}
        return kept, kept
    gen = torch.Generator().manual_seed(seed % 2**62) if c.stochastic else None
    sent: State = {}
    full: State = {}
    for name, x in acc.items():
        n = x.numel()
        if c.method == "topk":
            full[name] = _keep(x, x.reshape(-1).abs().topk(k_of(n, c), sorted=False).indices if n else
                               torch.zeros(0, dtype=torch.long))
        elif c.method == "threshold":
            full[name] = torch.where(x.abs() >= c.threshold, x, torch.zeros_like(x)).float()
        elif c.method == "randk":
            idx = randk_indices(n, k_of(n, c), seed, name)
            sent[name] = x.reshape(-1)[idx].float()
            full[name] = _keep(x, idx)
            continue
        elif c.method == "sign":
            full[name] = _sign(x, c.block)
        else:
            full[name] = _quantize(x, _QUANT[c.method], gen)
        sent[name] = full[name]
    return sent, full


PACKED = "packed"
"""The one wire tensor of a packed delta (``compress.pack``)."""


def _layout(state: State) -> list[tuple[str, torch.Size]]:
    return [(n, state[n].shape) for n in sorted(state)]


def unpack(flat: torch.Tensor, like: State) -> State:
    """``flat`` cut into ``like``'s tensors (name order, each flattened): what ``PACKED`` holds.

    Raises:
        ValueError: ``flat`` is not a 1-D vector of exactly ``like``'s count of values.
    """
    layout = _layout(like)
    total = sum(math.prod(shape) for _, shape in layout)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"packed delta of shape {tuple(flat.shape)}, expected ({total},): one value per entry of "
                         f"the {len(layout)} tensors")
    parts = flat.split([math.prod(shape) for _, shape in layout]) if layout else []
    return {n: part.reshape(shape) for (n, shape), part in zip(layout, parts, strict=True)}


def compress_state(acc: State, c: CompressConfig, seed: int) -> tuple[State, State]:
    """``compress``, or with ``compress.pack`` the tensors compressed as one flat vector: what is sent
    (``{PACKED: vector}``) and that back at each tensor's shape."""
    if not c.pack:
        return compress(acc, c, seed)
    layout = _layout(acc)
    flat = torch.cat([acc[n].reshape(-1) for n, _ in layout]) if layout else torch.zeros(0, dtype=torch.float64)
    sent, full = compress({PACKED: flat}, c, seed)
    return sent, unpack(full[PACKED], acc)


def expand_state(sent: State, like: State, c: CompressConfig, seed: int) -> State:
    """Each tensor of ``sent`` (a delta ``compress_state`` made) at the shape of its tensor in ``like``.

    Raises:
        ValueError: a tensor ``like`` does not hold, a shape or count this method cannot have sent, or with
            ``compress.pack`` anything but one packed vector of all of ``like``'s values.
    """
    if c.pack:
        if set(sent) != {PACKED}:
            raise ValueError(f"compress.pack: expected one packed delta {PACKED!r}, got tensors {sorted(sent)[:3]}")
        total = sum(t.numel() for t in like.values())
        return unpack(expand(sent[PACKED], torch.zeros(total), PACKED, c, seed), like)
    out = {}
    for name, d in sent.items():
        base = like.get(name)
        if base is None:
            raise ValueError(f"delta of tensor {name!r}, which was not sent")
        out[name] = expand(d, base, name, c, seed)
    return out


def expand(sent: torch.Tensor, like: torch.Tensor, name: str, c: CompressConfig, seed: int) -> torch.Tensor:
    """What the sender meant by ``sent`` for a tensor shaped ``like`` (random-k: its values back in place).

    Raises:
        ValueError: a shape or count that this method cannot have sent.
    """
    if c.method != "randk":
        if tuple(sent.shape) != tuple(like.shape):
            raise ValueError(f"tensor {name!r}: shape {tuple(sent.shape)}, expected {tuple(like.shape)}")
        return sent
    k = k_of(like.numel(), c)
    if tuple(sent.shape) != (k,):
        raise ValueError(f"tensor {name!r}: randk sent {sent.numel()} values of shape {tuple(sent.shape)}, "
                         f"expected ({k},)")
    out = torch.zeros(like.numel(), dtype=sent.dtype)
    out[randk_indices(like.numel(), k, seed, name)] = sent
    return out.reshape(like.shape)
