"""sim.backend=flower: the same federation on Flower's simulation engine (Ray) as in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.flower.records import (
    config_from_overrides,
    config_overrides,
    content_to_instructions,
    content_to_reply,
    instructions_to_content,
    reply_to_content,
)
from fedtune.types import ClientReply, Instructions

SCENARIO = Path(__file__).parents[2] / "simulations" / "tiny.toml"
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def test_config_survives_the_message(tmp_path: Path) -> None:
    cfg = load_config(SCENARIO, [f"out={tmp_path}", "train.max_grad_norm=none", "strategy.name=svd", "strategy.client_ranks=[2,4]",
                                 "adapter.r=4", "sim.ray_address=auto"])
    assert config_from_overrides(config_overrides(cfg)) == cfg


def test_instructions_and_replies_survive_flower_records() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16)}
    ins = Instructions(round=3, client_id="client-2", state=state, train={"max_steps": 5, "lr": 1e-3}, rank=2)
    back, index, items, threads = content_to_instructions(instructions_to_content(ins, 2, ["seed=1"], 2))
    assert (index, items, threads) == (2, ["seed=1"], 2)
    assert back.round == 3 and back.client_id == "client-2" and back.train == ins.train and back.rank == 2
    assert all(torch.equal(back.state[k], state[k]) and back.state[k].dtype == state[k].dtype for k in state)
    reply = ClientReply("client-2", 3, state, 40, metrics={"train_loss": 1.5})
    got = content_to_reply(reply_to_content(reply))
    assert got.ok and got.num_examples == 40 and got.metrics == {"train_loss": 1.5} and got.rank is None
    assert all(torch.equal(got.state[k], state[k]) for k in state)
    failed = content_to_reply(reply_to_content(ClientReply("c", 1, None, 0, error="local training failed: x")))
    assert not failed.ok and failed.error == "local training failed: x"


def test_flower_backend_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    from fedtune.simulation.flower_backend import FlowerPool

    cfg = load_config(SCENARIO, [f"out={tmp_path}", "sim.backend=flower", "strategy.name=flora",
                                 "sim.keep_optimizer_state=true"])
    with pytest.raises(ValueError, match="sim.keep_optimizer_state.*strategy.name=flora"):
        FlowerPool(cfg, [])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "svd"])
def test_flower_backend_gives_the_inproc_adapter_bitwise(tmp_path: Path, strategy: str) -> None:
    """Same seeds, same data partitions, same fp32 CPU math with the same thread count: identical tensors."""
    from fedtune.simulation.engine import run_simulation

    runs = {}
    for backend in ("inproc", "flower"):
        cfg = load_config(SCENARIO, [f"out={tmp_path / backend}", f"sim.backend={backend}", "eval.samples=0",
                                     f"strategy.name={strategy}"])
        result = run_simulation(cfg, QUIET)
        rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
        assert [r["clients_ok"] for r in rounds] == [3, 3]
        runs[backend] = (load_file(str(tmp_path / backend / "adapter" / "adapter_model.safetensors")), rounds)
    (a, ra), (b, rb) = runs["inproc"], runs["flower"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert [r["eval_loss"] for r in ra] == [r["eval_loss"] for r in rb]
    assert [r["bytes_up"] for r in ra] == [r["bytes_up"] for r in rb]
