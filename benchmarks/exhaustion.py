"""Honest rounds per minute of a real federation, attack-free and under each resource-exhaustion attack.

A real `fedtune server` process (tiny Llama, fedavg, plaintext on loopback) and ``--nodes`` lightweight honest
nodes (threads answering with small random tensors, over the bulk lane) run ``--rounds`` rounds, first with
no attack, then under each attack of issue 16 (``fedtune.transport.loadtest``): idle uploads held by an
observer key (item 3), 300 open long polls of an enrolled key (item 4), 300 idle connections to the bulk lane
(item 8). Reported per run: rounds/min (rounds 2.. over the sum of their wall times: round 1 waits for the
nodes to connect), its ratio to the
attack-free run of the same invocation (target >= 0.8), failed and lost updates, and the CPU time of the
attack process, which runs on the same machine and competes with the server for its cores.

    .venv/bin/python benchmarks/exhaustion.py [--nodes 4] [--rounds 8] [--attacks idle_uploads,...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import machine_info, print_table, write_json


def main() -> None:
    from fedtune.transport.loadtest import ATTACKS, run_federation

    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedexhaust-"))
    runs = [run_federation(tmp, args.nodes, args.rounds, None)]
    runs += [run_federation(tmp, args.nodes, args.rounds, a) for a in args.attacks.split(",") if a]
    base = runs[0].rounds_per_minute
    table, out = [], []
    for r in runs:
        failed = sum(x["clients_failed"] for x in r.rounds)
        lost = sum(r.acked.get(x["round"], 0) - x["clients_ok"] for x in r.rounds)
        ratio = r.rounds_per_minute / base if base else 0.0
        table.append([r.attack or "none (anchor)", f"{len(r.rounds)}/{args.rounds}", f"{r.rounds_per_minute:.1f}",
                      f"{ratio:.2f}", failed, lost, len(r.node_errors), r.attack_opened, f"{r.attack_cpu_s:.1f}",
                      r.server_exit])
        out.append({"attack": r.attack, "rounds_done": len(r.rounds), "rounds_per_minute": r.rounds_per_minute,
                    "ratio_to_attack_free": ratio, "failed_updates": failed, "lost_updates": lost,
                    "node_errors": r.node_errors[:10], "attack_connections_opened": r.attack_opened, "attack_cpu_seconds": r.attack_cpu_s,
                    "server_exit": r.server_exit, "round_seconds": [x["seconds"] for x in r.rounds]})
    print_table(f"honest rounds/min under attack: {args.nodes} nodes, {args.rounds} rounds each (target ratio >= 0.8)",
                ["attack", "rounds", "rounds/min", "ratio", "failed", "lost", "node errors", "attack opened",
                 "attack CPU s", "server exit"], table)
    write_json("exhaustion.json", {"nodes": args.nodes, "rounds": args.rounds, "runs": out,
                                   "machine": machine_info()})


if __name__ == "__main__":
    main()
