"""ChatterBot category classification with MiniLM (simulations/minilm_categories.toml), on a reduced setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.simulation.engine import run_simulation

SCENARIO = Path(__file__).parents[2] / "simulations" / "minilm_categories.toml"
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_minilm_federation_learns_categories_and_sends_the_head(tmp_path: Path, workers: int) -> None:
    cfg = load_config(SCENARIO, [f"out={tmp_path / 'run'}", "sim.num_clients=2", "sim.rounds=2", "train.batch_size=8",
                                 "train.max_steps=6", "data.categories=[food,sports,money,history]",
                                 f"sim.workers={workers}"])
    result = run_simulation(cfg, QUIET)
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    assert all("accuracy" in r for r in rounds)
    assert result.after["accuracy"] > result.before["accuracy"] + 0.2, (result.before, result.after)
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    # SEQ_CLS trains the classifier head as a module to save: it travels and is averaged with the LoRA factors
    # (with workers, the engine's own model is only ever trained through what travels)
    assert any(k.endswith("classifier.weight") for k in adapter), sorted(adapter)
    travelled = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(travelled)
    assert any(".query.lora_A." in k for k in adapter) and any(".value.lora_B." in k for k in adapter)
    assert not any(".key." in k for k in adapter)


@pytest.mark.slow
def test_the_new_head_starts_the_same_in_every_process() -> None:
    """Server and sites build the untrained head themselves: from the seed, not from whatever the RNG held."""
    from fedtune.models import load_model

    cfg = load_config(SCENARIO, [])
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # a different global RNG state before each load
        lm = load_model(cfg, num_labels=19)
        heads.append(lm.model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
