"""Adapter state: round trips, clear errors, PEFT-format export and merge, identical frozen parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune import adapters
from fedtune.config import load_config
from fedtune.models import load_model


def _load(tiny_overrides: list[str], *extra: str):
    return load_model(load_config(None, [*tiny_overrides, *extra]))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_state_round_trip_and_flatten(tiny_overrides: list[str]) -> None:
    lm = _load(tiny_overrides)
    state = adapters.get_state(lm.model)
    assert state and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    changed = {k: torch.randn_like(v) for k, v in state.items()}
    adapters.set_state(lm.model, changed)
    assert all(torch.equal(adapters.get_state(lm.model)[k], v) for k, v in changed.items())
    vec, spec = adapters.flatten(changed)
    assert vec.numel() == adapters.num_params(changed)
    assert all(torch.equal(adapters.unflatten(vec, spec)[k], v) for k, v in changed.items())
    assert adapters.nbytes(changed) == vec.numel() * 4
    d = adapters.delta(changed, state)
    assert all(torch.allclose(adapters.add(state, d)[k], changed[k]) for k in state)


def test_set_state_names_every_problem(tiny_overrides: list[str]) -> None:
    lm = _load(tiny_overrides)
    state = adapters.get_state(lm.model)
    keys = list(state)
    bad = dict(state)
    del bad[keys[0]]
    bad["base_model.model.bogus.lora_A.weight"] = torch.zeros(2, 2)
    bad[keys[1]] = torch.zeros(3, 3)
    with pytest.raises(adapters.AdapterStateError) as err:
        adapters.set_state(lm.model, bad)
    msg = str(err.value)
    assert "missing 1" in msg and keys[0] in msg
    assert "unexpected 1" in msg and "bogus" in msg
    assert keys[1] in msg and "shape (3, 3)" in msg
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    with pytest.raises(adapters.AdapterStateError, match="NaN"):
        adapters.set_state(lm.model, nan_state)
    # nothing was written by the rejected loads
    assert all(torch.equal(adapters.get_state(lm.model)[k], v) for k, v in state.items())


def test_export_loads_with_peft_and_merge_matches(tiny_overrides: list[str], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = _load(tiny_overrides)
    adapters.set_state(lm.model, {k: torch.randn_like(v) * 0.1 for k, v in adapters.get_state(lm.model).items()})
    ids = torch.randint(0, 1000, (2, 12))
    expected = _logits(lm.model, ids)
    adapters.save_adapter(lm.model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(lm.source.path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.allclose(_logits(reloaded, ids), expected, atol=1e-5)
    adapters.merge_and_save(reloaded, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-4)


@pytest.mark.parametrize("method", ["rslora", "dora", "vera", "lora_fa"])
def test_adapter_methods_build_and_train_only_what_they_should(tiny_overrides: list[str], method: str) -> None:
    lm = _load(tiny_overrides, f"adapter.method={method}")
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable
    if method == "lora_fa":
        assert all(".lora_B." in n for n in trainable)
        full = adapters.get_state(lm.model, trainable_only=False)
        assert any(".lora_A." in k for k in full)
        assert not any(".lora_A." in k for k in adapters.get_state(lm.model))
    if method == "vera":
        assert all("vera_lambda" in n for n in trainable)
    if method == "dora":
        assert any("magnitude" in n for n in trainable)


FROZEN_A_SCRIPT = """
import sys, torch
from fedtune.config import load_config
from fedtune.models import load_model
from fedtune import adapters
cfg = load_config(None, sys.argv[2:])
lm = load_model(cfg)
torch.save(adapters.get_state(lm.model, trainable_only=False), sys.argv[1])
"""


def test_frozen_a_identical_across_processes(tiny_overrides: list[str], tmp_path: Path) -> None:
    paths = [tmp_path / f"state{i}.pt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", FROZEN_A_SCRIPT, str(out), *tiny_overrides,
                               "adapter.method=lora_fa", "adapter.seed=7"], stderr=subprocess.PIPE)
             for out in paths]  # the two processes run side by side: neither can see the other's state
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")
    outs = [torch.load(out, weights_only=True) for out in paths]
    assert outs[0].keys() == outs[1].keys()
    a_keys = [k for k in outs[0] if ".lora_A." in k]
    assert a_keys and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert outs[0][a_keys[0]].abs().sum() > 0
    other = load_model(load_config(None, [*tiny_overrides, "adapter.method=lora_fa", "adapter.seed=8"]))
    assert not torch.equal(adapters.get_state(other.model, trainable_only=False)[a_keys[0]], outs[0][a_keys[0]])
