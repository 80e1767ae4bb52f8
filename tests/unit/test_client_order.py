"""A streamed fedavg round sums its replies in client order whatever order they arrive in: real federations
are reproducible, and equal their simulation (which answers in client order) bit for bit."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fakes import FakeDispatcher, FakeModel
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedtune.config import TrainConfig
from fedtune.dispatch import ClientOrder
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.strategies.screen import ReplyPolicy
from fedtune.types import ClientReply, Instructions, failed_reply

CLIENTS = [f"c{i}" for i in range(6)]
QUIET = Console(file=io.StringIO())


def noisy(k: int):
    """Client k's update: random fp32 values of mixed magnitudes (sums of them depend on the order)."""
    def train(ins: Instructions) -> ClientReply:
        g = torch.Generator().manual_seed(1000 * ins.round + k)
        state = {n: v + torch.randn(v.shape, generator=g) * 10.0 ** (k % 3 - 2) for n, v in ins.state.items()}
        return ClientReply(ins.client_id, ins.round, state, 3 + 7 * k)
    return train


class Shuffled(FakeDispatcher):
    """Delivers each phase's replies in an order drawn from ``seed`` (None: the instructions' order)."""

    def __init__(self, seed: int | None, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__({c: noisy(k) for k, c in enumerate(CLIENTS)}, reverse=False, **kw)
        self.seed = seed

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        replies = list(super().dispatch(round, phase, instructions))
        if self.seed is not None:
            random.Random(f"{self.seed}/{round}").shuffle(replies)
        yield from replies


def run(tmp: Path, seed: int | None, hold: int = 64, drop: dict | None = None) -> tuple[dict, list[dict]]:
    model = FakeModel({"l.lora_A.weight": torch.randn(8, 32, generator=torch.Generator().manual_seed(0)),
                       "l.lora_B.weight": torch.zeros(32, 8)})
    # replies stream (no median bound, which holds a round's replies and sorts them anyway)
    plan = RoundPlan(rounds=3, seed=1, train=TrainConfig(), reorder_buffer=hold,
                     policy=ReplyPolicy(max_update_norm=100.0, norm_bound="absolute"))
    strategy = make_strategy("fedavg", StrategyConfig(r=8, lora_alpha=8.0))
    run_dir = RunDir(tmp)
    run_rounds(plan, run_dir, model, strategy, Shuffled(seed, drop=drop), QUIET)
    assert model.saved is not None
    return model.saved, [r for r in run_dir.read_metrics() if r["round"] >= 1]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_any_arrival_order_gives_the_client_order_result_bit_for_bit(tmp_path: Path) -> None:
    drop = {(2, "train"): {"c1"}}
    ordered, _ = run(tmp_path / "ordered", None, drop=drop)
    for seed in range(4):
        shuffled, rows = run(tmp_path / f"s{seed}", seed, drop=drop)
        assert _same(shuffled, ordered), seed
        assert all("screen" not in r or "out_of_order" not in r["screen"] for r in rows)
    # the test can tell: summed in arrival order, the same replies give another result
    arrival = [run(tmp_path / f"a{seed}", seed, hold=0, drop=drop)[0] for seed in range(4)]
    assert not all(_same(a, ordered) for a in arrival)


def test_past_the_buffer_replies_go_on_in_arrival_order_and_the_record_says_so(tmp_path: Path) -> None:
    _, rows = run(tmp_path, seed=3, hold=1)
    assert sum(r.get("screen", {}).get("out_of_order", 0) for r in rows) > 0


def _reply(cid: str, ok: bool = True) -> ClientReply:
    return ClientReply(cid, 1, {"x": torch.zeros(1)}, 1) if ok else failed_reply(cid, 1, "lost")


@settings(max_examples=200, deadline=None)
@given(st.permutations(range(6)), st.sets(st.integers(0, 5)), st.integers(0, 6))
def test_every_reply_comes_out_once_in_client_order_within_the_buffer(perm: list[int], failed: set[int],
                                                                        hold: int) -> None:
    order = ClientOrder(CLIENTS, hold)
    out = [r.client_id for r in order(_reply(CLIENTS[i], i not in failed) for i in perm)]
    assert sorted(out) == sorted(CLIENTS)
    if order.out_of_order == 0:
        assert out == CLIENTS
    # the most replies with a state that ever wait for an earlier client: within the buffer, order is kept
    waiting_max, seen = 0, set()
    for i in perm:
        seen.add(i)
        first_missing = min(set(range(6)) - seen, default=6)
        waiting_max = max(waiting_max, sum(1 for j in seen if j > first_missing and j not in failed))
    if waiting_max <= hold:
        assert order.out_of_order == 0


@pytest.mark.parametrize("extra", ["stranger", "c0"])
def test_replies_from_unasked_or_repeated_clients_pass_through(extra: str) -> None:
    order = ClientOrder(CLIENTS[:2], 4)
    out = [r.client_id for r in order([_reply("c1"), _reply("c0"), _reply(extra)])]
    assert out == ["c0", "c1", extra]
