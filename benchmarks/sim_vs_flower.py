"""fedtune's one-process simulation against a FlowerTune-style Flower simulation of the same federation.

SmolLM2-135M NF4, LoRA r=8 on q,v, gradient checkpointing on (as FlowerTune's templates set it), N = 2, 4, 8
clients all sampled, 2 rounds, 4 local steps of batch 4 at seq 64. Both sides get the whole machine (``--cpus``, default all cores) and the same training loop:

- fedtune ``inproc`` with ``sim.workers`` = the cores: worker processes forked after the model is loaded,
  sharing its base weights, one thread each;
- fedtune ``batched``: the same workers, each training its share of the round's clients in one batch
  (``sim.batch_clients`` = N / cores, rounded up): one forward and backward over the shared base per step for
  all of a worker's clients;
- the anchor, a Flower ``run_simulation`` ClientApp written the way FlowerTune writes it (the model built
  in every call), with FlowerTune's resources: one client at a time owns the machine (its Ray actor takes
  every core and computes with as many threads), as FlowerTune gives each client a whole GPU;
- ``--flower-per-core`` adds Flower with one actor per core (one thread each): parallel clients at the
  price of one model per actor;
- ``--flower-cached`` adds Flower with one actor per core that builds its model once and keeps it between
  calls (``cache-model`` in ``_flowertune_app``): the anchor without its per-call model build, the fastest
  Flower setup of this federation on a CPU.

Every anchor run also reports where its time goes: seconds from the start to round 1 (Ray's start and the
server's initial model) and, per train call, the model build, the training and the data partition.

Each run is its own child process; a background sampler adds up the memory of the child and all its
descendants (Ray's GCS, raylet and workers included) every 0.1 s, as proportional set size (PSS: pages
that processes share, such as the forked workers' model or shared libraries, count once) and as the plain
sum of resident sizes (RSS, which counts them once per process). Seconds per round: fedtune's engine
records them; the Flower side is timed by the ServerApp's evaluate_fn (called before round 1 and after each).

    .venv/bin/python benchmarks/sim_vs_flower.py [--quick] [--sizes 8] [--no-batched] [--flower-per-core] [--flower-cached] [--with-fedtune-flower]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info, print_table, tree_pss_bytes, tree_rss_bytes, write_json

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FEDERATION = ["model.name=smollm2-135m", "model.gradient_checkpointing=true", "quant.mode=nf4", "quant.compute_dtype=bf16", "adapter.r=8",
              "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=4",
              "train.batch_size=4", "train.seq_len=64", "train.lr=1e-3", "sim.partitioner=iid",
              "eval.samples=0", "eval.max_batches=1", "eval.batch_size=4", "sim.clients_per_round=0"]


# ---------------------------------------------------------------- measuring a child process


class ArmFailed(RuntimeError):
    """An arm that failed or ran out of time, with the anchor's train calls that finished before."""

    def __init__(self, message: str, calls: list[dict[str, Any]], seconds: float):
        super().__init__(message)
        self.calls, self.seconds = calls, seconds


def calls_summary(calls: list[dict[str, Any]]) -> str:
    """Where an anchor's time went, per train call."""
    if not calls:
        return "no train call finished"
    n = len(calls)
    return (f"{n} train calls, mean model build {sum(c['build_s'] for c in calls) / n:.1f} s, "
            f"training {sum(c['train_s'] for c in calls) / n:.1f} s, data {sum(c['data_s'] for c in calls) / n:.1f} s, "
            f"{len({c['pid'] for c in calls})} actor process(es), {calls[0]['threads']} thread(s) each")


def run_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``spec`` in a child process of this script; returns its result plus the tree's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--out", str(out)]
        if spec.get("script"):
            cmd[1] = spec["script"]
        times = Path(tmp) / "calls.jsonl"  # the anchor's per-call seconds, readable even if it is killed
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1)), "FEDTUNE_RAY_CPUS": str(spec.get("cpus", 2)),
               "FEDTUNE_ANCHOR_TIMES": str(times)}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        peak = {"rss": 0, "pss": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # a process vanishing mid-sample
                    peak["rss"] = max(peak["rss"], tree_rss_bytes(proc.pid))
                    peak["pss"] = max(peak["pss"], tree_pss_bytes(proc.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err += f"\n(killed after --timeout {timeout:.0f} s)"
        stop.set()
        sampler.join()
        calls = [json.loads(line) for line in times.read_text().splitlines()] if times.is_file() else []
        if proc.returncode != 0 or not out.is_file():
            raise ArmFailed(f"child {spec.get('kind')} failed (rc={proc.returncode}):\n{err[-3000:]}", calls,
                            time.perf_counter() - t0)
        result = json.loads(out.read_text())
        result["calls"] = calls
    result["peak_tree_bytes"], result["peak_tree_rss_bytes"] = peak["pss"], peak["rss"]
    result["wall_s"] = time.perf_counter() - t0
    return result


def child_fedtune(spec: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.simulation.engine import run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*spec["overrides"], f"out={tmp}/run"])
        t0 = time.perf_counter()
        result = run_simulation(cfg, Console(file=open(os.devnull, "w")))  # noqa: SIM115
        total = time.perf_counter() - t0
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    from _common import peak_rss_bytes

    return {"round_s": [r["seconds"] for r in rounds if "seconds" in r], "run_s": total,
            "vmhwm_bytes": peak_rss_bytes(),
            "clients_ok": [r.get("clients_ok") for r in rounds], "before": result.before, "after": result.after,
            "rounds": [{k: r.get(k) for k in ("round", "eval_loss", "accuracy", "seconds")} for r in result.rounds
                       if "round" in r]}


def child_anchor(spec: dict[str, Any]) -> dict[str, Any]:
    from _flowertune_app import client, server
    from flwr.simulation import run_simulation

    marks: list[float] = []
    t0 = time.perf_counter()
    run_simulation(server_app=server(spec["overrides"], spec["rounds"], spec["num_clients"], marks,
                                     cache_model=spec["kind"] == "flowertune-cached"),
                   client_app=client, num_supernodes=spec["num_clients"],
                   backend_config={"client_resources": {"num_cpus": spec["cpus"], "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR"}})
    total = time.perf_counter() - t0
    return {"round_s": [b - a for a, b in itertools.pairwise(marks)], "run_s": total,
            "startup_s": marks[0] - t0 if marks else None}


def child_main(spec: dict[str, Any], out: Path) -> None:
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    fn = child_anchor if spec["kind"].startswith("flowertune") else child_fedtune
    out.write_text(json.dumps(fn(spec)))


# ---------------------------------------------------------------- the benchmark


def spec_for(kind: str, n: int, rounds: int, cpus: int) -> dict[str, Any]:
    """``cpus``: the cores each side may use (see the module docstring)."""
    overrides = [*FEDERATION, f"sim.num_clients={n}", f"sim.rounds={rounds}"]
    threads, actor_cpus = 1, cpus
    if kind == "inproc":
        overrides.append(f"sim.workers={cpus}")
    elif kind == "batched":
        overrides += [f"sim.workers={cpus}", f"sim.batch_clients={-(-n // cpus)}"]
    elif kind == "fedtune-flower":
        overrides.append("sim.backend=flower")
    elif kind == "flowertune":
        threads = cpus  # one actor owns the machine
    elif kind == "flowertune-per-core":
        actor_cpus = 1
    elif kind == "flowertune-cached":
        actor_cpus = threads = 1  # one actor per core, each building its model once
    return {"kind": kind, "overrides": overrides, "num_clients": n, "rounds": rounds, "cpus": actor_cpus,
            "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 2 only")
    ap.add_argument("--sizes", default="2,4,8", help="comma-separated numbers of clients")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores each side may use")
    ap.add_argument("--flower-per-core", action="store_true", help="also run Flower with one actor per core")
    ap.add_argument("--flower-cached", action="store_true",
                    help="also run Flower with one actor per core that keeps its model between calls")
    ap.add_argument("--with-fedtune-flower", action="store_true", help="also run fedtune's sim.backend=flower")
    ap.add_argument("--no-batched", action="store_true", help="leave out the batched arm (sim.batch_clients)")
    ap.add_argument("--no-flower", action="store_true", help="fedtune's arms only (inproc against batched)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one arm may run before it is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child), Path(args.out))
        return
    sizes = [2] if args.quick else [int(n) for n in args.sizes.split(",")]
    kinds = (["inproc"] + ([] if args.no_batched else ["batched"])
             + (["flowertune-cached"] if args.flower_cached else [])  # the slowest anchors last
             + ([] if args.no_flower else ["flowertune"])
             + (["flowertune-per-core"] if args.flower_per_core else [])
             + (["fedtune-flower"] if args.with_fedtune_flower else []))
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for n in sizes:
        for kind in kinds:
            try:
                res = run_child(spec_for(kind, n, args.rounds, args.cpus), timeout=args.timeout)
            except ArmFailed as exc:  # the other arms still count; the table says which one did not finish
                print(f"N={n} {kind}: FAILED after {exc.seconds:.0f} s ({calls_summary(exc.calls)}):\n"
                      f"{str(exc)[-800:]}", flush=True)
                failed.append({"kind": kind, "num_clients": n, "seconds": exc.seconds, "calls": exc.calls,
                               "error": str(exc)[-3000:], "loadavg_after": os.getloadavg()})
                continue
            res.update(kind=kind, num_clients=n, loadavg_after=os.getloadavg())
            res["mean_round_s"] = sum(res["round_s"]) / len(res["round_s"])
            res["steady_round_s"] = res["round_s"][-1]
            runs.append(res)
            print(f"N={n} {kind}: rounds {[round(x, 1) for x in res['round_s']]} s, "
                  f"peak PSS {res['peak_tree_bytes'] / 2**30:.2f} GiB (RSS sum {res['peak_tree_rss_bytes'] / 2**30:.2f}), "
                  f"wall {res['wall_s']:.0f} s", flush=True)
            if res.get("calls"):
                print(f"  anchor: start to round 1 {res['startup_s']:.0f} s; {calls_summary(res['calls'])}", flush=True)
    rows, compare = [], []
    for n in sizes:
        by = {r["kind"]: r for r in runs if r["num_clients"] == n}
        for kind in kinds:
            if kind not in by:
                gone = next(f for f in failed if f["kind"] == kind and f["num_clients"] == n)
                rows.append([f"N={n} {kind}", "not finished", "", "", f"{gone['seconds']:.0f}", "", ""])
                continue
            r = by[kind]
            rows.append([f"N={n} {kind}", f"{r['round_s'][0]:.1f}", f"{r['steady_round_s']:.1f}",
                         f"{r['mean_round_s']:.1f}", f"{r['wall_s']:.0f}", f"{r['peak_tree_bytes'] / 2**30:.2f}",
                         f"{r['peak_tree_rss_bytes'] / 2**30:.2f}"])
        pairs = [(ours, anchor) for ours in ("inproc", "batched") if ours in by
                 for anchor in kinds if anchor.startswith("flowertune") and anchor in by]
        pairs += [("batched", "inproc")] if "batched" in by else []
        for ours, anchor in pairs:
            a, b = by[ours], by[anchor]
            compare.append({"num_clients": n, "anchor": anchor, "fedtune": ours,
                            "speedup_mean": b["mean_round_s"] / a["mean_round_s"],
                            "speedup_steady": b["steady_round_s"] / a["steady_round_s"],
                            "memory_ratio": a["peak_tree_bytes"] / b["peak_tree_bytes"],
                            "memory_ratio_rss": a["peak_tree_rss_bytes"] / b["peak_tree_rss_bytes"]})
            c = compare[-1]
            rows.append([f"N={n} {anchor}/{ours}", "", f"{c['speedup_steady']:.2f}x", f"{c['speedup_mean']:.2f}x",
                         "", f"{c['memory_ratio']:.2f}x", f"{c['memory_ratio_rss']:.2f}x"])
    load = os.getloadavg()
    print_table(f"sim_vs_flower: SmolLM2-135M NF4, LoRA r=8 q,v, checkpointed, {args.rounds} rounds, 4 steps x batch 4 x seq 64, "
                f"{args.cpus} cores (load avg {load[0]:.1f})",
                ["run", "round 1 s", "last round s", "mean s/round", "wall s", "peak PSS GiB", "peak RSS sum GiB"],
                rows)
    last = next((c for c in reversed(compare) if c["anchor"] == "flowertune" and c["fedtune"] == "inproc"), None)
    targets: dict[str, Any] = {} if last is None else {
        "num_clients": last["num_clients"], "faster_2x": last["speedup_mean"] >= 2.0,
        "half_memory": last["memory_ratio"] <= 0.5}
    for anchor, key in (("flowertune", "batched_faster_4x"), ("flowertune-cached", "batched_faster_4x_than_cached")):
        fast = next((c for c in reversed(compare) if c["anchor"] == anchor and c["fedtune"] == "batched"), None)
        if fast is not None:
            targets[key] = fast["speedup_mean"] >= 4.0
            targets[key + "_at"] = fast["num_clients"]
    both = [n for n in sizes if {"inproc", "batched"} <= {r["kind"] for r in runs if r["num_clients"] == n}]
    if both:
        inproc = next(r for r in runs if r["kind"] == "inproc" and r["num_clients"] == both[-1])
        batched = next(r for r in runs if r["kind"] == "batched" and r["num_clients"] == both[-1])
        targets["batched_memory_le_inproc"] = batched["peak_tree_bytes"] <= inproc["peak_tree_bytes"]
    path = write_json("sim_vs_flower.json" if not args.quick else "sim_vs_flower_quick.json", {
        "federation": FEDERATION, "rounds": args.rounds, "cpus": args.cpus,
        "runs": runs, "failed": failed, "compare": compare, "targets": targets, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"targets: {targets}; wrote {path}")


if __name__ == "__main__":
    main()
