"""The round driver against fake clients: out-of-order replies, dropped clients, two phases, resume."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from fakes import KEYS, FakeDispatcher, FakeModel, start, trainer
from rich.console import Console

from fedtune.checkpoint import load_checkpoint
from fedtune.client.fit import client_seed
from fedtune.config import TrainConfig
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.strategies.base import PhaseResult, StrategyBase
from fedtune.types import ClientReply, Instructions

CLIENTS = ("c0", "c1", "c2", "c3")
QUIET = Console(file=io.StringIO())


def surveyed(k: int):
    """Client k answering both phases of ``survey_then_train``: its count in the survey, then training."""
    train = trainer(k)

    def answer(ins: Instructions) -> ClientReply:
        if ins.phase == "survey":
            return ClientReply(ins.client_id, ins.round, {"examples": torch.tensor([10 * (k + 1)])}, 10 * (k + 1))
        return train(ins)
    return answer


def drive(tmp: Path, name: str, dispatcher: FakeDispatcher, rounds: int = 3, resume: bool = False,
          **cfg: object) -> tuple[FakeModel, RunDir]:
    run = RunDir(tmp)
    model = FakeModel(start())
    strategy = make_strategy(name, StrategyConfig(r=2, lora_alpha=2.0, **cfg))  # type: ignore[arg-type]
    plan = RoundPlan(rounds=rounds, seed=7, train=TrainConfig(lr=0.5))
    run_rounds(plan, run, model, strategy, dispatcher, QUIET, resume=load_checkpoint(tmp) if resume else None)
    return model, run


@pytest.mark.parametrize("name", ["fedavg", "median", "fedadam"])
def test_replies_out_of_order_and_dropped_clients_give_the_in_order_result(tmp_path: Path, name: str) -> None:
    drop = {(2, "train"): {"c2", "c3"}}
    clients = {c: trainer(k) for k, c in enumerate(CLIENTS)}
    shuffled = FakeDispatcher(clients, reverse=True, drop=drop)
    got, run = drive(tmp_path / "reversed", name, shuffled)
    want, _ = drive(tmp_path / "ordered", name, FakeDispatcher(clients, reverse=False, drop=drop))
    assert got.saved is not None and want.saved is not None
    assert all(torch.equal(got.saved[k], want.saved[k]) for k in KEYS)
    assert not torch.equal(got.saved[KEYS[1]], start()[KEYS[1]])
    rows = [r for r in run.read_metrics() if r["round"] >= 1]
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(4, 0), (2, 2), (4, 0)]
    assert rows[1]["failures"] == {"c2": "lost: the test dropped it", "c3": "lost: the test dropped it"}
    assert rows[0]["bytes_up"] == 400 and rows[1]["bytes_up"] == 200 and rows[1]["bytes_down"] == 40
    # the run's training instructions under the strategy's, and each client's seed from its index
    ins = shuffled.sent[(3, "train")]["c2"]
    assert ins.train["lr"] == 0.5 and ins.extra["seed"] == client_seed(7, 3, 2)


def test_resume_continues_as_an_uninterrupted_run(tmp_path: Path) -> None:
    clients = {c: trainer(k) for k, c in enumerate(CLIENTS)}
    straight, _ = drive(tmp_path / "a", "fedadam", FakeDispatcher(clients), rounds=4)
    drive(tmp_path / "b", "fedadam", FakeDispatcher(clients), rounds=2)
    assert load_checkpoint(tmp_path / "b").strategy["steps"] == 2  # the server optimizer's state is in it
    resumed, run = drive(tmp_path / "b", "fedadam", FakeDispatcher(clients), rounds=4, resume=True)
    assert straight.saved is not None and resumed.saved is not None
    assert all(torch.equal(straight.saved[k], resumed.saved[k]) for k in KEYS)
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]


def test_two_phases_each_builds_on_the_last_and_records_its_dropouts(tmp_path: Path) -> None:
    import fakes  # noqa: F401 - registers survey_then_train

    clients = {c: surveyed(k) for k, c in enumerate(CLIENTS)}
    dispatcher = FakeDispatcher(clients, drop={(1, "survey"): {"c3"}, (2, "train"): {"c0"}})
    model, run = drive(tmp_path, "survey_then_train", dispatcher, rounds=2)
    # round 1: c3 missed the survey, so it is not asked to train; the others are told the survey's total
    train1 = dispatcher.sent[(1, "train")]
    assert sorted(train1) == ["c0", "c1", "c2"]
    assert all(i.extra["survey_total"] == 10 + 20 + 30 and i.phase == "train" for i in train1.values())
    assert all(i.state == {} and i.phase == "survey" for i in dispatcher.sent[(1, "survey")].values())
    assert dispatcher.sent[(2, "train")]["c0"].extra["survey_total"] == 100
    rows = [r for r in run.read_metrics() if r["round"] >= 1]
    assert rows[0]["failures"] == {"c3": "lost: the test dropped it"} and rows[0]["clients_ok"] == 3
    assert rows[1]["failures"] == {"c0": "lost: the test dropped it"} and rows[1]["clients_ok"] == 3
    # both phases' messages are counted: 4 surveys + 3 updates in round 1
    assert rows[0]["bytes_up"] == 100 * (3 + 3) and rows[0]["bytes_down"] == 10 * (4 + 3)
    # the train phase's result is fedavg of the clients that answered it (weights 1, 1, 2 in round 1)
    want = 0.5 + (1 * 0.375 + 1 * 0.625 + 2 * 0.875) / 4
    assert model.start[KEYS[0]][0, 0].item() == 0.5 and model.saved is not None
    round1 = next(r for r in run.read_metrics() if r["round"] == 1)
    assert round1["eval_loss"] == pytest.approx(want * 8 + (want - 0.5) * 8)


class _NeverEnds(StrategyBase):
    default_phases = ("only",)

    def configure(self, round, client_ids, global_state, rng, *, phase="train", previous=None):  # type: ignore[no-untyped-def]
        return {}

    def aggregate(self, round, global_state, replies, *, phase="train"):  # type: ignore[no-untyped-def]
        return PhaseResult(phase)


def test_a_round_must_end_with_a_round_result(tmp_path: Path) -> None:
    strategy = _NeverEnds(StrategyConfig())
    with pytest.raises(TypeError, match="without a RoundResult"):
        run_rounds(RoundPlan(rounds=1, seed=0, train=TrainConfig()), RunDir(tmp_path), FakeModel(start()), strategy,
                   FakeDispatcher({}), QUIET)


class SlowToGather(FakeDispatcher):
    """Clients that take a while to connect before each round."""

    def available(self, round: int) -> list[str]:
        import time

        time.sleep(0.5)
        return super().available(round)


def test_a_rounds_seconds_leave_out_the_wait_for_clients(tmp_path: Path) -> None:
    clients = {c: trainer(k) for k, c in enumerate(CLIENTS)}
    _, run = drive(tmp_path, "fedavg", SlowToGather(clients), rounds=2)
    seconds = [r["seconds"] for r in run.read_metrics() if r["round"] >= 1]
    assert len(seconds) == 2 and all(s < 0.4 for s in seconds), seconds
