"""``fedtune info`` against a real load, and its verdict (issue 17, item 7)."""

from __future__ import annotations

import dataclasses

import pytest

from fedtune.config import load_config
from fedtune.info import estimate, verdict


def _loaded(cfg) -> tuple[int, int]:
    """(parameters, their bytes) of the base model as ``load_base`` really loads it; tied tensors count once
    (``parameters()`` yields a shared tensor once)."""
    from fedtune.models import load_base

    base = load_base(cfg)[0]
    return (sum(p.numel() for p in base.parameters()),
            sum(p.numel() * p.element_size() for p in base.parameters()))


def test_tiny_estimate_equals_a_real_load(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    info = estimate(cfg)
    params, footprint = _loaded(cfg)
    assert info.params == params  # tiny-llama ties its embeddings: counted once, as loaded
    assert info.weight_bytes == footprint  # fp32, no quantization: exactly the loaded bytes


def test_verdict_says_what_fits_and_what_to_change(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    info = estimate(cfg)
    lines = verdict(cfg, info, info.total_bytes * 10, "available RAM")
    assert lines[0].startswith("fits: about")
    short = int(info.total_bytes / 0.9) - 1  # just too little
    lines = verdict(cfg, info, short, "available RAM")
    assert lines[0].startswith("does NOT fit") and lines[-1].startswith("to fit, set one of: train.batch_size=")
    best = int(lines[1].split("largest train.batch_size at train.seq_len=48: ")[1].split(";")[0])
    assert 0 < best < cfg.train.batch_size
    smaller = estimate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=best)))
    bigger = estimate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=best + 1)))
    assert smaller.total_bytes <= 0.9 * short < bigger.total_bytes  # the largest that fits, exactly


@pytest.mark.slow
def test_smollm2_nf4_estimate_matches_a_real_load():
    cfg = load_config(None, ["model.name=smollm2-135m", "quant.mode=nf4", "quant.compute_dtype=bf16"])
    info = estimate(cfg)
    params, _ = _loaded(dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, mode="none")))
    # NF4 weights are packed two to a byte: their bytes, not their element count, are compared below
    assert info.params == params  # 134.5 M: the tied lm_head is not counted twice
    _, nf4_bytes = _loaded(cfg)
    assert abs(info.weight_bytes - nf4_bytes) / nf4_bytes < 0.1
