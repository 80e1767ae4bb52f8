"""Does federation pay off? Held-out loss of centralized, federated and local-only training on ChatterBot.

SmolLM2-135M, 8 clients holding disjoint ChatterBot categories (partitioner=category, 1 slot each: the
pathological non-IID split), LoRA r=8 on q,v, batch 4 at seq 64, local lr 5e-3 (--lr) for every arm. Every
arm takes the same total number of local steps: federated R rounds x 8 clients x S steps (fedavg, svd, ffa,
and fedavgm: fedavg with server momentum); centralized (sim.mode=centralized: one client with all the data)
R rounds x 8*S steps; local-only (sim.mode=local-only) each client R*S steps on its own data, scored as the
mean over clients. The score is the global held-out eval loss (eval.max_batches batches of 8); improvement =
loss before - loss after. With --quant auto, a few steps in NF4 and in bf16 (quant.mode=none) are timed
first and the faster one is used (both are reported).

    .venv/bin/python benchmarks/quality.py [--quick] [--rounds R --steps S --quant nf4]

Arms can run in parallel processes: ``--arms a,b --json part.json`` in one, the rest in another, then
``--arms none --merge part.json`` prints the table from both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info, print_table, write_json
from sim_vs_flower import run_child

FEDERATED = ("fedavg", "svd", "ffa", "fedavgm")
QUANT = {"nf4": ["quant.mode=nf4", "quant.compute_dtype=bf16"], "bf16": ["quant.mode=none", "quant.compute_dtype=bf16"]}


def base(rounds: int, steps: int, clients: int, eval_batches: int, lr: float = 5e-3) -> list[str]:
    return ["model.name=smollm2-135m", "adapter.r=8", "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]",
            f"train.max_steps={steps}", "train.batch_size=4", "train.seq_len=64", f"train.lr={lr}",
            f"sim.num_clients={clients}", f"sim.rounds={rounds}", "sim.partitioner=category",
            "sim.categories_per_client=1", "eval.samples=0", "eval.batch_size=8", f"eval.max_batches={eval_batches}"]


ARMS: dict[str, list[str]] = {
    # the engine gives the centralized client every sampled client's steps (train.max_steps x 8)
    "centralized": ["sim.mode=centralized"],
    "fedavg": ["strategy.name=fedavg"],
    "svd": ["strategy.name=svd"],
    "ffa": ["strategy.name=ffa", "adapter.method=lora_fa"],
    "fedavgm": ["strategy.name=fedavgm"],
    "local-only": ["sim.mode=local-only"],
}


def time_quant(steps: int = 3) -> dict[str, float]:
    """Seconds per local step of one client in each quantization (1 round of ``steps`` steps, 1 client)."""
    out = {}
    for name, q in QUANT.items():
        spec = {"kind": "inproc", "threads": 1,
                "overrides": [*base(1, steps, 1, 1), *q, "sim.partitioner=iid"]}
        res = run_child(spec)
        out[name] = res["round_s"][0] / steps
        print(f"{name}: {out[name]:.2f} s per step (incl. 1 eval batch)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 1 step, fedavg and centralized only")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 8 scored")
    ap.add_argument("--lr", type=float, default=5e-3, help="local learning rate (every arm)")
    ap.add_argument("--quant", choices=["auto", *QUANT], default="auto")
    ap.add_argument("--arms", default="", help="comma-separated subset to (re)run; the other arms' results are "
                    "taken from the JSON of an earlier run with the same sizes (--arms none: only merge and report)")
    ap.add_argument("--json", default="", help="results file under benchmarks/results (default quality.json), so "
                    "that arms can run in parallel processes")
    ap.add_argument("--merge", default="", help="comma-separated results files (same sizes) whose arms are added")
    args = ap.parse_args()
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    step_s = time_quant() if args.quant == "auto" else {}
    quant = min(step_s, key=step_s.get) if step_s else args.quant
    todo = dict(ARMS)
    if args.quick:
        todo = {k: todo[k] for k in ("centralized", "fedavg")}
    results: dict[str, dict[str, Any]] = {}
    name_json = args.json or ("quality_quick.json" if args.quick else "quality.json")
    sizes = (rounds, steps, args.clients, quant, args.lr)
    if args.arms:
        for earlier in [name_json, *filter(None, args.merge.split(","))]:
            path = ROOT / "benchmarks" / "results" / earlier
            old = json.loads(path.read_text()) if path.is_file() else None
            if old and (old["rounds"], old["steps"], old["clients"], old["quant"], old.get("lr")) == sizes:
                results.update({k: v for k, v in old["results"].items() if k not in args.arms.split(",")})
            elif earlier != name_json:
                raise SystemExit(f"--merge {earlier}: missing, or not the same rounds/steps/clients/quant/lr")
        todo = {k: v for k, v in todo.items() if k in args.arms.split(",")}
    for name, extra in todo.items():
        spec = {"kind": "inproc", "threads": 1,
                "overrides": [*base(rounds, steps, args.clients, args.eval_batches, args.lr), *QUANT[quant], *extra]}
        res = run_child(spec)
        before, after = res["before"]["eval_loss"], res["after"]["eval_loss"]
        results[name] = {"before": before, "after": after, "improvement": before - after, "wall_s": res["wall_s"],
                         "rounds": res["rounds"], "overrides": spec["overrides"]}
        print(f"{name}: {before:.4f} -> {after:.4f} ({res['wall_s']:.0f} s)", flush=True)
        write_json(name_json, {"rounds": rounds, "steps": steps, "clients": args.clients, "quant": quant, "lr": args.lr,
                               "results": results, "partial": True})
    results = {k: results[k] for k in ARMS if k in results}
    if "centralized" not in results or not any(k in results for k in FEDERATED):
        print(f"partial results (run the remaining arms with --arms): { {k: v['after'] for k, v in results.items()} }")
        return
    central = results["centralized"]["improvement"]
    fed = {k: v for k, v in results.items() if k in FEDERATED}
    best = max(fed, key=lambda k: fed[k]["improvement"])
    rows = [[name, f"{r['before']:.4f}", f"{r['after']:.4f}", f"{r['improvement']:.4f}",
             f"{100 * r['improvement'] / central:.0f}%" if central > 0 else "-", f"{r['wall_s']:.0f}"]
            for name, r in results.items()]
    load = os.getloadavg()
    print_table(f"quality: SmolLM2-135M {quant}, {args.clients} clients by category, {rounds} rounds x {steps} steps, lr {args.lr:g} "
                f"(same total steps per arm; load avg {load[0]:.1f})",
                ["arm", "loss before", "loss after", "improvement", "of centralized", "wall s"], rows)
    targets = {"best_federated": best,
               "recovers_90pct": central > 0 and fed[best]["improvement"] >= 0.9 * central,
               "beats_local_only": "local-only" in results
               and fed[best]["after"] < results["local-only"]["after"]}
    path = write_json(name_json, {
        "rounds": rounds, "steps": steps, "clients": args.clients, "eval_batches": args.eval_batches, "lr": args.lr,
        "quant": quant, "seconds_per_step": step_s, "results": results, "targets": targets,
        "total_s": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"targets: {targets}; wrote {path}")


if __name__ == "__main__":
    main()
