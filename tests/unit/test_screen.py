"""One enrolled node cannot take over or brick the global model: weights, update norms and values are bounded
by the server's policy in the round driver, and a round whose aggregate is not finite is not applied."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import KEYS, WEIGHTS, FakeDispatcher, FakeModel, start, trainer
from rich.console import Console

from fedtune.config import TrainConfig, load_config
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.simulation.faults import HUGE, corrupt
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.screen import ReplyPolicy
from fedtune.types import ClientReply, Instructions

HONEST = ("c0", "c1", "c2", "c3")
QUIET = Console(file=io.StringIO())


def attacker(kind: str):
    """A client that trains as c0 does, then sends what ``kind`` says (the simulator's fault injection)."""
    def train(ins: Instructions) -> ClientReply:
        reply = trainer(0)(ins)
        if kind == "int":  # integer tensors skip a float-only finiteness check
            return ClientReply(ins.client_id, ins.round, {KEYS[0]: torch.full((2, 4), 2**62),
                                                          KEYS[1]: reply.state[KEYS[1]]}, 1)
        if kind == "scale":
            return corrupt(reply, "flip", -1e3, ins.state)  # the update scaled by 1e3 (1e6 is out of range)
        return corrupt(reply, kind, 1.0, ins.state)
    return train


def drive(tmp: Path, clients: dict[str, Any], policy: ReplyPolicy, *, strategy: Any = None, rounds: int = 2,
          drop: dict | None = None) -> tuple[FakeModel, list[dict[str, Any]]]:
    run = RunDir(tmp)
    model = FakeModel(start())
    strategy = strategy or make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0))
    run_rounds(RoundPlan(rounds=rounds, seed=7, train=TrainConfig(), policy=policy), run, model, strategy,
               FakeDispatcher(clients, drop=drop), QUIET)
    return model, [r for r in run.read_metrics() if r["round"] >= 1]


def _honest_clients() -> dict[str, Any]:
    return {c: trainer(k) for k, c in enumerate(HONEST)}


def _equal(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    assert a is not None and b is not None
    return all(torch.equal(a[k], b[k]) for k in KEYS)


def test_a_huge_num_examples_counts_as_max_examples(tmp_path: Path) -> None:
    clients = {**_honest_clients(), "m": attacker("weight")}
    policy = ReplyPolicy(max_examples=8, max_update_norm=None)
    model, rows = drive(tmp_path, clients, policy, rounds=1)
    # by hand: honest c_k sends 0.5 + step_k on A (weights 1, 1, 2, 4), m sends 0.5 - step_0 with weight 8
    steps = [(k + 1) * 0.25 + 0.125 for k in range(4)]
    want = (sum(w * (0.5 + s) for w, s in zip(WEIGHTS, steps, strict=True)) + 8 * (0.5 - steps[0])) / 16
    assert model.saved is not None
    assert torch.equal(model.saved[KEYS[0]], torch.full((2, 4), want))
    assert rows[0]["screen"]["weights_capped"] == {"m": 2**63 - 1}


def test_equal_weighting_ignores_declared_examples(tmp_path: Path) -> None:
    clients = {**_honest_clients(), "m": attacker("weight")}
    model, _ = drive(tmp_path, clients, ReplyPolicy(weighting="equal", max_update_norm=None), rounds=1)
    steps = [(k + 1) * 0.25 + 0.125 for k in range(4)]
    want = (sum(0.5 + s for s in steps) + (0.5 - steps[0])) / 5
    assert model.saved is not None and torch.allclose(model.saved[KEYS[0]], torch.full((2, 4), want))


@pytest.mark.parametrize(("kind", "words"), [
    ("scale", "times the round's median update norm"),
    ("huge", "beyond federation.max_abs_value"),
    ("int", "beyond federation.max_abs_value"),
])
def test_an_outsized_update_is_refused_and_the_round_equals_one_without_it(tmp_path: Path, kind: str,
                                                                            words: str) -> None:
    clients = {**_honest_clients(), "m": attacker(kind)}
    attacked, rows = drive(tmp_path / "attacked", clients, ReplyPolicy())
    clean, _ = drive(tmp_path / "clean", clients, ReplyPolicy(), drop={(1, "train"): {"m"}, (2, "train"): {"m"}})
    assert _equal(attacked.saved, clean.saved)
    assert all(words in r["failures"]["m"] and r["failures"]["m"].startswith("refused: ") for r in rows)
    assert all(r["clients_ok"] == 4 and r["applied"] for r in rows)


def test_an_absolute_norm_bound_refuses_while_replies_stream(tmp_path: Path) -> None:
    clients = {**_honest_clients(), "m": attacker("scale")}
    _, rows = drive(tmp_path, clients, ReplyPolicy(max_update_norm=50.0, norm_bound="absolute"), rounds=1)
    assert "above federation.max_update_norm=50" in rows[0]["failures"]["m"] and rows[0]["clients_ok"] == 4


def test_an_integer_tensor_for_a_float_one_is_refused_without_value_bounds(tmp_path: Path) -> None:
    clients = {**_honest_clients(), "m": attacker("int")}
    _, rows = drive(tmp_path, clients, ReplyPolicy(max_abs_value=None, max_update_norm=None), rounds=1)
    assert "dtype int64, expected a floating-point tensor" in rows[0]["failures"]["m"]


class _Overflows(FedAvg):
    """fedavg whose round-1 aggregate overflows (as B @ A of 1.7e19 factors would), counting its rounds in its
    state so that a test can see the state of a refused round rolled back."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.rounds = 0

    def aggregate(self, round, global_state, replies, *, phase="train"):  # type: ignore[no-untyped-def]
        result = super().aggregate(round, global_state, replies, phase=phase)
        self.rounds += 1
        if round == 1:
            result.state = {k: v * float("inf") for k, v in result.state.items()}
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Any) -> None:
        self.rounds = int(state["rounds"])


def test_a_non_finite_aggregate_is_not_applied_and_the_next_round_is(tmp_path: Path) -> None:
    strategy = _Overflows(StrategyConfig(r=2, lora_alpha=2.0))
    model, rows = drive(tmp_path, _honest_clients(), ReplyPolicy(), strategy=strategy, rounds=2)
    assert not rows[0]["applied"] and "non-finite" in rows[0]["not_applied"]
    assert rows[0]["eval_loss"] == FakeModel(start()).evaluate()["eval_loss"]  # the previous global model
    assert rows[1]["applied"] and "not_applied" not in rows[1]
    assert strategy.rounds == 1  # round 1's state change was rolled back with its aggregate
    assert model.saved is not None and all(torch.isfinite(v).all() for v in model.saved.values())


def test_a_huge_reply_without_value_bounds_leaves_the_global_model_finite(tmp_path: Path) -> None:
    """Without max_abs_value, 1.7e19 in A and B still cannot brick the model: either the reply or the round
    is refused, and the later rounds go on."""
    clients = {**_honest_clients(), "m": attacker("huge")}
    model, rows = drive(tmp_path, clients, ReplyPolicy(max_abs_value=None, max_update_norm=None), rounds=2)
    assert model.saved is not None and all(torch.isfinite(v).all() and v.abs().max() < HUGE for v in
                                           model.saved.values())
    assert all("m" in r["failures"] or "not_applied" in r for r in rows)


def test_the_policy_comes_from_the_federation_section() -> None:
    cfg = load_config(None, ["federation.weighting=equal", "federation.max_examples=50",
                             "federation.max_update_norm=none", "federation.max_abs_value=100"])
    assert ReplyPolicy.from_config(cfg.federation) == ReplyPolicy("equal", 50, None, "median", 100.0)
    with pytest.raises(ValueError) as err:
        load_config(None, ["federation.max_examples=0", "federation.max_update_norm=0.5",
                           "federation.max_abs_value=-1"])
    text = str(err.value)
    assert "federation.max_examples" in text and "federation.max_update_norm" in text
    assert "federation.max_abs_value" in text


def test_the_simulator_injects_each_attack() -> None:
    import random

    from fedtune.config import SimConfig
    from fedtune.simulation.faults import ATTACKS, inject

    sent = start()
    reply = trainer(1)(Instructions(1, "m", sent))
    assert reply.state is not None
    delta = reply.state[KEYS[0]] - sent[KEYS[0]]
    flipped = corrupt(reply, "flip", 4.0, sent)
    assert flipped.state is not None and torch.equal(flipped.state[KEYS[0]], sent[KEYS[0]] - 4.0 * delta)
    weighted = corrupt(reply, "weight", 4.0, sent)
    assert weighted.num_examples == 2**63 - 1 and torch.equal(weighted.state[KEYS[0]], flipped.state[KEYS[0]])
    huge = corrupt(reply, "huge", 1.0, sent)
    assert huge.state is not None and bool((huge.state[KEYS[1]] == HUGE).all())
    rng = random.Random(0)
    kinds = {inject(SimConfig(corrupt_kind="mixed"), rng, byzantine=True) for _ in range(64)}
    assert kinds == set(ATTACKS)
    assert {inject(SimConfig(), rng) for _ in range(64)} == {None}
