"""Per-client state of virtual clients across rounds: in CPU memory, or spilled to the run folder.

What a client's phase handlers keep (``ClientContext.state``: kept optimizer state under ``"optimizer"``,
the update pipeline's states under ``"pipeline"``, whatever later phases add) is plain data. In memory it is
checkpointed with the run (``state_dict``); on disk (``sim.optimizer_state_on = disk``) each client's state
is written per round, the optimizer state to ``optimizer/<client>.r<round>.pt`` and the rest to
``client_state/<client>.r<round>.pt``. Files are read with ``weights_only=True``.

What a resume needs on disk is each client's newest file up to the checkpoint's round. So writing a client's
state of round N (durably: fsync, then rename) removes only files older than its newest one before round N:
the checkpoint of round N-1, durable before round N began, may still need that one, and a kill before round
N's checkpoint resumes from it. Resuming from round C removes the files of rounds after C (the killed run's,
which the resumed run re-computes), so no client ever reads a state its checkpoint does not know.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from fedtune.runs import atomic_write_bytes

OPTIMIZER = "optimizer"
REST = "client_state"


def _round_of(path: Path) -> int:
    return int(path.stem.rsplit(".r", 1)[1])


class ClientStore:
    """Per-client state by client id; ``where`` is ``cpu`` or ``disk`` (under ``folder``)."""

    def __init__(self, where: str, folder: Path):
        self.where, self.folder = where, Path(folder)
        self.memory: dict[str, dict[str, Any]] = {}

    def _files(self, kind: str, cid: str) -> list[Path]:
        return [f for f in (self.folder / kind).glob(f"{cid}.r*.pt")]

    def _latest(self, kind: str, cid: str) -> Any:
        files = self._files(kind, cid)
        if not files:
            return None
        return torch.load(max(files, key=_round_of), weights_only=True)

    def get(self, cid: str) -> dict[str, Any]:
        """The client's state (a new dict: changing it changes nothing here until ``put``)."""
        if self.where == "cpu":
            return dict(self.memory.get(cid, {}))
        state: dict[str, Any] = dict(self._latest(REST, cid) or {})
        optimizer = self._latest(OPTIMIZER, cid)
        if optimizer is not None:
            state["optimizer"] = optimizer
        return state

    def put(self, cid: str, rnd: int, state: dict[str, Any]) -> None:
        """Keep ``state`` as the client's state after round ``rnd`` (an empty state keeps nothing)."""
        if not state:
            return
        if self.where == "cpu":
            self.memory[cid] = state
            return
        rest = {k: v for k, v in state.items() if k != "optimizer"}
        for kind, value in ((OPTIMIZER, state.get("optimizer")), (REST, rest or None)):
            if value is None:
                continue
            folder = self.folder / kind
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(value, buf)
            atomic_write_bytes(folder / f"{cid}.r{rnd}.pt", buf.getvalue())  # whole or absent after a kill
            earlier = [f for f in self._files(kind, cid) if _round_of(f) < rnd]
            if earlier:  # the last checkpoint may need the newest of them; the older ones no checkpoint needs
                keep = max(earlier, key=_round_of)
                for old in earlier:
                    if old != keep:
                        old.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: every client's state when in memory (on disk it is in its own files)."""
        return dict(self.memory) if self.where == "cpu" else {}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        """Continue from the checkpoint of ``round``: its in-memory states, or the files up to that round (later
        ones, written by the run that was killed, are removed)."""
        self.memory.update(state)
        for kind in (OPTIMIZER, REST):
            for f in (self.folder / kind).glob("*.r*.pt"):
                if _round_of(f) > round:
                    f.unlink(missing_ok=True)
