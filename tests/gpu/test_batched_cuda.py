"""On a CUDA GPU: batched virtual clients (``sim.batch_clients``) equal sequential ones, on fp32 and NF4 bases.

Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fedtune.client.fit import fit
from fedtune.config import load_config
from fedtune.models import load_model
from fedtune.pipeline import encode
from fedtune.simulation.batched import Job, fit_batch
from fedtune.types import Instructions

pytestmark = pytest.mark.gpu

RECORDS = [{"prompt": f"What is {i} plus {i}?" + " Think." * (i % 4), "response": f"It is {2 * i}."}
           for i in range(24)]


@pytest.mark.parametrize("quant,compute,tol", [("none", "fp32", 1e-5), ("nf4", "bf16", 0.05)])
def test_batched_clients_on_cuda(quant: str, compute: str, tol: float) -> None:
    cfg = load_config(None, ["model.name=tiny-llama", "model.device=cuda", f"quant.mode={quant}",
                             f"quant.compute_dtype={compute}", "train.max_steps=5", "train.batch_size=2",
                             "train.seq_len=48", "train.lr=1e-2", "adapter.r=4",
                             "adapter.target_modules=[all-linear]"])
    lm = load_model(cfg)
    assert lm.device.type == "cuda"
    from fedtune.adapters import get_state

    start = get_state(lm.model)
    sizes = [3, 6, 8, 5]
    data, at = [], 0
    for n in sizes:
        data.append(encode(RECORDS[at : at + n], lm.tokenizer, cfg))
        at += n
    jobs = [Job(data[i], Instructions(1, f"c{i}", start, train={"max_steps": 2 + i}), seed=i) for i in range(4)]
    sequential = [fit(lm, j.examples, cfg, j.ins, seed=j.seed)[0] for j in jobs]
    batched = [r for r, _ in fit_batch(lm, cfg, jobs)]
    for s, b in zip(sequential, batched, strict=True):
        assert b.error is None and b.metrics["train_steps"] == s.metrics["train_steps"]
        for k, v in b.state.items():
            assert v.device.type == "cpu"
            update = (s.state[k] - start[k]).norm()
            assert (v - s.state[k]).norm() <= tol * max(float(update), 1e-3), k
    assert torch.cuda.max_memory_allocated() > 0
