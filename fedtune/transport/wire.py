"""Framing of the streamed messages without a protobuf round trip for the tensor bytes.

``UpdateChunk`` and ``InstructionsChunk`` (protos/fedtune/v1/federation.proto) carry MBs of tensor payload
per message. Building them as protobuf objects costs three extra copies of every byte (slice -> message ->
serialized, and ``ByteSize()`` serializes again), which made uploads CPU-bound at a tenth of loopback
speed. Here the frames are written and read directly in protobuf wire format: ``frame_tensor`` produces
exactly the bytes ``UpdateChunk(tensor=TensorChunk(meta=..., data=...)).SerializeToString()`` would (a
test checks this), and ``parse_frame`` reads any valid encoding of those messages, handing out the payload
as a zero-copy ``memoryview``. Small parts (headers, ``TensorMeta``) still go through protobuf.
"""

from __future__ import annotations

from typing import NamedTuple

from google.protobuf.message import DecodeError

from fedtune.transport._proto import tensor_pb2 as tpb
from fedtune.transport.errors import MessageRejected

HEADER_FIELD = 1  # UpdateChunk.header / InstructionsChunk.header
TENSOR_FIELD = 2  # UpdateChunk.tensor / InstructionsChunk.tensor
_META, _DATA = 1, 2  # TensorChunk.meta / TensorChunk.data
_LEN = 2  # wire type of length-delimited fields


class WireChunk(NamedTuple):
    """One tensor chunk as read off the wire: ``meta`` on a tensor's first chunk only."""

    meta: tpb.TensorMeta | None
    data: memoryview


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int) -> bytes:
    return bytes([(field << 3) | _LEN])


def frame_tensor(meta: bytes, data: bytes | memoryview) -> bytes:
    """Serialized ``{Update,Instructions}Chunk(tensor=TensorChunk(meta, data))`` (``meta`` may be b"").

    ``meta`` is a serialized ``TensorMeta``; empty means no meta field (a follow-up chunk).
    """
    parts: list[bytes | memoryview] = []
    if meta:
        parts += [_key(_META), varint(len(meta)), meta]
    if len(data):
        parts += [_key(_DATA), varint(len(data)), data]
    inner_len = sum(len(p) for p in parts)
    return b"".join([_key(TENSOR_FIELD), varint(inner_len), *parts])


def frame_header(serialized_header: bytes) -> bytes:
    """Serialized ``{Update,Instructions}Chunk(header=...)`` from a serialized header message."""
    return b"".join([_key(HEADER_FIELD), varint(len(serialized_header)), serialized_header])


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MessageRejected("malformed protobuf: bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, memoryview]]:
    """Length-delimited fields of a message, in order; other wire types are skipped."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wtype = key >> 3, key & 7
        if wtype == 0:
            _, pos = _read_varint(buf, pos)
        elif wtype == 1:
            pos += 8
        elif wtype == 5:
            pos += 4
        elif wtype == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise MessageRejected("malformed protobuf: field runs past the end of the message")
            out.append((field, buf[pos:pos + n]))
            pos += n
        else:
            raise MessageRejected(f"malformed protobuf: wire type {wtype}")
        if pos > len(buf):
            raise MessageRejected("malformed protobuf: truncated field")
    return out


def parse_frame(raw: bytes) -> tuple[bytes, None] | tuple[None, WireChunk]:
    """Split a serialized chunk message into ``(header_bytes, None)`` or ``(None, WireChunk)``.

    Raises:
        MessageRejected: malformed bytes, neither or both of header/tensor, a repeated field.
    """
    fields = [(f, v) for f, v in _fields(memoryview(raw)) if f in (HEADER_FIELD, TENSOR_FIELD)]
    if len(fields) != 1:
        raise MessageRejected("each stream message must hold exactly one header or one tensor chunk")
    field, body = fields[0]
    if field == HEADER_FIELD:
        return bytes(body), None
    meta: tpb.TensorMeta | None = None
    data = memoryview(b"")
    seen: set[int] = set()
    for f, v in _fields(body):
        if f in seen:
            raise MessageRejected("malformed tensor chunk: repeated field")
        seen.add(f)
        if f == _META:
            try:
                meta = tpb.TensorMeta.FromString(bytes(v))
            except DecodeError as e:
                raise MessageRejected(f"malformed tensor metadata: {e}") from None
        elif f == _DATA:
            data = v
    return None, WireChunk(meta, data)
