"""A shared global pruning mask under secure aggregation (``mask.score = "global"``): the round that fixes the
mask trains dense, the next ones upload masked vectors of only the mask's entries, and the federation ends where
the same run without secure aggregation does (within the fixed-point step); the config's refusals say why."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from fakes import FakeDispatcher, FakeModel
from rich.console import Console

from fedtune import rounds as round_driver
from fedtune.client import phases
from fedtune.client.phases import ClientContext, run_phase
from fedtune.compression.link import make_link
from fedtune.compression.mask import MASK_ROUND, MaskStrategy, with_mask
from fedtune.config import ConfigError, TrainConfig, load_config
from fedtune.privacy.wrap import with_privacy
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.transport.loopback import send_instructions, send_reply
from fedtune.types import ClientReply, Instructions, failed_reply

KEYS = ("m.q.lora_A.weight", "m.q.lora_B.weight")
CLIENTS = ("c0", "c1", "c2", "c3")
QUIET = Console(file=io.StringIO())
UPLOAD = "secagg_upload"


def start() -> dict[str, torch.Tensor]:
    return {KEYS[0]: torch.linspace(-1, 1, 16).reshape(2, 8), KEYS[1]: torch.zeros(8, 2)}


def fake_fit(lm, examples, cfg, ins, *, seed, optimizer_state=None, keep_optimizer_state=False):  # type: ignore[no-untyped-def]
    """Client ``cid`` "learns" fixed random numbers of its name and the round (no model); equal example counts,
    since secure aggregation weighs every client the same."""
    def step(name: str, shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((ins.client_id, ins.round, name)) % 2**31)
        return torch.randn(shape, generator=gen) * 0.1
    return ClientReply(ins.client_id, ins.round, {k: v + step(k, v.shape) for k, v in ins.state.items()}, 5), None


class Wire(FakeDispatcher):
    """The clients' real phase handlers behind the loopback wire; keeps what was sent each way."""

    def __init__(self, cfg, drop=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__({}, drop=drop)
        self.clients = {c: ClientContext(cfg, None, [], pipeline=[]) for c in CLIENTS}  # type: ignore[misc]
        self.down: dict[tuple[int, str], dict[str, Instructions]] = {}
        self.up: dict[tuple[int, str], dict[str, ClientReply]] = {}
        self.bytes_up: dict[tuple[int, str], int] = {}

    def dispatch(self, round, phase, instructions):  # type: ignore[no-untyped-def]
        for cid, ins in instructions.items():
            if cid in self.drop.get((round, phase), set()):
                yield failed_reply(cid, round, "lost: the test dropped it")
                continue
            got, down = send_instructions(ins, "fp32")
            self.down.setdefault((round, phase), {})[cid] = got
            back, up = send_reply(run_phase(self.clients[cid], got), phase, "fp32")
            self.up.setdefault((round, phase), {})[cid] = back
            self.bytes_up[(round, phase)] = self.bytes_up.get((round, phase), 0) + up
            back.bytes_up, back.bytes_down = up, down
            yield back


class History(FakeModel):
    """Keeps the global state after every round."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__(state)
        self.after: list[dict[str, torch.Tensor]] = []

    def apply(self, global_state, result):  # type: ignore[no-untyped-def]
        self.after.append(super().apply(global_state, result))
        return self.after[-1]


def drive(tmp: Path, rounds: int, *overrides: str, drop=None):  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["mask.density=0.25", "mask.score=global", "privacy.clip_norm=10", *overrides])
    strategy = with_privacy(with_mask(make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0)), cfg), cfg)
    model, wire, run = History(start()), Wire(cfg, drop), RunDir(tmp)
    run_rounds(RoundPlan(rounds=rounds, seed=3, train=TrainConfig(), link=make_link(cfg)), run, model, strategy,
               wire, QUIET)
    inner = strategy if isinstance(strategy, MaskStrategy) else getattr(strategy, "inner", None)
    assert isinstance(inner, MaskStrategy)
    return model, wire, inner, [r for r in run.read_metrics() if r["round"] >= 1]


@pytest.fixture
def faked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "fit", fake_fit)
    # the run's plot.png is not what these tests check (test_simulation / test_federation do), and drawing it
    # (matplotlib's import and two figures a run) took most of their time
    monkeypatch.setattr(round_driver, "write_plot", lambda history, path: None)


def test_secure_aggregation_of_a_shared_mask_equals_the_plain_masked_run(tmp_path: Path, faked: None) -> None:
    plain, _, plain_mask, plain_rows = drive(tmp_path / "plain", 3)
    model, wire, strategy, rows = drive(tmp_path / "secagg", 3, "privacy.secagg=true")
    assert strategy.mask is not None and plain_mask.mask is not None and strategy.mask_round == 1
    assert all(torch.equal(strategy.mask[k], plain_mask.mask[k]) for k in KEYS)
    for k in KEYS:  # the same federation, within secure aggregation's fixed-point step
        for ours, theirs in zip(model.after, plain.after, strict=True):
            assert torch.allclose(ours[k], theirs[k], atol=1e-6)
        # outside the mask, rounds 2 and 3 leave round 1's values bit for bit; inside, they move them
        outside = ~strategy.mask[k]
        assert torch.equal(model.current[k][outside], model.after[0][k][outside])
        assert not torch.equal(model.current[k][~outside], model.after[0][k][~outside])
    kept = sum(int(m.sum()) for m in strategy.mask.values())
    assert kept == 8
    # round 1 trains dense and fixes the mask; rounds 2 and 3 upload only the mask's 8 entries, not 32
    assert all(r.state is not None and r.state["masked"].numel() == 32 for r in wire.up[(1, UPLOAD)].values())
    for rnd in (2, 3):
        assert all(r.state is not None and r.state["masked"].numel() == kept for r in wire.up[(rnd, UPLOAD)].values())
        assert all(i.extra[MASK_ROUND] == 1 for i in wire.down[(rnd, UPLOAD)].values())
    # the mask travels once (round 2), then each client uses the one it holds
    assert all(i.mask is not None for i in wire.down[(2, UPLOAD)].values())
    assert all(i.mask is None for i in wire.down[(3, UPLOAD)].values())
    assert wire.bytes_up[(2, UPLOAD)] <= wire.bytes_up[(1, UPLOAD)] - 4 * (32 - kept) * 4  # 4 bytes a word
    assert [r["clients_ok"] for r in rows] == [4, 4, 4] and rows[2]["mask_density"] == 0.25
    assert [r["mask_density"] for r in plain_rows[1:]] == [0.25, 0.25]


@pytest.mark.parametrize("phase", ["secagg_upload", "secagg_unmask"])
def test_a_dropout_in_a_masked_round_leaves_the_plain_masked_mean_of_what_was_summed(
        tmp_path: Path, faked: None, phase: str) -> None:
    """c1 is lost in round 2 (a masked one): before its masked vector arrives, the survivors' masked mean is the
    plain run's without c1 that round; at unmask its vector is already in the sum, as if it had stayed."""
    model, _, strategy, rows = drive(tmp_path / "secagg", 3, "privacy.secagg=true", drop={(2, phase): {"c1"}})
    plain, _, plain_mask, _ = drive(tmp_path / "plain", 3,
                                    drop={(2, "train"): {"c1"}} if phase == "secagg_upload" else None)
    assert strategy.mask is not None and plain_mask.mask is not None
    assert all(torch.equal(strategy.mask[k], plain_mask.mask[k]) for k in KEYS)
    for ours, theirs in zip(model.after, plain.after, strict=True):
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in KEYS)
    assert not all(torch.allclose(model.after[1][k], model.after[0][k]) for k in KEYS)  # round 2 moved it
    counted = 3 if phase == "secagg_upload" else 4  # at unmask c1's masked vector is in the sum
    assert [r["clients_ok"] for r in rows] == [4, counted, 4] and set(rows[1]["failures"]) == {"c1"}
    assert rows[1]["applied"] and rows[1]["mask_density"] == 0.25


def test_a_refresh_trains_dense_again_and_fixes_a_new_mask(tmp_path: Path, faked: None) -> None:
    _, wire, strategy, rows = drive(tmp_path, 4, "privacy.secagg=true", "mask.refresh_every=2")
    sizes = [{r.state["masked"].numel() for r in wire.up[(n, UPLOAD)].values() if r.state} for n in (1, 2, 3, 4)]
    assert sizes == [{32}, {8}, {32}, {8}]
    assert strategy.mask_round == 3 and [r.get("mask_round") for r in rows] == [1, 1, 3, 3]
    assert all(i.mask is not None and i.extra[MASK_ROUND] == 3 for i in wire.down[(4, UPLOAD)].values())


@pytest.mark.parametrize(("overrides", "why"), [
    (["mask.density=0.1", "privacy.secagg=true"], "mask.score: update sends each client's per-entry scores"),
    (["mask.density=0.1", "mask.score=grad_weight", "privacy.secagg=true"], "in the clear"),
    (["privacy.secagg=true", "client.pipeline=[compress]", "compress.method=topk"],
     "per-client top-k, threshold and random-k send supports that differ"),
    (["privacy.secagg=true", "compress.downlink=true", "compress.method=sign"], "Remove compress"),
])
def test_config_refuses_what_secure_aggregation_cannot_sum(overrides: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_config(None, overrides)


def test_config_accepts_a_global_mask_with_secure_aggregation() -> None:
    cfg = load_config(None, ["mask.density=0.1", "mask.score=global", "privacy.secagg=true"])
    assert cfg.privacy.secagg and cfg.mask.score == "global"
