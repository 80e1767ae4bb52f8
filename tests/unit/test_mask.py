"""The global pruning mask through the round driver: exploration, the mask fixed from the scores, sent once as
a bitmap, uploads of exactly the unmasked entries, the masked mean against numpy, masked-out entries unchanged,
a refresh, a client that lost its mask; the config's refusals; hostile masked uploads and mask bitmaps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import FakeModel
from rich.console import Console

from fedtune.client import phases
from fedtune.client.phases import ClientContext, run_phase
from fedtune.compression import explore
from fedtune.compression.link import Link, make_link
from fedtune.compression.mask import EXPLORE, MASK_ROUND, MaskStrategy, fix_mask, gather, scatter
from fedtune.config import ConfigError, TrainConfig, load_config
from fedtune.rounds import RoundPlan, run_rounds
from fedtune.runs import RunDir
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.transport.codec import decode_state, encode_state
from fedtune.transport.errors import MessageRejected
from fedtune.transport.loopback import send_instructions, send_reply
from fedtune.types import ClientReply, Instructions

KEYS = ("m.q.lora_A.weight", "m.q.lora_B.weight")
WEIGHTS = {"c0": 1, "c1": 3, "c2": 4}
QUIET = Console(file=io.StringIO())


def start() -> dict[str, torch.Tensor]:
    return {KEYS[0]: torch.linspace(-1, 1, 16).reshape(2, 8), KEYS[1]: torch.zeros(8, 2)}


def step(cid: str, rnd: int, phase: str, name: str, shape: torch.Size) -> torch.Tensor:
    """What client ``cid`` "learns" in a phase of a round: fixed random numbers (no model)."""
    gen = torch.Generator().manual_seed(hash((cid, rnd, phase, name)) % 2**31)
    return torch.randn(shape, generator=gen) * 0.1


def fake_fit(lm, examples, cfg, ins, *, seed, optimizer_state=None, keep_optimizer_state=False):  # type: ignore[no-untyped-def]
    state = {k: v + step(ins.client_id, ins.round, ins.phase, k, v.shape) for k, v in ins.state.items()}
    return ClientReply(ins.client_id, ins.round, state, WEIGHTS[ins.client_id]), None


class WireDispatcher:
    """Clients run their real phase handlers (training faked) behind the loopback wire in fp32: the mask
    travels as the transport encodes it. Keeps every wire instruction and every reply as sent."""

    def __init__(self, cfg) -> None:  # type: ignore[no-untyped-def]
        self.ctx = {c: ClientContext(cfg, None, []) for c in WEIGHTS}  # type: ignore[arg-type]
        self.wire: dict[tuple[int, str], dict[str, Instructions]] = {}
        self.sent: dict[tuple[int, str], dict[str, ClientReply]] = {}

    def available(self, round: int) -> list[str]:
        return list(WEIGHTS)

    def client_index(self, client_id: str) -> int:
        return list(WEIGHTS).index(client_id)

    def dispatch(self, round, phase, instructions):  # type: ignore[no-untyped-def]
        for cid, ins in instructions.items():
            got, down = send_instructions(ins, "fp32")
            self.wire.setdefault((round, phase), {})[cid] = got
            reply = run_phase(self.ctx[cid], got)
            self.sent.setdefault((round, phase), {})[cid] = reply
            back, up = send_reply(reply, phase, "fp32")
            back.bytes_up, back.bytes_down = up, down
            yield back

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state, round) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture
def faked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "fit", fake_fit)
    monkeypatch.setattr(explore, "fit", fake_fit)


def drive(tmp: Path, rounds: int, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["mask.density=0.25", "mask.explore_steps=1", *overrides])
    strategy = MaskStrategy(make_strategy("fedavg", StrategyConfig(r=2, lora_alpha=2.0)), cfg.mask)
    model, dispatcher = FakeModel(start()), WireDispatcher(cfg)
    history = []

    class Recording(FakeModel):
        def apply(self, global_state, result):  # type: ignore[no-untyped-def]
            history.append((dict(global_state), dict(strategy.mask or {})))
            return model.apply(global_state, result)

    rec = Recording(start())
    run = RunDir(tmp)
    run_rounds(RoundPlan(rounds=rounds, seed=3, train=TrainConfig(), link=make_link(cfg)), run, rec, strategy,
               dispatcher, QUIET)
    return model, dispatcher, history, [r for r in run.read_metrics() if r["round"] >= 1]


def test_explore_fix_the_mask_send_only_its_entries_and_average_them(tmp_path: Path, faked: None) -> None:
    model, disp, history, rows = drive(tmp_path, 1)
    assert list(disp.wire) == [(1, EXPLORE), (1, "train")]
    # the mask: the top quarter of each tensor by the explorers' mean squared step (weighted by examples)
    scores = {k: sum(WEIGHTS[c] * step(c, 1, EXPLORE, k, v.shape).double() ** 2 for c in WEIGHTS) / 8
              for k, v in start().items()}
    mask = fix_mask(scores, 0.25)
    (_, used), = history
    assert all(torch.equal(used[k], mask[k]) and int(mask[k].sum()) == 4 for k in KEYS)
    for cid, ins in disp.wire[(1, "train")].items():
        assert ins.mask is not None and all(torch.equal(ins.mask[k], mask[k]) for k in KEYS)  # decoded bitmap
        sent = disp.sent[(1, "train")][cid].state
        assert sent is not None
        for k in KEYS:  # exactly the unmasked entries, in flat order, of what the client trained
            trained = start()[k] + step(cid, 1, "train", k, start()[k].shape)
            assert sent[k].shape == (4,) and torch.equal(sent[k], trained[mask[k]])
    for k in KEYS:  # the masked mean against numpy; every other entry keeps its global value bit for bit
        g = start()[k].numpy()
        xs = [(g + step(c, 1, "train", k, g.shape).numpy()) * WEIGHTS[c] for c in WEIGHTS]
        want = np.where(mask[k].numpy(), np.sum(xs, axis=0) / sum(WEIGHTS.values()), g)
        assert np.allclose(model.current[k].numpy(), want, atol=1e-6)
        assert torch.equal(model.current[k][~mask[k]], start()[k][~mask[k]])
    assert rows[0]["mask_density"] == 0.25 and rows[0]["clients_ok"] == 3


def test_the_mask_goes_once_a_refresh_sends_a_new_one_and_a_client_that_lost_it_gets_it_again(
        tmp_path: Path, faked: None, monkeypatch: pytest.MonkeyPatch) -> None:
    original = WireDispatcher.dispatch

    def forgetful(self, round, phase, instructions):  # type: ignore[no-untyped-def]
        if (round, phase) == (2, "train"):
            self.ctx["c1"].state.clear()  # c1's process restarted: it holds no mask
        yield from original(self, round, phase, instructions)

    monkeypatch.setattr(WireDispatcher, "dispatch", forgetful)
    model, disp, history, rows = drive(tmp_path, 4, "mask.refresh_every=3")
    assert [[p for r, p in disp.wire if r == n] for n in (1, 2, 3, 4)] == [
        [EXPLORE, "train"], ["train"], ["train"], [EXPLORE, "train"]]
    assert all(i.mask is None and i.extra[MASK_ROUND] == 1 for i in disp.wire[(2, "train")].values())
    assert rows[0]["bytes_down"] > rows[1]["bytes_down"]  # the explore phase and the mask travelled in round 1
    assert [rows[i]["mask_round"] for i in range(4)] == [1, 1, 1, 4]
    assert "holds none" in rows[1]["failures"]["c1"] and rows[1]["clients_ok"] == 2
    assert disp.wire[(3, "train")]["c1"].mask is not None  # sent again to the client that lost it
    assert disp.wire[(3, "train")]["c0"].mask is None
    assert all(i.mask is not None for i in disp.wire[(4, "train")].values())  # the refreshed mask
    # every round leaves the entries outside that round's mask unchanged
    states = [s for s, _ in history] + [model.current]
    for (before, mask), after in zip(history, states[1:], strict=True):
        for k in KEYS:
            assert torch.equal(after[k][~mask[k]], before[k][~mask[k]])


def test_mask_and_sign_compression_compose(tmp_path: Path, faked: None) -> None:
    model, disp, history, rows = drive(tmp_path, 2, "client.pipeline=[compress]", "compress.method=sign")
    (_, mask), _ = history
    assert all(disp.sent[(2, "train")][c].delta for c in WEIGHTS)
    for k in KEYS:
        assert torch.equal(model.current[k][~mask[k]], start()[k][~mask[k]])
        assert not torch.equal(model.current[k][mask[k]], start()[k][mask[k]])
    assert all(r["clients_ok"] == 3 for r in rows)


def test_hostile_masked_uploads_are_refused_with_the_reason() -> None:
    like = start()
    mask = fix_mask({k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) for k, v in like.items()}, 0.25)
    good = gather({k: v + 1 for k, v in like.items()}, mask)
    assert all(torch.equal(scatter(good, like, mask)[k][mask[k]], like[k][mask[k]] + 1) for k in KEYS)
    for bad, why in [({**good, KEYS[0]: good[KEYS[0]][:3]}, "3 values"),
                     ({**good, KEYS[0]: torch.zeros(5)}, "5 values"),
                     ({**good, KEYS[0]: good[KEYS[0]].reshape(2, 2)}, r"shape \(2, 2\)"),
                     ({KEYS[1]: good[KEYS[1]]}, "missing"),
                     ({**good, "other": torch.zeros(4)}, "unexpected")]:
        with pytest.raises(ValueError, match=why):
            scatter(bad, like, mask)
    with pytest.raises(ValueError, match="mask of"):
        scatter(good, like, {**mask, KEYS[0]: torch.ones(3, dtype=torch.bool)})
    # through the server's Link, a wrong count is a failed reply naming it, not an exception
    link = Link(load_config(None, []).compress, uplink=False)
    ins = {"c0": Instructions(1, "c0", like, mask=mask, extra={MASK_ROUND: 1})}
    (out,) = link.up([ClientReply("c0", 1, {**good, KEYS[0]: torch.zeros(5)}, 1)], ins)
    assert out.error is not None and "5 values" in out.error


def test_a_client_refuses_a_mask_of_the_wrong_shape() -> None:
    cfg = load_config(None, [])
    ctx = ClientContext(cfg, None, [], pipeline=[])  # type: ignore[arg-type]
    ins = Instructions(1, "c0", start(), mask={KEYS[0]: torch.ones(3, dtype=torch.bool)}, extra={MASK_ROUND: 1})
    got = phases.received(ctx, ins)
    assert isinstance(got, ClientReply) and got.error is not None and "mask of" in got.error


def test_bitmap_decoder_refuses_hostile_payloads() -> None:
    m = {"m": torch.tensor([True, False, True, True, False, False, False, False, True, False])}
    chunks = list(encode_state(m, "bitmap"))
    assert torch.equal(decode_state(chunks)["m"], m["m"]) and len(chunks[0].data) == 2
    wrong_count = chunks[0].__deepcopy__()
    wrong_count.meta.nnz = 3
    past_end = chunks[0].__deepcopy__()
    past_end.data = bytes([past_end.data[0], past_end.data[1] | 0x80])
    short = chunks[0].__deepcopy__()
    short.data = short.data[:1]
    for bad in (wrong_count, past_end, short):
        with pytest.raises(MessageRejected):
            decode_state([bad])
    floats = list(encode_state({"w": torch.ones(3)}, "bitmap"))  # not a mask: travels dense
    assert floats[0].meta.encoding == "dense"
    as_float = chunks[0].__deepcopy__()
    as_float.meta.dtype = "float32"
    with pytest.raises(MessageRejected):
        decode_state([as_float])


@pytest.mark.parametrize(("overrides", "why"), [
    (["strategy.name=svd"], "combine whole factors"),
    (["strategy.name=median"], "robust"),
    (["privacy.dp=central", "sim.clients_per_round=0"], "in the clear"),
    (["sim.batch_clients=2"], "sim.batch_clients=1"),
    (["client.pipeline=[rank_prune]", "strategy.name=svd"], "rank_prune"),
    (["mask.explore_steps=0"], "mask.explore_steps"),
])
def test_config_refuses_masks_where_they_cannot_work(overrides: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_config(None, ["mask.density=0.1", *overrides])


def test_config_accepts_masks_with_the_averaging_strategies() -> None:
    for name in ("fedavg", "fedprox", "fedadam"):
        load_config(None, ["mask.density=0.1", f"strategy.name={name}"])
    load_config(None, ["mask.density=0.1", "strategy.name=ffa", "adapter.method=lora_fa"])


def test_an_exploration_reply_does_not_count_as_holding_the_downlink_reference() -> None:
    from fedtune.compression.config import CompressConfig

    link = Link(CompressConfig(method="sign", downlink=True), uplink=False)
    explore_ins = {"c0": Instructions(3, "c0", start(), phase=EXPLORE)}
    list(link.up([ClientReply("c0", 3, start(), 1)], explore_ins))
    assert "c0" not in link.holders  # it holds no reference: the next train round must send it in full
    train_ins = {"c0": Instructions(3, "c0", start())}
    list(link.up([ClientReply("c0", 3, start(), 1)], train_ins))
    assert "c0" in link.holders
