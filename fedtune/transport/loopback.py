"""The wire without a network: what a receiver gets from a message, and the bytes the message took.

The simulator sends every instruction and reply through here, with the run's encoding, so a simulated client
trains on exactly what a real node would decode, the strategy aggregates exactly what the server would, and
the byte counts are those of the real messages. The dense encoding decodes to the very tensors it encoded,
so for it the bytes are counted (``*_wire_size``, equal to the frames: tested) and the objects passed
through; any other encoding is really encoded to frames and decoded back with the transport's decoders.

Finiteness is left to the strategy's reply check (which names the non-finite tensors), as for dense.
"""

from __future__ import annotations

from fedtune.transport.codec import Limits
from fedtune.transport.errors import MessageRejected
from fedtune.transport.messages import (
    frames_to_instructions,
    frames_to_reply,
    instructions_to_frames,
    instructions_wire_size,
    reply_to_frames,
    reply_wire_size,
)
from fedtune.types import ClientReply, Instructions, failed_reply

LOSSLESS = "dense"
"""The encoding that needs no round trip: values travel bit for bit in their own dtype."""
_LIMITS = Limits(require_finite=False)


def send_instructions(ins: Instructions, encoding: str) -> tuple[Instructions, int]:
    """The instructions a node would decode from ``ins`` sent with ``encoding``, and the bytes sent.

    Raises:
        ValueError: ``encoding`` cannot carry ``ins`` (see ``encode_state``).
    """
    if encoding == LOSSLESS and "state_encoding" not in ins.extra:
        return ins, instructions_wire_size(ins, encoding)
    frames = list(instructions_to_frames(ins, encoding))
    decoded = frames_to_instructions(frames, _LIMITS)
    assert decoded is not None, "instructions always decode to instructions"
    return decoded, sum(len(f) for f in frames)


def send_reply(reply: ClientReply, phase: str, encoding: str) -> tuple[ClientReply, int]:
    """The reply a server would decode from ``reply`` sent with ``encoding``, and the bytes sent.

    A reply the decoder refuses becomes a failed one with the reason, as the server records it; one that
    ``encoding`` cannot carry, a failed one as the node would send it (no tensors).
    """
    if encoding == LOSSLESS:
        return reply, reply_wire_size(reply, phase, encoding)
    try:
        frames = list(reply_to_frames(reply, phase, encoding))
    except ValueError as exc:
        failed = failed_reply(reply.client_id, reply.round, f"cannot encode the update as {encoding}: {exc}")
        return failed, reply_wire_size(failed, phase, encoding)
    size = sum(len(f) for f in frames)
    try:
        decoded = frames_to_reply(frames, _LIMITS)
    except MessageRejected as exc:
        decoded = failed_reply(reply.client_id, reply.round, f"rejected update: {exc.reason}")
    return decoded, size
