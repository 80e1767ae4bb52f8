"""A minimal ``Coordinator`` for tests, demos and loopback experiments of the transport.

It hands every node the same instructions (with ``client_id`` set to the node), records each update as a
``ClientReply`` and checks the round, the config fingerprint and, optionally, tensor shapes. The real
round loop lives in ``fedtune.server``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

from fedtune.transport.codec import DecodedTensor
from fedtune.transport.errors import ConfigMismatch, MessageRejected
from fedtune.transport.messages import UpdateHeader, collect_reply
from fedtune.transport.security import OBSERVER
from fedtune.transport.server import RoundStatus
from fedtune.types import ClientReply, Instructions


class StaticCoordinator:
    """Serves fixed ``instructions`` (``None``: nothing to do) and keeps the replies it accepts."""

    def __init__(
        self, instructions: Instructions | None = None, fingerprint: str = "",
        shapes: dict[str, tuple[int, ...]] | None = None, round: int = 1, phase: str = "train",
    ) -> None:
        self.instr, self.fingerprint, self.shapes = instructions, fingerprint, shapes or {}
        self.round, self.phase = round, phase
        self.replies: list[ClientReply] = []
        self.registered: list[str] = []
        self._lock = threading.Lock()

    def register(self, node: str, fingerprint: str, base_updates: int = 0) -> None:
        """Raises: ConfigMismatch when a fingerprint is configured and differs (observers always get in)."""
        if self.fingerprint and fingerprint not in (self.fingerprint, OBSERVER):
            raise ConfigMismatch(f"config fingerprint {fingerprint!r} != server's {self.fingerprint!r}: "
                                 "load the same model, quantization and adapter config as the server")
        with self._lock:
            self.registered.append(node)

    def next_instructions(self, node: str, timeout: float) -> Instructions | None:
        if self.instr is None:
            time.sleep(min(timeout, 0.05))
            return None
        return dataclasses.replace(self.instr, client_id=node)

    def upload_window(self, node: str) -> float:
        """Every node may upload at any time (nothing is sampled here)."""
        return 3600.0

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        """Raises: MessageRejected for a wrong round or a tensor of an unexpected shape."""
        if header.round != self.round:
            raise MessageRejected(f"update for round {header.round}, server is in round {self.round}")

        def checked() -> Iterator[DecodedTensor]:
            for d in tensors:
                want = self.shapes.get(d.name)
                if want is not None and tuple(d.tensor.shape) != want:
                    raise MessageRejected(f"tensor {d.name!r} has shape {tuple(d.tensor.shape)}, expected {want}")
                yield d

        reply = collect_reply(header, checked())
        with self._lock:
            self.replies.append(reply)
        return "thanks"

    def status(self, detail: bool = True) -> RoundStatus:
        return RoundStatus(self.round, self.phase, {"clients": str(len(self.registered))} if detail else {})
