"""The simulated federation on the tiny random Llama: strategies, faults, resume, byte accounting."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.simulation.engine import run_simulation

pytestmark = pytest.mark.integration  # trains simulated federations

SCENARIO = Path(__file__).parents[2] / "simulations" / "tiny.toml"
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def _run(tmp_path: Path, *overrides: str):
    cfg = load_config(SCENARIO, [f"out={tmp_path / 'run'}", "train.max_steps=1", "eval.samples=0", *overrides])
    return run_simulation(cfg, QUIET), tmp_path / "run"


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("strategy,extra", [
    ("fedavg", ()), ("ffa", ("adapter.method=lora_fa",)), ("flora", ()), ("svd", ()), ("fedex", ()),
    ("svd", ("strategy.client_ranks=[2,4,8]", "adapter.r=8")),
    ("flora", ("strategy.client_ranks=[2,4,8]", "adapter.r=8")),
    ("fedadam", ()), ("fedavgm", ()), ("fedprox", ()), ("median", ()), ("trimmed_mean", ()), ("krum", ()),
])
def test_each_strategy_runs_a_federation(tmp_path: Path, strategy: str, extra: tuple[str, ...]) -> None:
    result, run = _run(tmp_path, f"strategy.name={strategy}", *extra)
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    assert len(rounds) == 2
    for r in rounds:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["eval_loss"] is not None and r["agg_error"] is not None
    if strategy in ("ffa", "flora", "fedex"):
        assert all(r["agg_error"] < 1e-4 for r in rounds), [r["agg_error"] for r in rounds]
    assert (run / "config.toml").is_file() and (run / "plot.png").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_fedavg_reports_its_real_aggregation_error(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, "train.max_steps=3", "train.lr=5e-2")
    errors = [r["agg_error"] for r in result.rounds if r.get("round", 0) >= 1]
    assert all(e > 1e-4 for e in errors), errors


def test_dropouts_and_corrupt_updates_are_recorded_and_excluded(tmp_path: Path) -> None:
    result, run = _run(tmp_path, "sim.corrupt_prob=0.5", "sim.corrupt_kind=nan", "sim.dropout=0.3", "sim.rounds=3",
                       "strategy.min_replies=1")
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    reasons = [reason for r in rounds for reason in r["failures"].values()]
    assert any("dropped out" in x for x in reasons)
    assert any("non-finite" in x for x in reasons)
    assert all(r["clients_ok"] + r["clients_failed"] == 3 for r in rounds)
    final = _adapter(run)
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.slow
def test_scaled_update_is_contained_by_median(tmp_path: Path) -> None:
    attack = ("train.lr=1e-2", "sim.corrupt_prob=0.34", "sim.corrupt_kind=scale", "sim.corrupt_scale=100")
    _run(tmp_path / "clean", "strategy.name=median", "train.lr=1e-2")
    _run(tmp_path / "median", "strategy.name=median", *attack)
    _run(tmp_path / "mean", "strategy.name=fedavg", "federation.max_update_norm=none", *attack)  # no norm bound
    clean = _adapter(tmp_path / "clean" / "run")

    def drift(name: str) -> float:
        other = _adapter(tmp_path / name / "run")
        return max(float((clean[k] - other[k]).abs().max()) for k in clean)

    # the same seed corrupts the same client in both runs: the mean is dragged away, the median is not
    assert drift("mean") > 5 * drift("median"), (drift("mean"), drift("median"))


def test_byte_counts_equal_the_encoded_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.transport import loopback
    from fedtune.transport.messages import instructions_to_frames, reply_to_frames

    sent = {"up": 0, "down": 0}

    def counted_reply(reply, *a, **kw):
        sent["up"] += sum(len(frame) for frame in reply_to_frames(reply))
        return original_reply(reply, *a, **kw)

    def counted_ins(ins, *a, **kw):
        sent["down"] += sum(len(frame) for frame in instructions_to_frames(ins))
        return original_ins(ins, *a, **kw)

    original_reply, original_ins = loopback.reply_wire_size, loopback.instructions_wire_size
    monkeypatch.setattr(loopback, "reply_wire_size", counted_reply)
    monkeypatch.setattr(loopback, "instructions_wire_size", counted_ins)
    result, _ = _run(tmp_path, "sim.rounds=1")
    last = result.rounds[-1]
    assert last["bytes_up"] == sent["up"] > 0
    assert last["bytes_down"] == sent["down"] > 0
    assert sum(c["bytes_up"] for c in last["clients"].values()) == last["bytes_up"]


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_adapter(tmp_path: Path) -> None:
    # 24 local steps: a round takes about a second, so the kill surely lands mid-run (at 2 steps a round
    # takes 0.1 s and the run could end between two polls)
    args = [f"out={tmp_path / 'killed'}", "sim.rounds=3", "train.max_steps=24", "eval.samples=0",
            "strategy.name=fedadam"]
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(SCENARIO), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(json.loads(x).get("round") == 1 for x in lines) and (tmp_path / "killed" / "checkpoint.pt").is_file():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"
    subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", "--resume", str(tmp_path / "killed")],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(SCENARIO),
                    *[a.replace("killed", "straight") for a in args]], check=True, capture_output=True)
    a, b = _adapter(tmp_path / "killed"), _adapter(tmp_path / "straight")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = [json.loads(x)["round"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


def test_optimizer_state_on_disk_matches_memory(tmp_path: Path) -> None:
    opts = ("sim.keep_optimizer_state=true", "train.max_steps=2")
    _run(tmp_path / "cpu", *opts)
    _, run = _run(tmp_path / "disk", *opts, "sim.optimizer_state_on=disk")
    # round 2's state, and round 1's until round 3 is written (a kill before round 2's checkpoint resumes from it)
    assert sorted(p.name for p in (run / "optimizer").iterdir()) == sorted(
        f"client-{i}.r{r}.pt" for i in range(3) for r in (1, 2))
    a, b = _adapter(tmp_path / "cpu" / "run"), _adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = _adapter(_run(tmp_path / "fresh", "train.max_steps=2")[1])
    assert any(not torch.equal(a[k], fresh[k]) for k in a), "kept optimizer state must change round 2"


def test_a_kill_before_a_checkpoint_resumes_kept_optimizer_state_on_disk_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 2's optimizer files are written, then the run dies before round 2's checkpoint: the resumed run
    needs round 1's files, and ends as an uninterrupted run does."""
    from fedtune import rounds

    opts = ("sim.keep_optimizer_state=true", "sim.optimizer_state_on=disk", "train.max_steps=2", "sim.rounds=3")
    save = rounds.save_checkpoint

    def killed_at_round_2(path: Path, ckpt) -> None:  # type: ignore[no-untyped-def]
        if ckpt.round == 2:
            raise KeyboardInterrupt("killed before round 2's checkpoint")
        save(path, ckpt)

    monkeypatch.setattr(rounds, "save_checkpoint", killed_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed", *opts)
    monkeypatch.setattr(rounds, "save_checkpoint", save)
    assert {p.name for p in (tmp_path / "killed" / "run" / "optimizer").iterdir()} >= {"client-0.r2.pt"}
    cfg = load_config(SCENARIO, [f"out={tmp_path / 'killed' / 'run'}", "train.max_steps=1", "eval.samples=0", *opts])
    resumed = run_simulation(cfg, QUIET, resume=tmp_path / "killed" / "run")
    straight, _ = _run(tmp_path / "straight", *opts)
    a, b = _adapter(tmp_path / "killed" / "run"), _adapter(tmp_path / "straight" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["eval_loss"] for r in resumed.rounds] == [r["eval_loss"] for r in straight.rounds]


def test_baselines_centralized_and_local_only(tmp_path: Path) -> None:
    _, run = _run(tmp_path / "c", "sim.mode=centralized")
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in steps] == [0, 1, 2]
    assert steps[-1]["clients_ok"] == 1
    local, run = _run(tmp_path / "l", "sim.mode=local-only")
    per_client = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"client"' in x]
    assert len(per_client) == 3 and all(r["steps"] == 2 for r in per_client)
    assert "eval_loss" in local.after


def test_terminal_shows_progress_over_rounds_and_clients(tmp_path: Path) -> None:
    import io

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    cfg = load_config(SCENARIO, [f"out={tmp_path / 'run'}", "train.max_steps=1", "eval.samples=0",
                                 "sim.dropout=0.4"])
    result = run_simulation(cfg, console)
    text = out.getvalue()
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    assert "rounds" in text and f"2/{len(rounds)}" in text
    assert "clients" in text and "3/3" in text  # every sampled client answered (or failed) in each round
    last = rounds[-1]  # the bars' final state is the last round's
    assert f"round 2: {3 - last['clients_failed']} replied, {last['clients_failed']} failed" in text


@pytest.mark.parametrize("extra", [("strategy.name=fedavg",), ("strategy.name=flora",),
                                   ("sim.keep_optimizer_state=true", "sim.optimizer_state_on=disk")],
                         ids=["fedavg", "flora base updates", "kept optimizer state"])
def test_worker_pool_gives_the_one_process_result(tmp_path: Path, one_thread, extra: tuple[str, ...]) -> None:
    opts = ("train.max_steps=2", "sim.num_clients=4", "sim.rounds=3", *extra)
    one, _ = _run(tmp_path / "one", *opts)
    pool, _ = _run(tmp_path / "pool", *opts, "sim.workers=2")
    a, b = _adapter(tmp_path / "one" / "run"), _adapter(tmp_path / "pool" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(one.rounds, pool.rounds, strict=True):
        assert x["eval_loss"] == y["eval_loss"] and x.get("agg_error") == y.get("agg_error")


def test_a_dead_worker_costs_one_reply_and_is_replaced(tmp_path: Path, one_thread,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from fedtune.adapters import get_state
    from fedtune.client import phases
    from fedtune.data.partition import make_partition
    from fedtune.models import load_model
    from fedtune.pipeline import encode, load_dataset
    from fedtune.simulation import workers
    from fedtune.simulation.pools import VirtualClient
    from fedtune.simulation.store import ClientStore
    from fedtune.types import Instructions

    cfg = load_config(SCENARIO, [f"out={tmp_path}", "train.max_steps=1"])
    data = load_dataset(cfg)
    lm = load_model(cfg)
    parts = make_partition("iid", data.train_records, 3, 0)
    clients = [VirtualClient(f"client-{i}", i, [], encode([data.train_records[j] for j in p], lm.tokenizer, cfg))
               for i, p in enumerate(parts)]
    train, marker = phases.train_phase, tmp_path / "died-once"

    def dies_once_on_client_1(ctx, ins):  # the workers are forked: they run this
        if ins.client_id == "client-1" and not marker.exists():
            marker.touch()
            os._exit(9)  # as if killed mid-training
        return train(ctx, ins)
    monkeypatch.setitem(phases.PHASES, "train", dies_once_on_client_1)
    pool = workers.WorkerPool(cfg, lm, clients, ClientStore("cpu", tmp_path), [], workers=2)
    first = [w.proc for w in pool.workers]
    try:
        state = get_state(lm.model)
        items = [(c.cid, Instructions(round=1, client_id=c.cid, state=state, train={})) for c in clients]
        replies = list(pool.run(1, items))
        assert [r.client_id for r in replies] == ["client-0", "client-1", "client-2"]
        assert replies[0].error is None and replies[2].error is None
        assert "simulation worker died (exit code 9) while training client-1" in replies[1].error
        again = list(pool.run(2, items))
        assert [r.error for r in again] == [None, None, None] and len(pool.workers) == 2
        procs = [w.proc for w in pool.workers]
        assert sum(p not in first for p in procs) == 1  # the dead one was replaced
    finally:
        pool.close()
    assert not any(p.is_alive() for p in procs) and pool.workers == []


def test_workers_fall_back_to_one_process_without_fork(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from fedtune.simulation import pools

    monkeypatch.setattr(pools.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    result, _ = _run(tmp_path, "sim.workers=2")
    assert "needs fork() (Linux); the clients train in this process" in caplog.text
    assert all(r["clients_ok"] == 3 for r in result.rounds if r.get("round", 0) >= 1)
