"""The round driver's seams in a real simulated federation (tiny Llama): a stateful update transform across rounds
and a resume, a lossy wire encoding, and a strategy with two phases per round."""

from __future__ import annotations

import io
import math
from pathlib import Path

import fakes  # noqa: F401 - registers survey_then_train, the survey phase and half_feedback
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.checkpoint import load_checkpoint
from fedtune.config import load_config
from fedtune.simulation.engine import run_simulation

pytestmark = pytest.mark.integration
SCENARIO = Path(__file__).parents[2] / "simulations" / "tiny.toml"
QUIET = Console(file=io.StringIO(), width=200)
FAST = ["train.max_steps=1", "eval.samples=0", "data.max_records=60"]


def simulate(out: Path, *overrides: str, resume: bool = False):  # type: ignore[no-untyped-def]
    cfg = load_config(SCENARIO, [f"out={out}", *FAST, *overrides])
    return run_simulation(cfg, QUIET, resume=out if resume else None)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def rounds(result) -> list[dict]:  # type: ignore[no-untyped-def]
    return [r for r in result.rounds if r.get("round", 0) >= 1]


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_a_transform_keeps_its_state_across_rounds_and_a_resume(tmp_path: Path, where: str) -> None:
    opts = ("client.pipeline=[half_feedback]", "train.lr=5e-2", f"sim.optimizer_state_on={where}")
    simulate(tmp_path / "straight", *opts, "sim.rounds=3")
    simulate(tmp_path / "resumed", *opts, "sim.rounds=2")
    first = load_checkpoint(tmp_path / "resumed")
    simulate(tmp_path / "resumed", *opts, "sim.rounds=3", resume=True)
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every client kept a residual (half of what it did not send), in the checkpoint or in its state files
    if where == "cpu":
        kept = {cid: s["pipeline"]["half_feedback"] for cid, s in load_checkpoint(tmp_path / "straight").clients.items()}
        earlier = {cid: s["pipeline"]["half_feedback"] for cid, s in first.clients.items()}
        assert set(kept) == {"client-0", "client-1", "client-2"}
        assert all(not torch.equal(kept[c][k], earlier[c][k]) for c in kept for k in kept[c])  # it moved on
    else:
        files = sorted(p.name for p in (tmp_path / "straight" / "client_state").iterdir())
        # round 3's files, and at most the one before each (kept until a checkpoint no longer needs it)
        assert {f"client-{i}.r3.pt" for i in range(3)} <= set(files) <= {
            f"client-{i}.r{r}.pt" for i in range(3) for r in (2, 3)}
        kept = {f"client-{i}": torch.load(tmp_path / "straight" / "client_state" / f"client-{i}.r3.pt",
                                          weights_only=True)["pipeline"]["half_feedback"] for i in range(3)}
    assert all(float(v.abs().max()) > 0 for residual in kept.values() for v in residual.values())
    plain = adapter(simulate(tmp_path / "plain", "train.lr=5e-2", "sim.rounds=3").run_dir)
    assert any(not torch.equal(a[k], plain[k]) for k in a), "the transform must change what is aggregated"


def _int8_bytes(numel: int) -> int:
    return numel + 4 * math.ceil(numel / 256)  # int8 values and one fp32 scale per block of 256


def test_a_lossy_encoding_changes_the_bytes_and_the_result(tmp_path: Path) -> None:
    big = ("sim.rounds=1", "adapter.r=32", "adapter.alpha=64")  # 2048-value tensors: headers are ~2% of a message
    dense = simulate(tmp_path / "dense", *big)
    int8 = simulate(tmp_path / "int8", *big, "client.encoding=int8")
    numels = [v.numel() for v in adapter(dense.run_dir).values()]
    want = sum(_int8_bytes(n) for n in numels) / sum(4 * n for n in numels)
    (d,), (q,) = rounds(dense), rounds(int8)
    for key in ("bytes_up", "bytes_down"):  # both directions use the encoding
        assert q[key] / d[key] == pytest.approx(want, abs=0.02), (key, q[key] / d[key], want)
    assert q["eval_loss"] != d["eval_loss"]  # the clients trained on, and sent, quantized tensors


def test_two_phases_a_round_in_the_simulator(tmp_path: Path) -> None:
    two = simulate(tmp_path / "two", "strategy.name=survey_then_train", "sim.workers=2")
    one = simulate(tmp_path / "one", "strategy.name=fedavg", "sim.workers=2")  # workers compute with one thread
    a, b = adapter(two.run_dir), adapter(one.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the train phase is fedavg's, on the same clients and seeds
    for t, f in zip(rounds(two), rounds(one), strict=True):
        assert t["bytes_up"] > f["bytes_up"] and t["bytes_down"] > f["bytes_down"]  # the survey travelled too
        assert t["eval_loss"] == f["eval_loss"]
    dropped = simulate(tmp_path / "dropped", "strategy.name=survey_then_train", "sim.dropout=0.4", "sim.rounds=3")
    failures = [r["failures"] for r in rounds(dropped)]
    assert any(failures), "with sim.dropout=0.4 some client drops out in 9 draws per phase"
    for r in rounds(dropped):  # a client lost in the survey is not asked to train: one failure, not two
        assert r["clients_ok"] + r["clients_failed"] == 3


# -- the same seams over real gRPC on loopback, in this process (so the nodes see the test's registrations) --


def federate(tmp: Path, *overrides: str, names: tuple[str, ...] = ("client-0", "client-1", "client-2"),  # type: ignore[no-untyped-def]
             may_die: type[BaseException] | None = None):
    """``run_server`` here and ``run_client`` per node in threads, each node on exactly the records the
    simulator gives the virtual client of its name (so the federation computes what ``simulate`` does).
    The server waits for all ``names``; a node thread ended by ``may_die`` is not an error."""
    import json
    import socket
    import threading

    from fedtune.client import node as node_module
    from fedtune.client.node import run_client
    from fedtune.data.partition import partition_clients
    from fedtune.pipeline import load_dataset
    from fedtune.server import loop, run_server

    # transformers builds models under a process-wide "empty weights" switch: one model load at a time
    lock, load = threading.Lock(), loop.load_model

    def load_one_at_a_time(*args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            return load(*args, **kwargs)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [*FAST, *overrides, f"federation.min_clients={len(names)}", "federation.round_timeout_s=120",
              "federation.wait_timeout_s=120", "client.max_backoff_s=1"]
    cfg = load_config(SCENARIO, [*common, f"out={tmp / 'server'}", f"server.address=127.0.0.1:{port}"])
    train = load_dataset(cfg).train_records
    for i, part in enumerate(partition_clients(cfg, train)):
        (tmp / f"client-{i}.jsonl").write_text("".join(json.dumps(train[j]) + "\n" for j in part))
    errors: list[BaseException] = []

    def node(name: str) -> None:
        try:
            run_client(load_config(SCENARIO, [*common, f"client.name={name}", f"client.server=127.0.0.1:{port}",
                                              f"data.path={tmp / (name + '.jsonl')}", "data.eval_fraction=0",
                                              "data.max_records=none", f"out={tmp / name}"]), QUIET)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(n,), daemon=True) for n in names]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "load_model", load_one_at_a_time)
        mp.setattr(node_module, "load_model", load_one_at_a_time)
        for t in threads:
            t.start()
        result = run_server(cfg, QUIET)
    for t in threads:
        t.join(timeout=60)
    errors = [e for e in errors if may_die is None or not isinstance(e, may_die)]
    assert not errors and not any(t.is_alive() for t in threads), errors
    return result


def test_int8_over_grpc_counts_the_simulators_bytes_and_evaluates_every_other_round(tmp_path: Path) -> None:
    opts = ("client.encoding=int8", "adapter.r=32", "adapter.alpha=64", "sim.partitioner=iid", "sim.rounds=3",
            "federation.rounds=3", "sim.eval_every=2", "federation.eval_every=2")
    sim = simulate(tmp_path / "sim", *opts)
    grpc = federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["bytes_up"], g["bytes_down"]) == (s["bytes_up"], s["bytes_down"]), g["round"]
        assert g["clients_ok"] == 3
    assert [("eval_loss" in r) for r in rounds(grpc)] == [False, True, True]  # every 2 rounds and after the last
    assert [("eval_loss" in r) for r in rounds(sim)] == [False, True, True]
    # the server sums in arrival order, the simulator in client order: int8 can round a value differently after
    assert rounds(grpc)[-1]["eval_loss"] == pytest.approx(rounds(sim)[-1]["eval_loss"], abs=1e-3)


def test_two_phases_and_a_stateful_pipeline_over_grpc_match_the_simulator(tmp_path: Path) -> None:
    opts = ("strategy.name=survey_then_train", "client.pipeline=[half_feedback]", "sim.partitioner=iid",
            "sim.rounds=2", "federation.rounds=2")
    sim = simulate(tmp_path / "sim", *opts)
    grpc = federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["clients_ok"], g["failures"]) == (3, {})
        assert (g["bytes_up"], g["bytes_down"]) == (s["bytes_up"], s["bytes_down"])
        assert g["eval_loss"] == pytest.approx(s["eval_loss"], abs=1e-5)
    a, b = adapter(sim.run_dir), adapter(grpc.run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # each node kept its residual (and the survey phase its note) in its state folder, as the simulator did
    kept = load_checkpoint(sim.run_dir).clients
    for name in ("client-0", "client-1", "client-2"):
        node = torch.load(tmp_path / name / "client_state.pt", weights_only=True)
        assert int(node["surveyed"]) == 2
        residual, want = node["pipeline"]["half_feedback"], kept[name]["pipeline"]["half_feedback"]
        assert residual.keys() == want.keys() and all(float(residual[k].abs().max()) > 0 for k in residual)
        assert max(float((residual[k] - want[k]).abs().max()) for k in residual) < 1e-5
