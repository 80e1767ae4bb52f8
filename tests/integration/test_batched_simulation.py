"""``sim.batch_clients``: a simulation with batched clients ends where the one-client-at-a-time run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import ConfigError, load_config
from fedtune.simulation import batched
from fedtune.simulation.engine import run_simulation

pytestmark = pytest.mark.integration  # trains simulated federations

SCENARIO = Path(__file__).parents[2] / "simulations" / "tiny.toml"
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115
BASE = ("sim.num_clients=4", "sim.rounds=3", "train.max_steps=2", "eval.samples=0", "train.max_grad_norm=0.5")


def _run(folder: Path, *overrides: str):
    cfg = load_config(SCENARIO, [f"out={folder}", *BASE, *overrides])
    return run_simulation(cfg, QUIET)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _same_run(a, b, folder_a: Path, folder_b: Path, tol: float) -> None:
    x, y = _adapter(folder_a), _adapter(folder_b)
    assert x.keys() == y.keys()
    for k, v in x.items():
        assert torch.allclose(v, y[k], atol=tol, rtol=0), (k, (v - y[k]).abs().max())
    rounds_a = [r for r in a.rounds if r.get("round", 0) >= 1]
    rounds_b = [r for r in b.rounds if r.get("round", 0) >= 1]
    assert len(rounds_a) == len(rounds_b) == 3
    for r, s in zip(rounds_a, rounds_b, strict=True):
        assert r["eval_loss"] == pytest.approx(s["eval_loss"], abs=tol)
        assert (r["clients_ok"], r["clients_failed"]) == (s["clients_ok"], s["clients_failed"])
        assert (r["bytes_up"], r["bytes_down"]) == (s["bytes_up"], s["bytes_down"])


@pytest.mark.parametrize("strategy", ["fedavg", "svd", "flora"])
def test_batch_of_four_equals_one_at_a_time(tmp_path: Path, one_thread, strategy: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    opts = (f"strategy.name={strategy}", "sim.keep_optimizer_state=true", "train.prox_mu=0.1")
    one = _run(tmp_path / "one", *opts)
    seen: list[int] = []
    real = batched.train_batched
    monkeypatch.setattr(batched, "train_batched", lambda m, ex, *a, **kw: seen.append(len(ex)) or real(m, ex, *a, **kw))
    four = _run(tmp_path / "four", *opts, "sim.batch_clients=4")
    assert seen == [4, 4, 4]  # every round's four clients in one batch
    _same_run(one, four, tmp_path / "one", tmp_path / "four", tol=1e-5)


def test_batches_in_workers_with_faults_and_resume(tmp_path: Path, one_thread) -> None:
    """Two forked workers each training batches of two, clients dropping out and sending NaNs; then a run
    of two rounds resumed to three ends as the straight one."""
    faults = ("sim.dropout=0.25", "sim.corrupt_prob=0.25", "sim.keep_optimizer_state=true")
    one = _run(tmp_path / "one", *faults)
    pooled = _run(tmp_path / "pooled", *faults, "sim.batch_clients=2", "sim.workers=2")
    _same_run(one, pooled, tmp_path / "one", tmp_path / "pooled", tol=1e-5)
    failed = sum(r["clients_failed"] for r in pooled.rounds if r.get("round", 0) >= 1)
    assert failed > 0, "the fault draws of this seed must hit some client"

    _run(tmp_path / "resumed", *faults, "sim.batch_clients=2", "sim.rounds=2")
    cfg = load_config(tmp_path / "resumed" / "config.toml", ["sim.rounds=3"])
    resumed = run_simulation(cfg, QUIET, resume=tmp_path / "resumed")
    _same_run(pooled, resumed, tmp_path / "pooled", tmp_path / "resumed", tol=1e-5)


def test_batching_needs_the_inproc_backend() -> None:
    with pytest.raises(ConfigError, match="sim.batch_clients: batching needs sim.backend=inproc"):
        load_config(SCENARIO, ["sim.batch_clients=2", "sim.backend=flower"])
    with pytest.raises(ConfigError, match="sim.batch_clients: got 0, must be >= 1 or auto"):
        load_config(SCENARIO, ["sim.batch_clients=0"])
    with pytest.raises(ConfigError, match="sim.batch_clients: got 'most', expected an integer or one of 'auto'"):
        load_config(SCENARIO, ["sim.batch_clients=most"])
    assert load_config(SCENARIO, ["sim.batch_clients=auto", "sim.backend=flower"]).sim.batch_clients == "auto"


def _memory_for(monkeypatch: pytest.MonkeyPatch, clients: int, *overrides: str) -> None:
    """Make ``available_bytes`` report room (90% usable) for the base weights and ``clients`` clients' estimate
    of the run's config, and a bit less than one more."""
    from fedtune import info

    cfg = load_config(SCENARIO, [*BASE, *overrides])
    est = info.estimate(cfg)
    per_client = est.total_bytes - est.weight_bytes
    room = int((est.weight_bytes + clients * per_client + per_client // 2) / 0.9)
    monkeypatch.setattr(info, "available_bytes", lambda device: (room, "mocked RAM"))


def test_auto_batches_what_fits_and_trains_a_compressed_downlink_in_batches(
        tmp_path: Path, one_thread, monkeypatch: pytest.MonkeyPatch) -> None:
    """With memory for two clients, ``auto`` batches the four sampled clients two by two; a compressed
    downlink (each client rebuilds its state from the reference it holds) is batched too, and ends where
    one client at a time ends."""
    down = ("compress.downlink=true", "compress.method=int8", "train.lr=5e-2")
    one = _run(tmp_path / "one", *down)
    _memory_for(monkeypatch, 2, *down)
    seen: list[int] = []
    real = batched.train_batched
    monkeypatch.setattr(batched, "train_batched", lambda m, ex, *a, **kw: seen.append(len(ex)) or real(m, ex, *a, **kw))
    console = Console(file=open("/dev/null", "w"), width=300, record=True)  # noqa: SIM115
    cfg = load_config(SCENARIO, [f"out={tmp_path / 'auto'}", *BASE, *down, "sim.batch_clients=auto"])
    auto = run_simulation(cfg, console)
    assert "sim.batch_clients=auto: 2 (" in console.export_text()
    assert seen == [2, 2] * 3
    assert all(r["bytes_down"] > 0 for r in auto.rounds if r.get("round", 0) >= 1)
    _same_run(one, auto, tmp_path / "one", tmp_path / "auto", tol=1e-5)


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_auto_trains_dora_and_vera_one_at_a_time(tmp_path: Path, one_thread, method: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = batched.train_batched
    monkeypatch.setattr(batched, "train_batched", lambda m, ex, *a, **kw: seen.append(len(ex)) or real(m, ex, *a, **kw))
    console = Console(file=open("/dev/null", "w"), width=300, record=True)  # noqa: SIM115
    cfg = load_config(SCENARIO, [f"out={tmp_path}", *BASE, f"adapter.method={method}", "sim.rounds=1",
                                 "sim.batch_clients=auto"])
    result = run_simulation(cfg, console)
    assert f"sim.batch_clients=auto: 1 ({'DoRA' if method == 'dora' else 'adapter type VeraConfig'}" \
        in console.export_text()
    assert seen == []
    assert [r["clients_ok"] for r in result.rounds if r.get("round", 0) >= 1] == [4]
