"""``benchmarks/batched_step.py``'s search for the largest K that fits on a GPU (issue 14), run on the CPU with
a stand-in for the batched arm that runs out of memory above a given K."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def script() -> ModuleType:
    path = Path(__file__).parents[2] / "benchmarks" / "batched_step.py"
    spec = importlib.util.spec_from_file_location("batched_step_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arm(capacity: int, tried: list[int]):
    def fits(k: int) -> None:
        tried.append(k)
        if k > capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {k} clients")

    return fits


@pytest.mark.parametrize("capacity,largest,failed", [(16, 16, 32), (100, 64, 128), (1000, 512, 1024)])
def test_largest_k_doubles_until_out_of_memory_and_releases_memory_each_time(script, capacity, largest, failed):
    tried: list[int] = []
    releases: list[int] = []
    got = script.largest_k(_arm(capacity, tried), 16, release=lambda: releases.append(len(tried)))
    assert got == (largest, failed)
    assert tried == [2**i for i in range(5, failed.bit_length())]
    assert releases == list(range(1, len(tried) + 1))  # after every try, the failed one included


def test_largest_k_refuses_to_search_forever_and_other_errors_pass_through(script):
    with pytest.raises(RuntimeError, match="K=64 still fits"):
        script.largest_k(_arm(10**9, []), 16, limit=64)

    def broken(k: int) -> None:
        raise ValueError("a client without examples")

    with pytest.raises(ValueError, match="without examples"):
        script.largest_k(broken, 16)
