"""Round checkpoints of a simulated run, written atomically (temporary file, fsync, rename).

A checkpoint holds everything the next round depends on: the global adapter state, the strategy object
(server optimizer moments, svd error feedback), base-weight updates applied so far (flora, fedex), the
clients' optimizer states when they keep them, and the "before" evaluation for the summary.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.runs import atomic_write_bytes
from fedtune.types import State

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int
    state: State
    strategy: Any
    base_updates: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    samples_before: list[str] = field(default_factory=list)
    optimizer_states: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    buf = io.BytesIO()
    torch.save(ckpt.__dict__, buf)
    atomic_write_bytes(run_dir / CHECKPOINT, buf.getvalue())


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The last completed round of ``run_dir``.

    Raises:
        FileNotFoundError: the folder has no checkpoint (nothing to resume).
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT}; nothing to resume (was a round completed?)")
    data = torch.load(path, weights_only=False)  # our own file, written by save_checkpoint
    return Checkpoint(**data)
