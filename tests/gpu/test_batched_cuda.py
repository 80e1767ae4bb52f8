"""On a CUDA GPU: batched virtual clients (``sim.batch_clients``) equal sequential ones, on fp32 and NF4 bases.

The global state the clients start from is random (both LoRA factors non-zero), as in the CPU tests
(``tests/unit/test_batched_clients.py``): from peft's initial adapter (B = 0) the first steps' gradients of A are
near zero, where AdamW turns float rounding into visible differences. The bounds are the CPU tests': fp32
1e-5 per value (fp32 compute, on an fp32 or an NF4 base); NF4 with bf16 compute (bf16 rounds the batch's base
projection differently from each client's own) within 10% of each factor's update and 0.01 in the mean losses.

Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fedtune.adapters import get_state
from fedtune.client.fit import fit
from fedtune.config import load_config
from fedtune.models import load_model
from fedtune.pipeline import encode
from fedtune.simulation.batched import Job, fit_batch
from fedtune.types import Instructions

pytestmark = pytest.mark.gpu

RECORDS = [{"prompt": f"What is {i} plus {i}?" + " Think." * (i % 4), "response": f"It is {2 * i}."}
           for i in range(24)]


def _sequential_and_batched(overrides: list[str], sizes: list[int], steps: list[int]):
    cfg = load_config(None, ["model.name=tiny-llama", "model.device=cuda", "train.batch_size=2",
                             "train.seq_len=48", "train.lr=1e-2", "adapter.r=4", *overrides])
    lm = load_model(cfg)
    assert lm.device.type == "cuda"
    gen = torch.Generator().manual_seed(1)
    start = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in get_state(lm.model).items()}
    data, at = [], 0
    for n in sizes:
        data.append(encode(RECORDS[at : at + n], lm.tokenizer, cfg))
        at += n
    jobs = [Job(data[i], Instructions(1, f"c{i}", start, train={"max_steps": steps[i]}), seed=i)
            for i in range(len(sizes))]
    sequential = [fit(lm, j.examples, cfg, j.ins, seed=j.seed)[0] for j in jobs]
    batched = [r for r, _ in fit_batch(lm, cfg, jobs)]
    assert torch.cuda.max_memory_allocated() > 0
    for s, b in zip(sequential, batched, strict=True):
        assert b.error is None and b.metrics["train_steps"] == s.metrics["train_steps"]
        assert all(v.device.type == "cpu" for v in b.state.values())
    return start, sequential, batched


def test_fp32_batched_clients_on_cuda_equal_sequential_ones() -> None:
    """All linear layers adapted, different data sizes and step counts (a finished client leaves the batch)."""
    _, sequential, batched = _sequential_and_batched(
        ["quant.mode=none", "quant.compute_dtype=fp32", "adapter.target_modules=[all-linear]"], [3, 6, 8, 5],
        [2, 3, 4, 5])
    for s, b in zip(sequential, batched, strict=True):
        for k, v in b.state.items():
            assert torch.allclose(v, s.state[k], atol=1e-5, rtol=0), (k, (v - s.state[k]).abs().max())


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_nf4_batched_clients_on_cuda_train_and_match_sequential_ones(compute: str) -> None:
    """NF4 base. fp32 compute: 1e-5 per value, as an fp32 base. bf16 compute (the usual NF4 setting): every
    factor within 10% of its update (a CPU run of this test with model.device=cpu: at most 5.2%) and the mean
    losses within 0.01."""
    start, sequential, batched = _sequential_and_batched(
        ["quant.mode=nf4", f"quant.compute_dtype={compute}", "adapter.target_modules=[q_proj,v_proj,down_proj]"],
        [4, 6, 3], [6, 6, 6])
    for s, b in zip(sequential, batched, strict=True):
        assert b.metrics["train_final_loss"] < b.metrics["train_loss"] - 0.5  # it learns
        for k, v in b.state.items():
            if compute == "fp32":
                assert torch.allclose(v, s.state[k], atol=1e-5, rtol=0), (k, (v - s.state[k]).abs().max())
            assert (v - s.state[k]).norm() <= 0.1 * (s.state[k] - start[k]).norm(), k
        assert b.metrics["train_loss"] == pytest.approx(s.metrics["train_loss"], abs=1e-2)
