"""Shared fixtures: tiny random models and configs; the GPU tier skips without CUDA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """torch computes with one thread during the test, then the count is restored.

    For runs that must equal one-threaded workers bit for bit, and for loops of tiny products, each of which
    on a loaded machine would otherwise wait for an OpenMP team to be scheduled.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides that make any command run on the tiny random Llama in fp32, quickly."""
    return ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "train.max_steps=2",
            "train.batch_size=2", "train.seq_len=48", "data.max_records=60", "eval.samples=1",
            "eval.max_new_tokens=4", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj]"]


@pytest.fixture
def tiny_cfg(tiny_overrides: list[str], tmp_path: Path):
    from fedtune.config import load_config

    return load_config(None, [*tiny_overrides, f"out={tmp_path / 'run'}"])


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.", "topic": "math" if i % 2 else "sums"}
            for i in range(40)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
