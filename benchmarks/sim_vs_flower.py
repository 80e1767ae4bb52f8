"""fedtune's one-process simulation against a FlowerTune-style Flower simulation of the same federation.

SmolLM2-135M NF4, LoRA r=8 on q,v, N = 2, 4, 8 clients all sampled, 2 rounds, 4 local steps of batch 4 at
seq 64. Each run is its own child process; a background sampler adds up the resident memory of the child and
all its descendants (Ray's GCS, raylet and workers included) every 0.1 s. Seconds per round: fedtune's engine
records them; the Flower side is timed by the ServerApp's evaluate_fn (called before round 1 and after each).

    .venv/bin/python benchmarks/sim_vs_flower.py [--quick] [--with-fedtune-flower]
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

from _common import machine_info, print_table, tree_rss_bytes, write_json

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FEDERATION = ["model.name=smollm2-135m", "quant.mode=nf4", "quant.compute_dtype=bf16", "adapter.r=8",
              "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=4",
              "train.batch_size=4", "train.seq_len=64", "train.lr=1e-3", "sim.partitioner=iid",
              "eval.samples=0", "eval.max_batches=1", "eval.batch_size=4", "sim.clients_per_round=0"]


# ---------------------------------------------------------------- measuring a child process


def run_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``spec`` in a child process of this script; returns its result plus the tree's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--out", str(out)]
        if spec.get("script"):
            cmd[1] = spec["script"]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1)), "FEDTUNE_RAY_CPUS": str(spec.get("cpus", 2))}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        peak = {"bytes": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # a process vanishing mid-sample
                    peak["bytes"] = max(peak["bytes"], tree_rss_bytes(proc.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        stop.set()
        sampler.join()
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"child {spec.get('kind')} failed (rc={proc.returncode}):\n{err[-3000:]}")
        result = json.loads(out.read_text())
    result["peak_tree_bytes"] = peak["bytes"]
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
    run_simulation(server_app=server(spec["overrides"], spec["rounds"], spec["num_clients"], marks),
                   client_app=client, num_supernodes=spec["num_clients"],
                   backend_config={"client_resources": {"num_cpus": spec["cpus"], "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR"}})
    total = time.perf_counter() - t0
    return {"round_s": [b - a for a, b in itertools.pairwise(marks)], "run_s": total}


def child_main(spec: dict[str, Any], out: Path) -> None:
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    fn = {"inproc": child_fedtune, "fedtune-flower": child_fedtune, "flowertune": child_anchor}.get(
        spec["kind"], child_fedtune)
    out.write_text(json.dumps(fn(spec)))


# ---------------------------------------------------------------- the benchmark


def spec_for(kind: str, n: int, rounds: int, cpus: float, threads: int) -> dict[str, Any]:
    overrides = [*FEDERATION, f"sim.num_clients={n}", f"sim.rounds={rounds}"]
    if kind == "fedtune-flower":
        overrides.append("sim.backend=flower")
    return {"kind": kind, "overrides": overrides, "num_clients": n, "rounds": rounds, "cpus": cpus,
            "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 2 only")
    ap.add_argument("--sizes", default="2,4,8", help="comma-separated numbers of clients")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--flower-cpus", type=float, default=2.0,
                    help="CPUs per Flower actor (2 on this 2-core machine: one actor, the same compute as fedtune's "
                         "one process; 1: one actor per core)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads per process (1: on a shared, oversubscribed CPU two OpenMP threads "
                         "per process made a step 3-17x slower)")
    ap.add_argument("--with-fedtune-flower", action="store_true", help="also run fedtune's sim.backend=flower")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child), Path(args.out))
        return
    sizes = [2] if args.quick else [int(n) for n in args.sizes.split(",")]
    kinds = ["inproc", "flowertune"] + (["fedtune-flower"] if args.with_fedtune_flower else [])
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for n in sizes:
        for kind in kinds:
            res = run_child(spec_for(kind, n, args.rounds, args.flower_cpus, args.threads))
            res.update(kind=kind, num_clients=n, loadavg_after=os.getloadavg())
            res["mean_round_s"] = sum(res["round_s"]) / len(res["round_s"])
            res["steady_round_s"] = res["round_s"][-1]
            runs.append(res)
            print(f"N={n} {kind}: rounds {[round(x, 1) for x in res['round_s']]} s, "
                  f"peak {res['peak_tree_bytes'] / 2**30:.2f} GiB, wall {res['wall_s']:.0f} s", flush=True)
    rows, compare = [], []
    for n in sizes:
        by = {r["kind"]: r for r in runs if r["num_clients"] == n}
        for kind in kinds:
            r = by[kind]
            rows.append([f"N={n} {kind}", f"{r['round_s'][0]:.1f}", f"{r['steady_round_s']:.1f}",
                         f"{r['mean_round_s']:.1f}", f"{r['wall_s']:.0f}", f"{r['peak_tree_bytes'] / 2**30:.2f}"])
        a, b = by["inproc"], by["flowertune"]
        compare.append({"num_clients": n, "speedup_mean": b["mean_round_s"] / a["mean_round_s"],
                        "speedup_steady": b["steady_round_s"] / a["steady_round_s"],
                        "memory_ratio": a["peak_tree_bytes"] / b["peak_tree_bytes"]})
        rows.append([f"N={n} flowertune/inproc", "", f"{compare[-1]['speedup_steady']:.2f}x",
                     f"{compare[-1]['speedup_mean']:.2f}x", "", f"mem {compare[-1]['memory_ratio']:.2f}x"])
    load = os.getloadavg()
    print_table(f"sim_vs_flower: SmolLM2-135M NF4, LoRA r=8 q,v, {args.rounds} rounds, 4 steps x batch 4 x seq 64 "
                f"(load avg {load[0]:.1f})",
                ["run", "round 1 s", "last round s", "mean s/round", "wall s", "peak tree GiB"], rows)
    last = compare[-1]
    targets = {"num_clients": last["num_clients"], "faster_2x": last["speedup_mean"] >= 2.0,
               "half_memory": last["memory_ratio"] <= 0.5}
    path = write_json("sim_vs_flower.json" if not args.quick else "sim_vs_flower_quick.json", {
        "federation": FEDERATION, "rounds": args.rounds, "flower_cpus_per_actor": args.flower_cpus, "threads": args.threads,
        "runs": runs, "compare": compare, "targets": targets, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"targets at N={last['num_clients']}: {targets}; wrote {path}")


if __name__ == "__main__":
    main()
