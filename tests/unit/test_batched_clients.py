"""Batched virtual clients: K clients in one pass end exactly where K sequential clients end."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from fedtune.adapters import AdapterStateError, get_state, set_state
from fedtune.client.fit import fit
from fedtune.config import load_config
from fedtune.models import load_model
from fedtune.pipeline import encode
from fedtune.simulation import batched as batched_module
from fedtune.simulation.batched import Job, fit_batch
from fedtune.simulation.multilora import MultiLoRA, unsupported
from fedtune.types import Instructions

TINY = ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "train.batch_size=2",
        "train.seq_len=48", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj,down_proj]"]


def _records(n: int, offset: int) -> list[dict[str, str]]:
    words = ["sky", "blue", "cow", "water", "grass", "green", "sun", "warm", "tree", "tall"]
    return [{"prompt": f"Tell me about the {words[(i + offset) % 10]} " + "and more " * ((i * 3 + offset) % 5),
             "response": f"It is {words[(i + offset + 1) % 10]}" + " indeed" * (i % 4) + "."} for i in range(n)]


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of clients of every batched training call (none: every client trained alone)."""
    seen: list[int] = []
    real = batched_module.train_batched

    def spy(multi, examples, *args, **kwargs):
        seen.append(len(examples))
        return real(multi, examples, *args, **kwargs)

    monkeypatch.setattr(batched_module, "train_batched", spy)
    return seen


def _setup(*extra: str):
    cfg = load_config(None, [*TINY, *extra])
    lm = load_model(cfg)
    return cfg, lm


def _global_state(lm, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in get_state(lm.model).items()}


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for k, v in a.items():
        assert torch.allclose(v, b[k], atol=tol, rtol=0), (k, (v - b[k]).abs().max())


def _close_optimizer(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for i, st in a["state"].items():
        for name, v in st.items():
            assert torch.allclose(v.float(), b["state"][i][name].float(), atol=tol, rtol=0), (i, name)


def test_slots_read_back_what_was_loaded_and_compute_each_clients_layer() -> None:
    _, lm = _setup()
    before = get_state(lm.model)
    multi = MultiLoRA(lm.model, 3)
    states = [_global_state(lm, s) for s in (1, 2, 3)]
    for k, st in enumerate(states):
        multi.set_slot_state(k, st)
    for k, st in enumerate(states):
        _close(multi.get_slot_state(k), st, tol=0)
    _close(get_state(lm.model), before, tol=0)  # the model's own adapter is not touched
    with pytest.raises(AdapterStateError, match="missing"):
        multi.set_slot_state(0, dict(list(states[0].items())[1:]))
    with pytest.raises(AdapterStateError, match="unexpected"):
        multi.set_slot_state(0, {**states[0], "nope.lora_A.weight": torch.zeros(1)})
    _close(multi.get_slot_state(0), states[0], tol=0)  # a refused load writes nothing
    # one forward of three clients' rows (ragged: 2, 1, 2) equals each client's own forward
    ids = torch.randint(5, 100, (5, 7))
    rows = [2, 1, 2]
    with torch.no_grad():
        with multi.active():
            multi.set_batch([0, 1, 2], rows)
            batched = lm.model(input_ids=ids).logits
        expected = []
        for st, part in zip(states, torch.split(ids, rows), strict=True):
            set_state(lm.model, st)
            expected.append(lm.model(input_ids=part).logits)
    assert torch.allclose(batched, torch.cat(expected), atol=1e-5)
    with torch.no_grad():  # the layers are back to the model's own adapter afterwards
        assert torch.allclose(lm.model(input_ids=ids[3:]).logits, expected[2], atol=1e-6)


@pytest.mark.parametrize("keep", [False, True])
def test_batched_clients_end_as_sequential_ones(keep: bool, batch_sizes: list[int]) -> None:
    """Different data sizes and steps per client (a finished client leaves the batch), clipping that bites,
    FedProx, a warm-up + cosine schedule per client, kept optimizer state over two rounds."""
    cfg, lm = _setup("train.max_grad_norm=0.05", "train.prox_mu=0.5", "train.lr=5e-3", "train.warmup_steps=1",
                     "train.schedule=cosine", "train.weight_decay=0.01")
    sizes, steps = [3, 7, 1, 5], [2, 4, 3, 1]
    data = [encode(_records(n, i), lm.tokenizer, cfg) for i, n in enumerate(sizes)]
    state = _global_state(lm)
    opt_seq: list = [None] * 4
    opt_bat: list = [None] * 4
    for rnd in (1, 2):
        jobs = [Job(data[i], Instructions(rnd, f"c{i}", state, train={"max_steps": steps[i] + rnd - 1}),
                    seed=100 * rnd + i, optimizer_state=opt_bat[i]) for i in range(4)]
        sequential = [fit(lm, j.examples, cfg, j.ins, seed=j.seed, optimizer_state=opt_seq[i],
                          keep_optimizer_state=keep) for i, j in enumerate(jobs)]
        batched = fit_batch(lm, cfg, jobs, keep_optimizer_state=keep)
        for i, ((r_seq, o_seq), (r_bat, o_bat)) in enumerate(zip(sequential, batched, strict=True)):
            assert r_bat.error is None
            assert r_bat.num_examples == sizes[i]
            assert r_bat.metrics["train_steps"] == steps[i] + rnd - 1
            assert not torch.allclose(r_bat.state[next(iter(state))], state[next(iter(state))])  # it trained
            _close(r_bat.state, r_seq.state)
            assert r_bat.metrics["train_loss"] == pytest.approx(r_seq.metrics["train_loss"], abs=1e-5)
            assert r_bat.metrics["train_tokens"] == r_seq.metrics["train_tokens"]
            if keep:
                _close_optimizer(o_bat, o_seq)
                assert int(o_bat["state"][0]["step"]) == (steps[i] + rnd - 1) + (steps[i] if rnd == 2 else 0)
            else:
                assert o_bat is None
            opt_seq[i], opt_bat[i] = o_seq, o_bat
    assert batch_sizes == [4, 4]


def test_a_bad_client_fails_alone_and_dora_falls_back_with_a_reason(caplog: pytest.LogCaptureFixture,
                                                                    batch_sizes: list[int]) -> None:
    cfg, lm = _setup("train.max_steps=2")
    data = [encode(_records(4, i), lm.tokenizer, cfg) for i in range(3)]
    state = _global_state(lm)
    bad = {k: v.clone() for k, v in state.items()}
    bad[next(iter(bad))][0, 0] = float("nan")
    jobs = [Job(data[0], Instructions(1, "a", state), 1), Job(data[1], Instructions(1, "b", bad), 2),
            Job(data[2], Instructions(1, "c", state, train={"lr": -1.0}), 3),
            Job(data[0], Instructions(1, "d", state), 4)]
    replies = [r for r, _ in fit_batch(lm, cfg, jobs)]
    assert [r.client_id for r in replies] == ["a", "b", "c", "d"]
    assert replies[0].error is None and replies[3].error is None
    assert "NaN" in (replies[1].error or "") and "train.lr" in (replies[2].error or "")
    assert batch_sizes == [2]  # the two good clients, together

    cfg, lm = _setup("train.max_steps=2", "adapter.method=dora")
    assert "DoRA" in (unsupported(lm.model) or "")
    state = _global_state(lm)
    jobs = [Job(data[i], Instructions(1, f"c{i}", state), i) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="fedtune.simulation.batched"):
        batched = fit_batch(lm, cfg, jobs)
    assert "DoRA" in caplog.text and "one after another" in caplog.text
    assert batch_sizes == [2]  # only the first test's batch: DoRA trained one by one
    for r, _ in batched:
        assert r.error is None and "fit_seconds" in r.metrics
        assert any(not torch.equal(r.state[k], state[k]) for k in state)


def _seq_and_batched(cfg, lm, sizes: list[int]):
    data = [encode(_records(n, i), lm.tokenizer, cfg) for i, n in enumerate(sizes)]
    state = _global_state(lm)
    jobs = [Job(data[i], Instructions(1, f"c{i}", state), seed=i) for i in range(len(sizes))]
    sequential = [fit(lm, j.examples, cfg, j.ins, seed=j.seed)[0] for j in jobs]
    return state, sequential, [r for r, _ in fit_batch(lm, cfg, jobs)]


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_nf4_batched_clients_train_and_match_sequential(compute: str) -> None:
    """NF4 base (bitsandbytes on the CPU). fp32 compute: the same 1e-5 as an fp32 base. bf16 compute (the
    usual NF4 setting): bf16 rounds the base projection of the batch differently from each client's own,
    so the bound is looser: every factor's distance to the sequential result is within 5% of its update,
    and the mean losses within 0.01."""
    pytest.importorskip("bitsandbytes")
    cfg, lm = _setup("quant.mode=nf4", f"quant.compute_dtype={compute}", "train.max_steps=6", "train.lr=1e-2")
    assert lm.quantized
    state, sequential, batched = _seq_and_batched(cfg, lm, [4, 6, 3])
    for s, b in zip(sequential, batched, strict=True):
        assert b.error is None
        assert b.metrics["train_final_loss"] < b.metrics["train_loss"] - 0.5  # it learns
        if compute == "fp32":
            _close(b.state, s.state)
        for k, v in b.state.items():
            update = (s.state[k] - state[k]).norm()
            assert (v - s.state[k]).norm() <= 0.05 * update, k
        assert b.metrics["train_loss"] == pytest.approx(s.metrics["train_loss"], abs=1e-2)


def test_auto_batch_clients_is_the_largest_that_fits_capped_by_a_workers_share() -> None:
    """``sim.batch_clients=auto`` at mocked memory sizes: base weights once, 100 bytes a client per worker."""
    from fedtune.info import ModelInfo, available_bytes, batch_clients_that_fit, choose_batch_clients

    info = ModelInfo(params=0, trainable=0, weight_bytes=1000, adapter_bytes=10, grads_bytes=10,
                     optimizer_bytes=20, activation_bytes=60)
    assert batch_clients_that_fit(info, 1000 + 8 * 100) == 8
    assert batch_clients_that_fit(info, 1000 + 8 * 100 - 1) == 7
    assert batch_clients_that_fit(info, 1000 + 8 * 100, workers=2) == 4  # each worker holds its own batch
    assert batch_clients_that_fit(info, 500) == 0

    def auto(available: int, *overrides: str, refusal: str | None = None) -> int:
        cfg = load_config(None, [*TINY, "sim.num_clients=32", "sim.clients_per_round=12", *overrides])
        k, why = choose_batch_clients(cfg, dataclasses.replace(info, batch_refusal=refusal), available, "RAM")
        assert why
        return k

    usable = int((1000 + 5 * 100) / 0.9) + 1  # 90% of it: the weights and five clients
    assert auto(usable) == 5
    assert auto(10**9) == 12  # memory for thousands: a round's 12 clients
    assert auto(10**9, "sim.workers=5") == 3  # 12 clients over 5 workers: at most 3 each
    assert auto(usable, "sim.workers=2") == 2  # five clients' memory over two workers
    assert auto(600) == 1  # not even one fits: one at a time, as without batching
    assert auto(10**9, "sim.clients_per_round=0") == 32
    assert auto(10**9, "sim.mode=centralized") == 1
    assert auto(10**9, "sim.backend=flower") == 1
    assert auto(10**9, refusal="DoRA rescales the base weight") == 1
    free, where = available_bytes("cpu")
    assert free > 0 and ("memory" in where or "RAM" in where)
