"""Per-client state of virtual clients across rounds: in CPU memory, or spilled to the run folder.

What a client's phase handlers keep (``ClientContext.state``: kept optimizer state under ``"optimizer"``,
the update pipeline's states under ``"pipeline"``, whatever later phases add) is plain data. In memory it is
checkpointed with the run (``state_dict``); on disk (``sim.optimizer_state_on = disk``) each client's state
is written per round, the optimizer state to ``optimizer/<client>.r<round>.pt`` and the rest to
``client_state/<client>.r<round>.pt``, so a resumed run reads the state as of its checkpoint even if the
killed run had gone further. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

OPTIMIZER = "optimizer"
REST = "client_state"


def _round_of(path: Path) -> int:
    return int(path.stem.rsplit(".r", 1)[1])


class ClientStore:
    """Per-client state by client id; ``where`` is ``cpu`` or ``disk`` (under ``folder``)."""

    def __init__(self, where: str, folder: Path, upto_round: int | None = None):
        self.where, self.folder = where, Path(folder)
        self.memory: dict[str, dict[str, Any]] = {}
        self.upto = upto_round

    def _latest(self, kind: str, cid: str) -> Any:
        files = [f for f in (self.folder / kind).glob(f"{cid}.r*.pt") if self.upto is None or _round_of(f) <= self.upto]
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
            path = folder / f"{cid}.r{rnd}.pt"
            torch.save(value, path.with_name(path.name + ".tmp"))  # whole or absent after a kill
            os.replace(path.with_name(path.name + ".tmp"), path)
            for old in folder.glob(f"{cid}.r*.pt"):
                if _round_of(old) < rnd:
                    old.unlink()
        self.upto = None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: every client's state when in memory (on disk it is in its own files)."""
        return dict(self.memory) if self.where == "cpu" else {}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        """Continue from the checkpoint of ``round``: its in-memory states, or the files up to that round."""
        self.memory.update(state)
        self.upto = round
