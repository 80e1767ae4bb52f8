"""Tensor encodings of the wire format: how one tensor becomes a payload of bytes and back.

Every encoding is a small object with three functions: ``plan`` (payload size and parameters, cheap),
``encode`` (the payload) and ``decode`` (payload -> tensor, validating what the payload itself can get
wrong). ``expected_nbytes`` recomputes the payload size from the metadata alone so that the decoder can
reject an inconsistent declaration before it allocates anything. New encodings join through
``register_encoding``. Multi-byte values are little-endian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedtune.transport.errors import MessageRejected

Payload = bytearray | memoryview
"""A received payload: writable, so tensors can be made on it without a copy."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "bool": torch.bool, "uint32": torch.uint32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


@dataclass(frozen=True)
class Plan:
    """Size and parameters of one tensor's payload, known before the payload is built."""

    num_bytes: int
    block_size: int = 0
    nnz: int = 0
    value_dtype: str = ""
    scale: float = 0.0


@dataclass(frozen=True)
class Meta:
    """The decoded-side view of a TensorMeta: what ``decode`` and ``expected_nbytes`` read."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    block_size: int = 0
    nnz: int = 0
    value_dtype: str = ""
    scale: float = 0.0


class Encoding(Protocol):
    def plan(self, t: torch.Tensor) -> Plan: ...
    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview: ...
    def expected_nbytes(self, meta: Meta) -> int: ...
    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor: ...


def dtype_from_name(name: str) -> torch.dtype:
    """Raises: MessageRejected for a dtype the wire format does not know."""
    if name not in DTYPES:
        raise MessageRejected(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (C order) without a copy when ``t`` is already contiguous."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    arr: Any = flat.view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def _from_bytes(buf: Payload, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


class Dense:
    """Values in their own dtype (``wire_dtype=None``) or cast to a float dtype on the wire."""

    def __init__(self, wire_dtype: torch.dtype | None = None) -> None:
        self.wire_dtype = wire_dtype

    def _wire(self, dtype: torch.dtype) -> torch.dtype:
        return self.wire_dtype or dtype

    def plan(self, t: torch.Tensor) -> Plan:
        return Plan(num_bytes=t.numel() * self._wire(t.dtype).itemsize)

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        return raw_bytes(t.to(self._wire(t.dtype)))

    def expected_nbytes(self, meta: Meta) -> int:
        if self.wire_dtype is not None and meta.dtype not in FLOAT_DTYPES:
            raise MessageRejected(f"a {DTYPE_NAMES[meta.dtype]} tensor cannot be sent as a float encoding")
        return meta.numel * self._wire(meta.dtype).itemsize

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        t = _from_bytes(buf, self._wire(meta.dtype), meta.numel)
        return t.reshape(meta.shape).to(meta.dtype)


class Int8Blocks:
    """Symmetric int8 with one float32 scale per block: payload = scales[n_blocks] then values[numel].

    A block is at most the whole tensor (``block_size <= max(numel, 1)``, refused otherwise), and decoding
    touches each element once: its work is proportional to the payload, whatever the declared block size.
    """

    def __init__(self, block_size: int = 256) -> None:
        self.block_size = block_size

    def plan(self, t: torch.Tensor) -> Plan:
        bs = min(self.block_size, max(t.numel(), 1))
        return Plan(num_bytes=4 * math.ceil(t.numel() / bs) + t.numel(), block_size=bs)

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError("int8 encoding needs a float tensor")
        x = t.detach().reshape(-1).float()
        n, bs = x.numel(), plan.block_size
        padded = torch.nn.functional.pad(x, (0, math.ceil(n / bs) * bs - n)).reshape(-1, bs)
        scales = padded.abs().amax(dim=1) / 127.0
        q = torch.round(padded / scales.clamp_min(1e-30)[:, None]).clamp(-127, 127).to(torch.int8)
        return memoryview(bytes(raw_bytes(scales)) + bytes(raw_bytes(q.reshape(-1)[:n])))

    def expected_nbytes(self, meta: Meta) -> int:
        if meta.dtype not in FLOAT_DTYPES:
            raise MessageRejected("int8 encoding is for float tensors only")
        if not 1 <= meta.block_size <= max(meta.numel, 1):
            raise MessageRejected(f"int8 block_size {meta.block_size} out of range [1, {max(meta.numel, 1)}] "
                                  "(a block is at most the whole tensor)")
        return 4 * math.ceil(meta.numel / meta.block_size) + meta.numel

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        nb = math.ceil(meta.numel / meta.block_size)
        scales = _from_bytes(buf, torch.float32, nb)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise MessageRejected("int8 block scales must be finite and >= 0")
        q = _from_bytes(buf, torch.int8, meta.numel, offset=4 * nb)
        x, bs = q.float(), meta.block_size
        full = meta.numel // bs  # whole blocks, then the last partial one: one multiply per element
        x[: full * bs].view(full, bs).mul_(scales[:full, None])
        if full < nb:
            x[full * bs:].mul_(scales[full])
        return x.reshape(meta.shape).to(meta.dtype)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _check_sparse(meta: Meta) -> None:
    if meta.nnz > meta.numel:
        raise MessageRejected(f"sparse tensor: nnz {meta.nnz} > numel {meta.numel}")
    if meta.value_dtype != DTYPE_NAMES[meta.dtype]:
        raise MessageRejected(f"sparse value dtype {meta.value_dtype!r} != dtype {DTYPE_NAMES[meta.dtype]!r}")


class SparseCoo:
    """Nonzero coordinates of the flattened tensor: payload = indices[nnz] (int32, or int64 past 2^31
    elements; strictly increasing) then values[nnz] in the tensor's dtype."""

    def plan(self, t: torch.Tensor) -> Plan:
        nnz = int(torch.count_nonzero(t))
        itemsize = _index_dtype(t.numel()).itemsize + t.dtype.itemsize
        return Plan(num_bytes=nnz * itemsize, nnz=nnz, value_dtype=DTYPE_NAMES[t.dtype])

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        flat = t.detach().reshape(-1)
        idx = torch.nonzero(flat, as_tuple=True)[0]
        return memoryview(bytes(raw_bytes(idx.to(_index_dtype(t.numel())))) + bytes(raw_bytes(flat[idx])))

    def expected_nbytes(self, meta: Meta) -> int:
        _check_sparse(meta)
        return meta.nnz * (_index_dtype(meta.numel).itemsize + meta.dtype.itemsize)

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        it = _index_dtype(meta.numel)
        idx = _from_bytes(buf, it, meta.nnz).long()
        if meta.nnz and (int(idx[0]) < 0 or int(idx[-1]) >= meta.numel or bool((idx.diff() <= 0).any())):
            raise MessageRejected("sparse indices must be strictly increasing and inside the tensor")
        vals = _from_bytes(buf, meta.dtype, meta.nnz, offset=meta.nnz * it.itemsize)
        out = torch.zeros(meta.numel, dtype=meta.dtype)
        out[idx] = vals
        return out.reshape(meta.shape)


class SparseBitmap:
    """Payload = bitmap of nonzero coordinates (ceil(numel/8) bytes, little bit order) then values[nnz]."""

    def plan(self, t: torch.Tensor) -> Plan:
        nnz = int(torch.count_nonzero(t))
        return Plan(num_bytes=math.ceil(t.numel() / 8) + nnz * t.dtype.itemsize, nnz=nnz,
                    value_dtype=DTYPE_NAMES[t.dtype])

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        flat = t.detach().reshape(-1)
        nz = flat != 0
        bits = np.packbits(nz.numpy(), bitorder="little")
        return memoryview(bits.tobytes() + bytes(raw_bytes(flat[nz])))

    def expected_nbytes(self, meta: Meta) -> int:
        _check_sparse(meta)
        return math.ceil(meta.numel / 8) + meta.nnz * meta.dtype.itemsize

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        nbits = math.ceil(meta.numel / 8)
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=nbits), bitorder="little")
        if bits[meta.numel:].any() or int(bits.sum()) != meta.nnz:
            raise MessageRejected(f"sparse bitmap has {int(bits.sum())} set bits, header says nnz={meta.nnz}")
        mask = torch.from_numpy(bits[: meta.numel].astype(bool))
        out = torch.zeros(meta.numel, dtype=meta.dtype)
        out[mask] = _from_bytes(buf, meta.dtype, meta.nnz, offset=nbits)
        return out.reshape(meta.shape)


class Bitmap:
    """Bool tensors (pruning masks) as one bit each, little bit order: payload = ceil(numel/8) bytes. The
    header's ``nnz`` is the count of set bits, checked on decode, and the bits past ``numel`` must be 0.
    Other dtypes travel dense (``codec._choose``)."""

    def plan(self, t: torch.Tensor) -> Plan:
        return Plan(num_bytes=math.ceil(t.numel() / 8), nnz=int(torch.count_nonzero(t)), value_dtype="bool")

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        if t.dtype != torch.bool:
            raise ValueError("bitmap encoding needs a bool tensor")
        return memoryview(np.packbits(t.detach().reshape(-1).numpy(), bitorder="little").tobytes())

    def expected_nbytes(self, meta: Meta) -> int:
        if meta.dtype != torch.bool:
            raise MessageRejected("bitmap encoding is for bool tensors only")
        if not 0 <= meta.nnz <= meta.numel:
            raise MessageRejected(f"bitmap: nnz {meta.nnz} outside [0, numel {meta.numel}]")
        return math.ceil(meta.numel / 8)

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=math.ceil(meta.numel / 8)), bitorder="little")
        if bits[meta.numel:].any() or int(bits.sum()) != meta.nnz:
            raise MessageRejected(f"bitmap has {int(bits.sum())} set bits (or bits past the end), "
                                  f"header says nnz={meta.nnz}")
        return torch.from_numpy(bits[: meta.numel].astype(bool)).reshape(meta.shape)


class FixedU32:
    """uint32 vectors for secure aggregation. Integer tensors travel as-is (values must lie in
    [0, 2^32)); float tensors as round(x * scale) in two's complement, decoded as signed / scale."""

    def __init__(self, scale: float = 2.0**16) -> None:
        self.scale = scale

    def plan(self, t: torch.Tensor) -> Plan:
        return Plan(num_bytes=4 * t.numel(), scale=self.scale if t.dtype in FLOAT_DTYPES else 0.0)

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        flat = t.detach().reshape(-1)
        if t.dtype in FLOAT_DTYPES:
            q = torch.round(flat.double() * plan.scale)
            if bool((q.abs() >= 2**31).any()) or not bool(torch.isfinite(q).all()):
                raise ValueError(f"fixed_u32: values too large for scale {plan.scale}")
            v = q.long().numpy().astype(np.uint32)
        else:
            w = flat.long()
            if w.numel() and (int(w.min()) < 0 or int(w.max()) >= 2**32):
                raise ValueError("fixed_u32: integer values must lie in [0, 2^32)")
            v = w.numpy().astype(np.uint32)
        return memoryview(v.astype("<u4").tobytes())

    def expected_nbytes(self, meta: Meta) -> int:
        if meta.dtype in FLOAT_DTYPES and not (math.isfinite(meta.scale) and meta.scale > 0):
            raise MessageRejected(f"fixed_u32 float tensor needs a positive scale, got {meta.scale}")
        if meta.dtype not in FLOAT_DTYPES and meta.dtype not in (torch.int64, torch.uint32):
            raise MessageRejected("fixed_u32 decodes to a float, int64 or uint32 tensor")
        return 4 * meta.numel

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        v = np.frombuffer(buf, dtype="<u4", count=meta.numel)
        if meta.dtype in FLOAT_DTYPES:
            x = torch.from_numpy(v.view(np.int32).astype(np.float64) / meta.scale)
        else:
            x = torch.from_numpy(v.astype(np.int64))
        return x.to(meta.dtype).reshape(meta.shape)


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    """``x`` flattened, zero-padded to whole blocks of ``bs``, one row per block."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    return torch.nn.functional.pad(flat, (0, math.ceil(n / bs) * bs - n)).reshape(-1, bs)


MIN_EXP, MAX_EXP = -126, 127


def pow2_exponents(amax: torch.Tensor, levels: int) -> torch.Tensor:
    """Per block, the smallest e in [-126, 127] with amax / 2^e <= levels (so codes fit in [-levels, levels])."""
    mant, ex = torch.frexp(amax / levels)
    e = torch.where(mant == 0.5, ex - 1, ex)  # amax/levels = 2^(ex-1) exactly: that power itself
    return e.clamp(MIN_EXP, MAX_EXP).to(torch.int32)


class Pow2Blocks:
    """Symmetric integer codes in [-L, L] (L = 127 for 8 bits, 7 for 4 bits) with one power-of-two scale per
    block, sent as its int8 exponent: payload = exponents[n_blocks] then codes (int8 each, or two 4-bit
    two's-complement nibbles per byte, low nibble first).

    A power-of-two scale makes every code times its scale exact in float32, so a tensor that is already
    ``codes * 2^e`` (what the ``int8`` / ``int4`` compressors send) round-trips bit for bit: compressors and
    the wire agree exactly on what was sent, as error feedback needs. Any other tensor is rounded to nearest.
    """

    def __init__(self, bits: int, block_size: int = 256) -> None:
        self.bits, self.block_size = bits, block_size
        self.levels = 2 ** (bits - 1) - 1

    def quantize(self, t: torch.Tensor, block_size: int, noise: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exponents (int32, per block) and codes (int32, padded blocks) of ``t``; ``noise`` in [0, 1) of the
        padded shape rounds stochastically (floor(x + u)) instead of to nearest."""
        x = _blocks(t, block_size)
        e = pow2_exponents(x.abs().amax(dim=1), self.levels)
        y = torch.ldexp(x, -e[:, None].float())
        q = torch.floor(y + noise) if noise is not None else torch.round(y)
        return e, q.clamp(-self.levels, self.levels).to(torch.int32)

    def dequantize(self, e: torch.Tensor, q: torch.Tensor, numel: int) -> torch.Tensor:
        return torch.ldexp(q.float(), e[:, None].float()).reshape(-1)[:numel]

    def _code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else math.ceil(numel / 2)

    def plan(self, t: torch.Tensor) -> Plan:
        nb = math.ceil(t.numel() / self.block_size)
        return Plan(num_bytes=nb + self._code_bytes(t.numel()), block_size=self.block_size)

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"int{self.bits}_pow2 encoding needs a float tensor")
        e, q = self.quantize(t, plan.block_size)
        codes = q.reshape(-1)[: t.numel()].to(torch.int8)
        if self.bits == 4:
            nib = (codes.to(torch.uint8) & 0x0F)
            nib = torch.nn.functional.pad(nib, (0, nib.numel() % 2))
            codes = (nib[0::2] | (nib[1::2] << 4)).view(torch.int8)
        return memoryview(bytes(raw_bytes(e.to(torch.int8))) + bytes(raw_bytes(codes)))

    def expected_nbytes(self, meta: Meta) -> int:
        if meta.dtype not in FLOAT_DTYPES:
            raise MessageRejected(f"int{self.bits}_pow2 encoding is for float tensors only")
        if not 1 <= meta.block_size <= 1 << 24:
            raise MessageRejected(f"int{self.bits}_pow2 block_size {meta.block_size} out of range [1, 2^24]")
        return math.ceil(meta.numel / meta.block_size) + self._code_bytes(meta.numel)

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        nb = math.ceil(meta.numel / meta.block_size)
        e = _from_bytes(buf, torch.int8, nb).to(torch.int32)
        if nb and int(e.min()) < MIN_EXP:
            raise MessageRejected(f"int{self.bits}_pow2 block exponents must lie in [{MIN_EXP}, {MAX_EXP}]")
        raw = _from_bytes(buf, torch.int8, self._code_bytes(meta.numel), offset=nb)
        if self.bits == 8:
            q = raw.to(torch.int32)
        else:
            u = raw.view(torch.uint8).to(torch.int32)
            q = torch.stack([u & 0x0F, u >> 4], dim=1).reshape(-1)[: meta.numel]
            q = torch.where(q >= 8, q - 16, q)
        if meta.numel and int(q.abs().max()) > self.levels:
            raise MessageRejected(f"int{self.bits}_pow2 codes must lie in [-{self.levels}, {self.levels}]")
        q = torch.nn.functional.pad(q, (0, nb * meta.block_size - meta.numel)).reshape(nb, meta.block_size)
        return self.dequantize(e, q, meta.numel).reshape(meta.shape).to(meta.dtype)


class SignBlocks:
    """One bit per value (1: negative) and one float32 scale per block: payload = scales[n_blocks] then the
    sign bits (little bit order). Decodes to +-scale. The scale is the block's largest magnitude, so a tensor
    that is already +-s per block (what the ``sign`` compressor sends) round-trips bit for bit."""

    def __init__(self, block_size: int = 256) -> None:
        self.block_size = block_size

    def plan(self, t: torch.Tensor) -> Plan:
        nb = math.ceil(t.numel() / self.block_size)
        return Plan(num_bytes=4 * nb + math.ceil(t.numel() / 8), block_size=self.block_size)

    def encode(self, t: torch.Tensor, plan: Plan) -> memoryview:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError("sign encoding needs a float tensor")
        scales = _blocks(t, plan.block_size).abs().amax(dim=1)
        bits = np.packbits(torch.signbit(t.detach().reshape(-1).float()).numpy(), bitorder="little")
        return memoryview(bytes(raw_bytes(scales)) + bits.tobytes())

    def expected_nbytes(self, meta: Meta) -> int:
        if meta.dtype not in FLOAT_DTYPES:
            raise MessageRejected("sign encoding is for float tensors only")
        if not 1 <= meta.block_size <= 1 << 24:
            raise MessageRejected(f"sign block_size {meta.block_size} out of range [1, 2^24]")
        return 4 * math.ceil(meta.numel / meta.block_size) + math.ceil(meta.numel / 8)

    def decode(self, buf: Payload, meta: Meta) -> torch.Tensor:
        nb = math.ceil(meta.numel / meta.block_size)
        scales = _from_bytes(buf, torch.float32, nb)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise MessageRejected("sign block scales must be finite and >= 0")
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=math.ceil(meta.numel / 8), offset=4 * nb),
                             bitorder="little")[: meta.numel]
        neg = torch.from_numpy(bits.astype(bool))
        mag = scales.repeat_interleave(meta.block_size)[: meta.numel]
        return torch.where(neg, -mag, mag).reshape(meta.shape).to(meta.dtype)


ENCODINGS: dict[str, Encoding] = {
    "dense": Dense(), "fp32": Dense(torch.float32), "bf16": Dense(torch.bfloat16),
    "fp16": Dense(torch.float16), "int8": Int8Blocks(), "sparse_coo": SparseCoo(),
    "sparse_bitmap": SparseBitmap(), "fixed_u32": FixedU32(), "sign": SignBlocks(),
    "int8_pow2": Pow2Blocks(8), "int4_pow2": Pow2Blocks(4), "bitmap": Bitmap(),
}
# sign at the other block sizes of compress.block (the decoder reads the block size from the metadata whatever
# the name; the name picks the sender's)
SIGN_SIZES = {f"sign_b{2**i}": SignBlocks(2**i) for i in range(5, 11) if 2**i != 256}
ENCODINGS.update(SIGN_SIZES)
FLOAT_ONLY = {"fp32", "bf16", "fp16", "int8", "sign", "int8_pow2", "int4_pow2", *SIGN_SIZES}


def register_encoding(name: str, encoding: Encoding, float_only: bool = False) -> None:
    """Add an encoding to the registry (both directions: the decoder accepts what is registered)."""
    ENCODINGS[name] = encoding
    if float_only:
        FLOAT_ONLY.add(name)


def get_encoding(name: str) -> Encoding:
    """Raises: MessageRejected for an unknown encoding name."""
    if name not in ENCODINGS:
        raise MessageRejected(f"unknown encoding {name!r}; valid: {sorted(ENCODINGS)}")
    return ENCODINGS[name]
