"""Round checkpoints of plain state, written atomically and read without running code.

A checkpoint holds everything the next round depends on, as tensors, numbers, strings, lists and dicts:
the global adapter state, the strategy's ``state_dict()`` (server optimizer moments, svd error feedback, the
base-update log of flora / fedex), the base-weight updates the coordinator's model holds, per-client state
kept by the simulator (optimizer states, update-pipeline state) when it lives in memory, and the "before"
evaluation for the summary. No random generator state is needed: every random choice is derived from
(seed, round, client). ``load_checkpoint`` reads it with ``torch.load(..., weights_only=True)``, so a
checkpoint can hold no pickled object and opening a run folder never runs code, and a refactored class
never breaks a resume. Checkpoints written before this format (they pickled the strategy object) are
refused with a message saying what to do; they are not unpickled.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.runs import atomic_write_bytes
from fedtune.types import LowRankUpdate, State, updates_from_plain, updates_to_plain

CHECKPOINT = "checkpoint.pt"
FORMAT = "fedtune.checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (another format, pickled objects, damaged)."""


@dataclass
class Checkpoint:
    round: int
    state: State
    strategy: dict[str, Any] = field(default_factory=dict)
    """``Strategy.state_dict()`` after the round."""
    base_updates: list[dict[str, LowRankUpdate]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    samples_before: list[str] = field(default_factory=list)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-client state by client id (simulation, when kept in memory)."""


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    data = {"format": FORMAT, "round": ckpt.round, "state": ckpt.state, "strategy": ckpt.strategy,
            "base_updates": [updates_to_plain(u) for u in ckpt.base_updates], "before": ckpt.before,
            "samples_before": ckpt.samples_before, "clients": ckpt.clients}
    buf = io.BytesIO()
    torch.save(data, buf)
    atomic_write_bytes(run_dir / CHECKPOINT, buf.getvalue())


def _pickles_fedtune_objects(path: Path) -> bool:
    """Whether the checkpoint's pickle names fedtune strategy classes (the format before plain state), read as
    bytes, not unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(b"fedtune.strategies" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The last completed round of ``run_dir``.

    Raises:
        FileNotFoundError: the folder has no checkpoint (nothing to resume).
        CheckpointError: the file holds pickled objects (an older fedtune's checkpoint, or not fedtune's) or
            is not a checkpoint of this format; the message says what to do.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT}; nothing to resume (was a round completed?)")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        if _pickles_fedtune_objects(path):
            raise CheckpointError(
                f"{path} was written by an older fedtune, which pickled the strategy object into it; checkpoints "
                "are now plain tensors and numbers, and a pickled one is never loaded (unpickling runs code). "
                "Finish that run with the fedtune version that started it, or start it again in a new out=... "
                f"folder (or delete {CHECKPOINT} there to start over)") from None
        raise CheckpointError(f"{path} is not a fedtune checkpoint that can be loaded safely ({exc}); "
                              f"delete it to start the run over") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (found {found!r}); delete it to start over")
    return Checkpoint(round=int(data["round"]), state=data["state"], strategy=data["strategy"],
                      base_updates=[updates_from_plain(u) for u in data["base_updates"]], before=data["before"],
                      samples_before=list(data["samples_before"]), clients=data["clients"])
