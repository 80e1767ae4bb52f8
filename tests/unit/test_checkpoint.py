"""Checkpoints hold plain state only: they round-trip, and a pickled object in one is refused, never run."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from fedtune.checkpoint import (
    CHECKPOINT,
    FORMAT,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedtune.strategies import make_strategy
from fedtune.types import LowRankUpdate


def test_a_checkpoint_round_trips_as_plain_state(tmp_path: Path) -> None:
    state = {"l.lora_A.weight": torch.randn(2, 3), "l.lora_B.weight": torch.randn(3, 2).to(torch.bfloat16)}
    update = {"l": LowRankUpdate(B=torch.randn(3, 1), A=torch.randn(1, 3))}
    optimizer = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    strategy = make_strategy("fedadam")
    ckpt = Checkpoint(round=3, state=state, strategy=strategy.state_dict(), base_updates=[update],
                      before={"eval_loss": 2.5}, samples_before=["hi"],
                      clients={"client-1": {"optimizer": optimizer, "pipeline": {"ef": {"x": torch.ones(2)}}}})
    save_checkpoint(tmp_path, ckpt)
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.before == {"eval_loss": 2.5} and back.samples_before == ["hi"]
    assert all(torch.equal(back.state[k], v) and back.state[k].dtype == v.dtype for k, v in state.items())
    assert torch.equal(back.base_updates[0]["l"].B, update["l"].B) and torch.equal(back.base_updates[0]["l"].A,
                                                                                   update["l"].A)
    assert back.clients["client-1"]["optimizer"]["param_groups"] == optimizer["param_groups"]
    assert torch.equal(back.clients["client-1"]["pipeline"]["ef"]["x"], torch.ones(2))
    assert back.strategy == {"m": {}, "v": {}, "steps": 0}


class _Trap:
    """Unpickling this would create a file: what any code in a pickle could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"format": FORMAT, "round": 1, "state": {}, "strategy": {"x": _Trap(marker)}, "base_updates": [],
                "before": {}, "samples_before": [], "clients": {}}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="not a fedtune checkpoint that can be loaded safely"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_of_the_old_pickled_format_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # what fedtune wrote before plain-state checkpoints: the strategy object itself
    buf = io.BytesIO()
    torch.save({"round": 2, "state": {}, "strategy": make_strategy("fedadam"), "base_updates": []}, buf)
    (tmp_path / CHECKPOINT).write_bytes(buf.getvalue())
    with zipfile.ZipFile(tmp_path / CHECKPOINT) as z:  # it does pickle a fedtune class
        assert any(b"fedtune.strategies" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    with pytest.raises(CheckpointError, match="written by an older fedtune") as err:
        load_checkpoint(tmp_path)
    assert "new out=" in str(err.value) and "never loaded" in str(err.value)


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    torch.save({"round": 1, "state": {}}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="not a fedtune.checkpoint/2 checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "empty")
