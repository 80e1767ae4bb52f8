"""A kill while a round's record is being written leaves half a line in metrics.jsonl: resume still works
(``fedtune server`` and ``simulate --resume`` both resume through the round driver) and repairs the file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fakes import FakeDispatcher, FakeModel, start, trainer
from rich.console import Console

from fedtune.checkpoint import load_checkpoint
from fedtune.config import TrainConfig
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy

QUIET = Console(file=io.StringIO())


def drive(tmp: Path, rounds: int, resume: bool = False) -> FakeModel:
    model = FakeModel(start())
    clients = {f"c{k}": trainer(k) for k in range(4)}
    run_rounds(RoundPlan(rounds=rounds, seed=3, train=TrainConfig()), RunDir(tmp), model,
               make_strategy("fedadam", StrategyConfig(r=2, lora_alpha=2.0)), FakeDispatcher(clients), QUIET,
               resume=load_checkpoint(tmp) if resume else None)
    return model


@pytest.mark.parametrize("cut", [1, 40, -1])
def test_resume_after_a_torn_last_record_equals_an_uninterrupted_run(tmp_path: Path, cut: int) -> None:
    straight = drive(tmp_path / "straight", 4)
    drive(tmp_path / "killed", 2)
    # the kill: round 3's record half written (its checkpoint never was), cut inside a UTF-8 character too
    record = json.dumps({"round": 3, "failures": {"c1": "lost: nœud perdu " + "x" * 100}}, ensure_ascii=False)
    data = record.encode()
    with open(tmp_path / "killed" / "metrics.jsonl", "ab") as f:
        f.write(data[:cut] if cut > 0 else data[: data.index("œ".encode()) + 1])
    resumed = drive(tmp_path / "killed", 4, resume=True)
    assert straight.saved is not None and resumed.saved is not None
    assert all(v.equal(resumed.saved[k]) for k, v in straight.saved.items())
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3, 4]  # repaired: every line whole


def test_a_damaged_line_before_the_last_is_named(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.log({"round": 0})
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "x": "cut\n{"round": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        run.read_metrics()


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}')
    assert RunDir(tmp_path).read_metrics() == [{"round": 0}, {"round": 1}]
