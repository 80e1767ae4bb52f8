"""Byzantine clients: the quality benchmark's federation with 20% of its clients attacking every round.

The federation of ``benchmarks/quality.py`` (ChatterBot by category, LoRA r=8 on q,v, batch 4 at seq 64, lr
5e-3; SmolLM2-135M, or the tiny random Llama with ``--model tiny-llama``) with the last 20% of its clients
byzantine (``sim.byzantine``): each round each of them sends one of (``sim.corrupt_kind=mixed``) its values
scaled by ``--scale``, its update sign-flipped and scaled by ``--scale``, NaN, or that flipped update declaring
2^63-1 examples. Arms: ``clean`` (fedavg, nobody attacks); ``fedavg-unbounded`` (fedavg as before the
reply bounds: ``federation.max_update_norm`` and ``max_abs_value`` off); ``fedavg`` with the default bounds
(declared weights capped at ``federation.max_examples``) and ``fedavg-equal`` (equal weights); median, trimmed mean (``--trim``) and multi-Krum
(``krum_f`` = the number of attackers), each with the default bounds too. The score is the final global
held-out eval loss; the target is the best defended arm within 2% of the clean run's.

    nice -n 10 .venv/bin/python benchmarks/byzantine.py [--model tiny-llama] [--quant nf4] [--rounds R --steps S --clients N]
"""

from __future__ import annotations

import argparse
import math
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

UNBOUNDED = ["federation.max_update_norm=none", "federation.max_abs_value=none"]


def arms(attackers: int, trim: float) -> dict[str, list[str]]:
    return {
        "clean": ["strategy.name=fedavg", "sim.byzantine=0"],
        "fedavg-unbounded": ["strategy.name=fedavg", *UNBOUNDED],
        "fedavg": ["strategy.name=fedavg"],
        "fedavg-equal": ["strategy.name=fedavg", "federation.weighting=equal"],
        "median": ["strategy.name=median"],
        "trimmed_mean": ["strategy.name=trimmed_mean", f"strategy.trim_fraction={trim}"],
        "multikrum": ["strategy.name=multikrum", f"strategy.krum_f={attackers}"],
    }


def base(args: argparse.Namespace, attackers: int) -> list[str]:
    model = ["model.name=smollm2-135m", f"quant.mode={args.quant}", "quant.compute_dtype=bf16"] \
        if args.model == "smollm2-135m" else ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32"]
    return [*model, "adapter.r=8", "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]",
            f"train.max_steps={args.steps}", "train.batch_size=4", "train.seq_len=64", f"train.lr={args.lr}",
            f"sim.num_clients={args.clients}", f"sim.rounds={args.rounds}", "sim.partitioner=category",
            "sim.categories_per_client=1", "eval.samples=0", "eval.batch_size=8", f"eval.max_batches={args.eval_batches}",
            f"sim.byzantine={attackers}", "sim.corrupt_kind=mixed", f"sim.corrupt_scale={args.scale}",
            f"seed={args.seed}"]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm in this process: the final eval loss and what the rounds refused."""
    import tempfile

    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.simulation.engine import run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*spec["overrides"], f"out={tmp}/run"])
        result = run_simulation(cfg, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    reasons = [why for r in rounds for why in r.get("failures", {}).values()]
    return {"before": result.before.get("eval_loss"), "after": result.after.get("eval_loss"),
            "losses": [r.get("eval_loss") for r in rounds], "refused": sum(why.startswith("refused") for why in reasons),
            "failed": len(reasons), "not_applied": sum(1 for r in rounds if not r.get("applied", True)),
            "reasons": sorted({why.split(" in ")[0][:80] for why in reasons})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2-135m", "tiny-llama"], default="smollm2-135m")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none", help="SmolLM2's base weights (bf16 or NF4)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.2, help="share of byzantine clients")
    ap.add_argument("--scale", type=float, default=4.0, help="factor of scaled and flipped attacks")
    ap.add_argument("--trim", type=float, default=0.25, help="trimmed mean's strategy.trim_fraction")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="", help="comma-separated subset of the arms")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import json

        import torch

        torch.set_num_threads(1)
        Path(args.out).write_text(json.dumps(child(json.loads(args.child))))
        return
    attackers = max(1, round(args.fraction * args.clients))
    todo = arms(attackers, args.trim)
    if args.arms:
        todo = {k: v for k, v in todo.items() if k in args.arms.split(",")}
    t0, load_before = time.perf_counter(), os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for name, extra in todo.items():
        overrides = [*base(args, attackers), *extra]
        res = run_child({"kind": "fedtune", "script": str(Path(__file__).resolve()), "threads": 1,
                         "overrides": overrides})
        results[name] = {**res, "overrides": overrides}
        print(f"{name}: {res['before']:.4f} -> {res['after']:.4f}, {res['refused']} refused, "
              f"{res['not_applied']} rounds not applied ({res['wall_s']:.0f} s)", flush=True)
    clean = results.get("clean", {}).get("after")
    defended = {k: v["after"] for k, v in results.items() if k not in ("clean", "fedavg-unbounded")}

    def gap(loss: float | None) -> str:
        if clean is None or loss is None or not math.isfinite(loss):
            return "-"
        return f"{100 * (loss - clean) / clean:+.2f}%"

    rows = [[name, f"{r['after']:.4f}" if r["after"] is not None else "nan", gap(r["after"]), r["refused"],
             r["not_applied"], f"{r['wall_s']:.0f}"] for name, r in results.items()]
    load = os.getloadavg()
    print_table(f"byzantine: {args.model} ({args.quant}), {args.clients} clients by category ({attackers} attacking: scale/flip x"
                f"{args.scale:g}, NaN, 2^63-1 weight), {args.rounds} rounds x {args.steps} steps (load avg {load[0]:.1f})",
                ["arm", "final eval loss", "vs clean", "refused", "rounds not applied", "wall s"], rows)
    finite = {k: v for k, v in defended.items() if v is not None and math.isfinite(v)}
    best = min(finite, key=lambda k: finite[k]) if finite else None
    targets = {"best_defended": best,
               "within_2pct_of_clean": clean is not None and best is not None and finite[best] <= 1.02 * clean}
    path = write_json(f"byzantine_{args.model}{'_nf4' if args.quant == 'nf4' else ''}.json", {
        "model": args.model, "quant": args.quant, "rounds": args.rounds, "steps": args.steps, "clients": args.clients,
        "attackers": attackers, "scale": args.scale, "lr": args.lr, "seed": args.seed, "results": results,
        "targets": targets, "total_s": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"targets: {targets}; wrote {path}")


if __name__ == "__main__":
    main()
