"""Framing of the streamed messages without a protobuf round trip for the tensor bytes.

``UpdateChunk`` and ``InstructionsChunk`` (protos/fedtune/v1/federation.proto) carry MBs of tensor payload
per message. Building them as protobuf objects costs three extra copies of every byte (slice -> message ->
serialized, and ``ByteSize()`` serializes again), which made uploads CPU-bound at a tenth of loopback
speed. Here the frames are written and read directly in protobuf wire format: ``frame_tensor`` produces
exactly the bytes ``UpdateChunk(tensor=TensorChunk(meta=..., data=...)).SerializeToString()`` would (a
test checks this), and ``parse_frame`` reads any valid encoding of those messages, handing out the payload
as a zero-copy ``memoryview``. Small parts (headers, ``TensorMeta``) still go through protobuf.
``prefetch`` runs one end's per-frame work on its own thread, in step with gRPC's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable
from typing import Any, NamedTuple

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


class _Failed(NamedTuple):
    error: BaseException


_END = object()
PREFETCH_FRAMES = 4
"""Frames a stream's far end may run ahead (each up to a chunk, ``codec.DEFAULT_CHUNK_SIZE``)."""
PREFETCH_AFTER_BYTES = 4 << 20
"""Streams shorter than this gain nothing from a thread (an adapter update is often a few hundred KB)."""


def prefetch(
    frames: Iterable[bytes], depth: int = PREFETCH_FRAMES, after_bytes: int = PREFETCH_AFTER_BYTES,
) -> Generator[bytes, None, None]:
    """``frames``; once ``after_bytes`` went through, produced by a thread up to ``depth`` frames ahead of the
    consumer. An error is re-raised where it occurred in the sequence.

    Both ends of a stream use it. gRPC's Python server asks for the next message only when the previous one
    was taken, and its client consumes the request iterator on the thread that sends: without a thread
    between them a stream stalls while the receiver copies, hashes and decodes a chunk, and while the sender
    hashes and frames the next one. The hashes, torch and gRPC's I/O release the GIL, so the stages overlap.
    """
    it = iter(frames)
    seen = 0
    for frame in it:
        yield frame
        seen += len(frame)
        if seen >= after_bytes:
            break
    else:
        return
    q: queue.Queue[Any] = queue.Queue(depth)
    closed = threading.Event()

    def put(item: Any) -> bool:
        while not closed.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def pump() -> None:
        end: Any = _END
        try:
            for frame in it:
                if not put(frame):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, in order
            end = _Failed(e)
        put(end)

    threading.Thread(target=pump, name="frame-prefetch", daemon=True).start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        closed.set()


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
