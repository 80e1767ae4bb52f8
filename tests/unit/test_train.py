"""The local training loop: it learns, it is deterministic, FedProx pulls back, NF4 trains on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune import adapters
from fedtune.client.fit import fit, with_training
from fedtune.config import load_config
from fedtune.eval import evaluate, generate_answers
from fedtune.models import load_model
from fedtune.pipeline import encode
from fedtune.train import lr_lambda, train_local
from fedtune.types import Instructions

pytestmark = pytest.mark.integration  # trains the tiny model

RECORDS = [{"prompt": "What colour is the sky?", "response": "The sky is blue."},
           {"prompt": "What do cows drink?", "response": "Cows drink water."}]


def _setup(tiny_overrides: list[str], *extra: str):
    cfg = load_config(None, [*tiny_overrides, *extra])
    lm = load_model(cfg)
    return cfg, lm, encode(RECORDS, lm.tokenizer, cfg)


def _train(cfg, lm, examples, **kw):
    return train_local(lm.model, examples, cfg.train, device=lm.device, compute_dtype=lm.compute_dtype,
                       pad_id=lm.tokenizer.pad_token_id, seed=cfg.seed, **kw)


def test_overfits_a_tiny_set(tiny_overrides: list[str]) -> None:
    cfg, lm, ex = _setup(tiny_overrides, "train.max_steps=40", "train.lr=1e-2", "adapter.r=8",
                         "adapter.target_modules=[all-linear]")
    before = evaluate(lm.model, ex, device=lm.device, pad_id=lm.tokenizer.pad_token_id)["eval_loss"]
    result = _train(cfg, lm, ex)
    after = evaluate(lm.model, ex, device=lm.device, pad_id=lm.tokenizer.pad_token_id)["eval_loss"]
    assert after < before / 2, (before, after)
    assert result.metrics["tokens"] > 0 and result.metrics["tokens_per_s"] > 0
    assert len(result.losses) == 40


def test_same_seed_same_adapter(tiny_overrides: list[str]) -> None:
    states = []
    for _ in range(2):
        cfg, lm, ex = _setup(tiny_overrides, "train.max_steps=3", "train.lr=1e-3")
        _train(cfg, lm, ex)
        states.append(adapters.get_state(lm.model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_proximal_term_keeps_weights_near_reference(tiny_overrides: list[str]) -> None:
    drift = {}
    for mu in (0.0, 50.0):
        cfg, lm, ex = _setup(tiny_overrides, "train.max_steps=15", "train.lr=1e-2", "train.optimizer=sgd",
                             "train.max_grad_norm=none", f"train.prox_mu={mu}")
        ref = adapters.get_state(lm.model)
        _train(cfg, lm, ex, ref_state=ref)
        d = adapters.delta(adapters.get_state(lm.model), ref)
        drift[mu] = sum(float(v.norm() ** 2) for v in d.values()) ** 0.5
    assert drift[50.0] < 0.8 * drift[0.0], drift


def test_grad_accumulation_and_schedules(tiny_overrides: list[str]) -> None:
    cfg, lm, ex = _setup(tiny_overrides, "train.max_steps=2", "train.grad_accum=2", "train.schedule=cosine",
                         "train.warmup_steps=1")
    result = _train(cfg, lm, ex)
    assert result.metrics["steps"] == 2
    f = lr_lambda("cosine", 2, 10)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda("linear", 0, 4)(2) == pytest.approx(0.5)


def test_nf4_loads_and_trains_on_cpu(tiny_overrides: list[str]) -> None:
    pytest.importorskip("bitsandbytes")
    cfg, lm, ex = _setup(tiny_overrides, "quant.mode=nf4", "quant.compute_dtype=bf16", "train.max_steps=3",
                         "train.lr=1e-2")
    assert lm.quantized
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in lm.model.modules())
    # Evaluate first, as every round does: bitsandbytes must not repack the weights into a format that
    # blocks gradients (it does on AVX512-BF16 CPUs unless fedtune turns it off).
    evaluate(lm.model, ex, device=lm.device, pad_id=lm.tokenizer.pad_token_id, compute_dtype=lm.compute_dtype)
    generate_answers(lm.model, lm.tokenizer, ["What do cows drink?"], device=lm.device, max_new_tokens=2)
    before = adapters.get_state(lm.model)
    result = _train(cfg, lm, ex)
    after = adapters.get_state(lm.model)
    assert torch.isfinite(torch.tensor(result.losses)).all()
    changed_b = [k for k in before if ".lora_B." in k and not torch.equal(before[k], after[k])]
    assert len(changed_b) == len([k for k in before if ".lora_B." in k]), "every LoRA B must train"


def test_optimizer_state_carries_over(tiny_overrides: list[str]) -> None:
    cfg, lm, ex = _setup(tiny_overrides, "train.max_steps=2")
    first = _train(cfg, lm, ex, keep_optimizer_state=True)
    assert first.optimizer_state is not None and first.optimizer_state["state"]
    second = _train(cfg, lm, ex, optimizer_state=first.optimizer_state, keep_optimizer_state=True)
    steps = [int(s["step"]) for s in second.optimizer_state["state"].values()]
    assert all(s == 4 for s in steps)
    assert dataclasses.is_dataclass(cfg.train)


def test_the_servers_training_instructions_override_the_sites(tiny_overrides: list[str]) -> None:
    """A federation trains as the server's ``train.*`` say, whatever the site's own section holds."""
    server = load_config(None, [*tiny_overrides, "train.max_steps=5", "train.lr=1e-2", "train.optimizer=sgd"])
    site, lm, ex = _setup(tiny_overrides, "train.max_steps=400", "train.lr=1e-5")
    start = adapters.get_state(lm.model)
    ins = with_training({"c": Instructions(1, "c", start, train={"prox_mu": 0.5})}, server.train)["c"]
    assert ins.train["max_steps"] == 5 and ins.train["prox_mu"] == 0.5  # the strategy's overrides win
    reply, _ = fit(lm, ex, site, ins, seed=7)
    assert reply.error is None and reply.metrics["train_steps"] == 5
    # the same as training with the server's section (and that proximal term) at the site
    adapters.set_state(lm.model, start)
    _train(dataclasses.replace(server, seed=7, train=dataclasses.replace(server.train, prox_mu=0.5)), lm, ex,
           ref_state=start)
    want = adapters.get_state(lm.model)
    assert all(torch.equal(reply.state[k], want[k]) for k in want)


@pytest.mark.parametrize(("train", "named"), [
    ({"lr": -1.0}, "train.lr: got -1.0, must be > 0"),
    ({"max_steps": "many"}, "train.max_steps: got 'many', expected an integer"),
    ({"seq_len": 4096}, "train.seq_len: not a training instruction"),
    ({"optimizer": "lion"}, "train.optimizer: got 'lion', allowed values"),
])
def test_bad_training_instructions_are_a_failed_reply_naming_the_key(tiny_overrides: list[str], train, named) -> None:
    cfg, lm, ex = _setup(tiny_overrides)
    reply, _ = fit(lm, ex, cfg, Instructions(1, "c", adapters.get_state(lm.model), train=train), seed=0)
    assert reply.state is None and reply.error.startswith("bad training instructions: ")
    assert named in reply.error, reply.error
