"""Round-protocol messages <-> the plain dataclasses of ``fedtune.types``.

Instructions travel as one ``InstructionsHeader`` followed by tensor chunks in groups ``state``, ``mask``,
``base_A`` and ``base_B`` (base updates keyed by module name); a reply as one ``UpdateHeader`` followed by
chunks in groups ``state`` and ``mask``. Everything here is pure conversion; the servicer and the client
wrapper do the I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf.message import DecodeError

from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport.codec import (
    DEFAULT_CHUNK_SIZE,
    DecodedTensor,
    EncodingSpec,
    Limits,
    TensorDecoder,
    encode_frames,
    encode_pieces,
    encoded_size,
)
from fedtune.transport.errors import MessageRejected
from fedtune.transport.wire import frame_header, frame_tensor, parse_frame
from fedtune.types import ClientReply, Instructions, LowRankUpdate
from fedtune.untrusted import MAX_ERROR, MAX_NAME, clean

MAX_PHASE_LEN = 64
MAX_METRICS = 32
"""Metrics one update may carry (each key at most ``untrusted.MAX_NAME`` characters)."""


@dataclass(frozen=True)
class UpdateHeader:
    """What a node says about its update before the tensors follow (already validated)."""

    round: int
    phase: str
    node: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    rank: int | None = None


def _json_obj(text: str, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise MessageRejected(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MessageRejected(f"{what} must be a JSON object")
    return obj


def _instruction_groups(instr: Instructions) -> list[tuple[str, Mapping[str, torch.Tensor]]]:
    groups: list[tuple[str, Mapping[str, torch.Tensor]]] = [("state", instr.state)]
    if instr.mask:
        groups.append(("mask", instr.mask))
    if instr.base_update:
        groups.append(("base_A", {k: u.A for k, u in instr.base_update.items()}))
        groups.append(("base_B", {k: u.B for k, u in instr.base_update.items()}))
    return groups


def _encoding_of(instr: Instructions, group: str, default: EncodingSpec) -> EncodingSpec:
    """The run's encoding, or the one the instructions name for their state (``extra["state_encoding"]``: a
    compressed downlink delta travels in its compressor's encoding) or their mask (``extra["mask_encoding"]``:
    a pruning mask travels as a bitmap)."""
    named = instr.extra.get({"state": "state_encoding", "mask": "mask_encoding"}.get(group, ""))
    return named if isinstance(named, str) else default


def instructions_header(instr: Instructions) -> fpb.InstructionsHeader:
    """Raises: ValueError when ``train`` or ``extra`` is not JSON-serializable."""
    return fpb.InstructionsHeader(
        kind=fpb.InstructionsHeader.INSTRUCTIONS, round=instr.round, phase=instr.phase,
        client_id=instr.client_id, train_json=json.dumps(instr.train), has_rank=instr.rank is not None,
        rank=instr.rank or 0, extra_json=json.dumps(instr.extra),
    )


def instructions_to_frames(
    instr: Instructions, encoding: EncodingSpec = "dense", chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[bytes]:
    """Serialized ``InstructionsChunk`` messages: header first, then the tensors of every group.

    Raises:
        ValueError: see ``encode_state``.
    """
    yield frame_header(instructions_header(instr).SerializeToString())
    for group, tensors in _instruction_groups(instr):
        yield from encode_frames(tensors, _encoding_of(instr, group, encoding), group=group, chunk_size=chunk_size)


def instructions_wire_size(
    instr: Instructions, encoding: EncodingSpec = "dense", chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Exact bytes of the messages ``instructions_to_frames`` yields."""
    total = fpb.InstructionsChunk(header=instructions_header(instr)).ByteSize()
    for group, tensors in _instruction_groups(instr):
        total += encoded_size(tensors, _encoding_of(instr, group, encoding), group=group, chunk_size=chunk_size,
                              framed=True)
    return total


def _tensors_after_header(frames: Iterator[bytes], limits: Limits | None, what: str) -> Iterator[DecodedTensor]:
    """Decode the tensor frames that follow a stream's header, each tensor as soon as it is complete.

    Raises:
        MessageRejected: a second header, or any codec error.
    """
    dec = TensorDecoder(limits)
    for raw in frames:
        _, chunk = parse_frame(raw)
        if chunk is None:
            raise MessageRejected(f"a second header in one {what} stream")
        out = dec.feed(chunk)
        if out is not None:
            yield out
    dec.close()


def frames_to_instructions(frames: Iterable[bytes], limits: Limits | None = None) -> Instructions | None:
    """Decode a GetInstructions stream; ``None`` when the server had nothing yet (poll again).

    Raises:
        MessageRejected: missing header, bad JSON, unpaired base-update factors, or any codec error.
    """
    it = iter(frames)
    first = next(it, None)
    header_bytes = parse_frame(first)[0] if first is not None else None
    if header_bytes is None:
        raise MessageRejected("instructions stream must start with a header")
    h = _parse(fpb.InstructionsHeader, header_bytes)
    if h.kind == fpb.InstructionsHeader.NONE:
        return None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for out in _tensors_after_header(it, limits, "instructions"):
        groups.setdefault(out.group, {})[out.name] = out.tensor
    a, b = groups.get("base_A", {}), groups.get("base_B", {})
    if a.keys() != b.keys():
        raise MessageRejected(f"base update factors do not pair up: {sorted(a.keys() ^ b.keys())}")
    return Instructions(
        round=h.round, client_id=h.client_id, state=groups.get("state", {}),
        train=_json_obj(h.train_json, "train overrides"), rank=h.rank if h.has_rank else None,
        mask=groups.get("mask"), base_update={k: LowRankUpdate(B=b[k], A=a[k]) for k in a} or None,
        phase=h.phase, extra=_json_obj(h.extra_json, "extra"),
    )


def _reply_groups(reply: ClientReply) -> list[tuple[str, Mapping[str, torch.Tensor]]]:
    if reply.error is not None:
        return []
    groups: list[tuple[str, Mapping[str, torch.Tensor]]] = [("delta" if reply.delta else "state", reply.state or {})]
    if reply.mask:
        groups.append(("mask", reply.mask))
    return groups


def update_header(reply: ClientReply, phase: str = "train") -> fpb.UpdateHeader:
    return fpb.UpdateHeader(
        round=reply.round, phase=phase, node=reply.client_id, num_examples=reply.num_examples,
        metrics={k: float(v) for k, v in reply.metrics.items()}, error=reply.error or "",
        has_rank=reply.rank is not None, rank=reply.rank or 0,
    )


def reply_to_frames(
    reply: ClientReply, phase: str = "train", encoding: EncodingSpec = "dense",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[bytes]:
    """Serialized ``UpdateChunk`` messages: header, then the reply's tensors (none for a failed reply).

    Raises:
        ValueError: see ``encode_state``.
    """
    yield frame_header(update_header(reply, phase).SerializeToString())
    for meta, data in reply_pieces(reply, encoding, chunk_size):
        yield frame_tensor(meta or b"", data)


def reply_pieces(
    reply: ClientReply, encoding: EncodingSpec = "dense", chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[tuple[bytes | None, memoryview]]:
    """The reply's tensor chunks unframed (``codec.encode_pieces``), for the bulk lane.

    Raises:
        ValueError: see ``encode_state``.
    """
    for group, tensors in _reply_groups(reply):
        yield from encode_pieces(tensors, encoding, group=group, chunk_size=chunk_size)


def reply_wire_size(
    reply: ClientReply, phase: str = "train", encoding: EncodingSpec = "dense",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Exact bytes of the messages ``reply_to_frames`` yields."""
    total = fpb.UpdateChunk(header=update_header(reply, phase)).ByteSize()
    for group, tensors in _reply_groups(reply):
        total += encoded_size(tensors, encoding, group=group, chunk_size=chunk_size, framed=True)
    return total


def _parse(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError as e:
        raise MessageRejected(f"malformed {cls.__name__}: {e}") from None


def parse_update_header(data: bytes) -> UpdateHeader:
    """The header with its error text bounded (``untrusted.clean``).

    Raises: MessageRejected for bad bytes, a negative count, an overlong phase, too many or overlong metric
    names, or a non-finite metric."""
    h = _parse(fpb.UpdateHeader, data)
    if h.num_examples < 0:
        raise MessageRejected(f"num_examples must be >= 0, got {h.num_examples}")
    if not h.phase or len(h.phase) > MAX_PHASE_LEN:
        raise MessageRejected(f"phase must have 1..{MAX_PHASE_LEN} characters")
    if len(h.metrics) > MAX_METRICS or any(not k or len(k) > MAX_NAME for k in h.metrics):
        raise MessageRejected(f"an update carries at most {MAX_METRICS} metrics named by 1..{MAX_NAME} characters")
    bad = sorted(clean(k, MAX_NAME) for k, v in h.metrics.items() if not math.isfinite(v))
    if bad:
        raise MessageRejected(f"metrics must be finite; not finite: {bad}")
    return UpdateHeader(
        round=h.round, phase=h.phase, node=h.node, num_examples=h.num_examples, metrics=dict(h.metrics),
        error=clean(h.error, MAX_ERROR) or None, rank=h.rank if h.has_rank else None,
    )


def frames_to_reply(frames: Iterable[bytes], limits: Limits | None = None, phase: str | None = None) -> ClientReply:
    """Decode a SubmitUpdate stream (header, then tensor chunks) into the reply the server takes in.
    ``phase``: the phase the header must name (any when None).

    Raises:
        MessageRejected: a missing or bad header, another phase, or any codec error.
    """
    it = iter(frames)
    first = next(it, None)
    header_bytes = parse_frame(first)[0] if first is not None else None
    if header_bytes is None:
        raise MessageRejected("an update stream must start with an UpdateHeader")
    header = parse_update_header(header_bytes)
    if phase is not None and header.phase != phase:
        raise MessageRejected(f"the update is for phase {clean(header.phase, MAX_PHASE_LEN)!r}, expected {phase!r}")
    return collect_reply(header, _tensors_after_header(it, limits, "update"))


def collect_reply(header: UpdateHeader, tensors: Iterable[DecodedTensor]) -> ClientReply:
    """Gather a decoded update into a ``ClientReply`` (for coordinators that do not stream-aggregate).

    Raises:
        MessageRejected: a tensor in an unknown group (anything other than ``state`` / ``delta`` / ``mask``),
            or both ``state`` and ``delta``.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {"state": {}, "delta": {}, "mask": {}}
    for d in tensors:
        if d.group not in groups:
            raise MessageRejected(f"unexpected tensor group {d.group!r} in an update")
        groups[d.group][d.name] = d.tensor
    if groups["state"] and groups["delta"]:
        raise MessageRejected("an update carries values (group state) or a delta (group delta), not both")
    delta = bool(groups["delta"])
    return ClientReply(
        client_id=header.node, round=header.round,
        state=None if header.error else groups["delta" if delta else "state"], num_examples=header.num_examples,
        metrics=header.metrics, error=header.error, mask=groups["mask"] or None, rank=header.rank, delta=delta,
    )
