"""Serverless gossip against a server's fedavg: held-out loss, bytes per node and consensus, one table.

Every arm runs the simulator on the same non-IID split (ChatterBot, whole categories per node) with the same
local steps per node per round, so the total local steps are equal: ``fedavg`` (a server averaging every node's
adapter each round) and gossip with ``factors``, ``frozen_a`` (``adapter.method=lora_fa``) and ``product`` mixing
on the graphs of ``--topologies`` (arms grouped by graph, in that order), plus ``product`` on the first graph
again with 20% of the nodes dropping out each round (``sim.dropout=0.2``, right after the first group, scored
every round: its curve). Scored: the eval loss of the average adapter (the server's global adapter for
fedavg), the mean and spread of the nodes' own eval losses, bytes per node per round (sent + received) and
their ratio to fedavg's, and the consensus distance per round (JSON, and a plot under benchmarks/results/).
The target line compares fedavg with the best gossip arm that moved at most fedavg's bytes.

Scoring every node costs n + 1 evaluations, so the arms other than the dropping one are scored only before
the first and after the last round (``--eval-every``). ``--budget-min`` stops starting arms after that many
minutes and says which were left out (the JSON is written after every arm).

    .venv/bin/python benchmarks/gossip.py                        # SmolLM2-135M NF4, 16 nodes
    .venv/bin/python benchmarks/gossip.py --model tiny-llama --nodes 8 --rounds 4 --steps 2   # minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS, machine_info, print_table, write_json


def base(args: argparse.Namespace) -> list[str]:
    quant = ["quant.mode=nf4", "quant.compute_dtype=bf16"] if args.model != "tiny-llama" else [
        "quant.mode=none", "quant.compute_dtype=fp32"]
    return [f"model.name={args.model}", *quant, "adapter.r=8", "adapter.alpha=16",
            "adapter.target_modules=[q_proj,v_proj]", f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.lr={args.lr}", f"sim.num_clients={args.nodes}", f"sim.rounds={args.rounds}",
            "sim.partitioner=category", "sim.categories_per_client=1", "eval.samples=0", "eval.batch_size=8",
            f"eval.max_batches={args.eval_batches}", f"seed={args.seed}", f"sim.batch_clients={args.batch_clients}"]


DROP = "20% drop"
EQUAL = "server fedavg equal weights"


def arms(topologies: list[str], modes: list[str], eval_every: int) -> dict[str, list[str]]:
    # fedavg scores one adapter per round: its curve costs one evaluation a round, so it is scored every round
    # "equal": the server weighs every node alike, as gossip's average adapter does (fedavg weighs by examples)
    out: dict[str, list[str]] = {"server fedavg": ["strategy.name=fedavg", "sim.eval_every=1"],
                                 EQUAL: ["strategy.name=fedavg", "federation.weighting=equal", "sim.eval_every=1"]}
    for topo in topologies:
        for mode in modes:
            extra = ["adapter.method=lora_fa"] if mode == "frozen_a" else []
            out[f"gossip {mode} {topo}"] = ["sim.mode=gossip", f"gossip.mix={mode}", f"gossip.topology={topo}",
                                            *extra, f"sim.eval_every={eval_every}"]
        if topo == topologies[0]:
            out[f"gossip {modes[-1]} {topo} {DROP}"] = [*out[f"gossip {modes[-1]} {topo}"], "sim.dropout=0.2",
                                                     "sim.eval_every=1"]
    return out


def run_arm(overrides: list[str], out: Path) -> dict[str, Any]:
    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.simulation.engine import run_simulation

    cfg = load_config(None, [*overrides, f"out={out}"])
    t0 = time.perf_counter()
    result = run_simulation(cfg, Console(file=open("/dev/null", "w")))  # noqa: SIM115
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    n = cfg.sim.num_clients
    return {
        "seconds": time.perf_counter() - t0,
        "eval_loss_before": result.before.get("eval_loss"),
        "eval_loss": rounds[-1].get("eval_loss"),
        "node_loss_mean": rounds[-1].get("node_eval_loss_mean", rounds[-1].get("eval_loss")),
        "node_loss_std": rounds[-1].get("node_eval_loss_std", 0.0),
        "bytes_per_node_round": sum((r["bytes_up"] + r["bytes_down"]) for r in rounds) / n / len(rounds),
        "eval_loss_per_round": [r.get("eval_loss") for r in rounds],
        "consensus_per_round": [r.get("consensus_distance") for r in rounds],
        "nodes_live_per_round": [r.get("nodes_live", r.get("clients_ok")) for r in rounds],
    }


def run_child(overrides: list[str], out: Path) -> dict[str, Any]:
    """``run_arm`` in its own process (one thread): ``--parallel`` arms at once."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides), "--out", str(out)],
                              stdout=f, stderr=f, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False).returncode
    if code != 0:
        raise RuntimeError(f"arm {out.name} failed ({code}):\n{log.read_text()[-3000:]}")
    return json.loads(Path(f"{out}.json").read_text())


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        if r["consensus_per_round"] and r["consensus_per_round"][0] is not None:
            ax.semilogy(range(1, len(r["consensus_per_round"]) + 1), r["consensus_per_round"], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (1/n) sum ||dW_i - mean||_F^2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="local steps per node per round (every arm)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--topologies", default="one_peer_exp,ring,exponential")
    ap.add_argument("--modes", default="factors,frozen_a,product")
    ap.add_argument("--eval-every", type=int, default=0, help="score the arms every this many rounds (0: only "
                    "after the last; the dropping arm every round)")
    ap.add_argument("--budget-min", type=float, default=0, help="start no arm after this many minutes (0: no limit)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-clients", type=int, default=1, help="sim.batch_clients: nodes trained together in "
                    "one batched pass (the same result to 1e-5, faster on a CPU)")
    ap.add_argument("--parallel", type=int, default=1, help="arms run at once, each in its own process")
    ap.add_argument("--json", default="gossip.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(f"{args.out}.json").write_text(json.dumps(run_arm(json.loads(args.child), Path(args.out))))
        return
    plan = arms(args.topologies.split(","), args.modes.split(","), args.eval_every or args.rounds)
    results: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="fedtune-gossip-bench-"))  # run folders: deleted at the end
    start = time.perf_counter()
    left_out: list[str] = []

    def one(name: str) -> None:
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            left_out.append(name)
            return
        out = work / name.replace(" ", "_").replace("%", "pct")
        extra = [*base(args), *plan[name]]
        results[name] = run_arm(extra, out) if args.parallel == 1 else run_child(extra, out)
        r = results[name]
        print(f"{name}: eval_loss {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f} in {r['seconds']:.0f} s",
              flush=True)
        write_json(args.json, {"args": vars(args), "machine": machine_info(), "arms": results,
                               "left_out": [n for n in plan if n not in results]})  # so far

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, plan))
    results = {n: results[n] for n in plan if n in results}
    ref = results["server fedavg"]["eval_loss"]
    ref_bytes = results["server fedavg"]["bytes_per_node_round"]
    rows = [[name, f"{r['eval_loss']:.4f}", f"{100 * (r['eval_loss'] - ref) / ref:+.2f}%",
             f"{r['node_loss_mean']:.4f} +- {r['node_loss_std']:.4f}", f"{r['bytes_per_node_round'] / 2**10:.1f}",
             f"{r['bytes_per_node_round'] / ref_bytes:.2f}x",
             "-" if r["consensus_per_round"][-1] is None else f"{r['consensus_per_round'][-1]:.2e}",
             f"{r['seconds']:.0f}"] for name, r in results.items()]
    print_table(f"gossip vs server fedavg: {args.model}, {args.nodes} nodes, {args.rounds} rounds x {args.steps} steps",
                ["arm", "eval loss (avg adapter)", "vs fedavg", "node loss mean +- std", "KiB/node/round",
                 "bytes vs fedavg", "consensus (last)", "s"], rows)
    for name, r in results.items():
        print(f"{name}: consensus distance per round " + ", ".join(
            "-" if c is None else f"{c:.3e}" for c in r["consensus_per_round"]))
        if DROP in name or name.startswith("server"):
            print(f"{name}: eval loss per round {r['eval_loss_before']:.4f} -> " + " -> ".join(
                "-" if x is None else f"{x:.4f}" for x in r["eval_loss_per_round"]) + ", nodes live per round "
                + ", ".join(f"{x:.0f}" for x in r["nodes_live_per_round"]))
    # Bytes are matched by the same local steps and rounds in every arm: an arm qualifies when its bytes per
    # node per round (sent + received, headers included) are at most fedavg's (its one download and one upload
    # of the adapter), so its total bytes are too (one_peer_exp: one adapter sent and one received a round).
    cheap = {n: r for n, r in results.items() if n.startswith("gossip") and DROP not in n
             and r["bytes_per_node_round"] <= 1.01 * ref_bytes}  # headers aside, at most fedavg's bytes
    for server in [n for n in ("server fedavg", EQUAL) if n in results]:
        if not cheap:
            break
        ref = results[server]["eval_loss"]
        best = min(cheap, key=lambda n: cheap[n]["eval_loss"])
        gap = 100 * (cheap[best]["eval_loss"] - ref) / ref
        print(f"target (best gossip arm at <= fedavg's bytes per node, so at <= its total bytes, within 2% of "
              f"{server}'s eval loss {ref:.4f}): {best} {cheap[best]['eval_loss']:.4f} {gap:+.2f}% at "
              f"{cheap[best]['bytes_per_node_round'] / ref_bytes:.2f}x fedavg's bytes: "
              + ("met" if gap <= 2.0 else "not met"))
    if left_out:
        print(f"left out (--budget-min {args.budget_min:g}): {', '.join(left_out)}")
    plot(results, RESULTS / "gossip_consensus.png")
    path = write_json(args.json, {"args": vars(args), "machine": machine_info(), "arms": results,
                                  "left_out": left_out})
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path} and {RESULTS / 'gossip_consensus.png'}")


if __name__ == "__main__":
    main()
