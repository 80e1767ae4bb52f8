"""Many concurrent lightweight nodes against one real `fedtune server` process: is any update lost?

The nodes are asyncio coroutines on ``--processes`` processes (``fedtune.transport.swarm``), each speaking
the real protocol on a connection of its own and answering every round with random LoRA-shaped tensors (no
model): thread-per-node clients (``FederationClient``) took ~2,600 threads for 1,000 nodes and did not
finish on a 2-core machine. The server is the real one (tiny Llama for its global adapter, plaintext on loopback, fedavg), its
worker threads sized from ``federation.min_clients`` (``server.max_workers=0``). Per round: sampled, acked,
aggregated, failed and lost updates and the round's wall time (from the moment enough nodes are connected);
the server's peak resident memory (sampled every 0.5 s).

    .venv/bin/python benchmarks/federation.py [--nodes 1000] [--rounds 5] [--processes 4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from _common import machine_info, print_table, tree_rss_bytes, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", "--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--processes", type=int, default=4, help="processes the nodes run on")
    ap.add_argument("--quick", action="store_true", help="8 nodes, 2 rounds (seconds): a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.rounds = 8, 2

    from fedtune.config import fingerprint, load_config
    from fedtune.transport.loadtest import (
        free_port,
        metrics,
        server_overrides,
        start_server_process,
        wait_until_serving,
    )
    from fedtune.transport.swarm import Swarm

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="fedbench-"))
    # heartbeats every 5 s (a node silent for 60 s is lost): 1,000 nodes send 200 a second
    overrides = [*server_overrides(port, tmp / "run", args.rounds, args.nodes, round_timeout_s=600),
                 "federation.heartbeat_s=5", "federation.silence_s=60", "federation.wait_timeout_s=900"]
    fp = fingerprint(load_config(None, overrides))
    server = start_server_process(overrides, tmp / "server.log")
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            try:
                peak[0] = max(peak[0], tree_rss_bytes(server.pid))
            except Exception:  # noqa: BLE001, S110 - the process is gone
                pass
    threading.Thread(target=sample, daemon=True).start()
    wait_until_serving(port, server, 900)
    t0 = time.perf_counter()
    nodes = Swarm(port, args.nodes, fp, tmp, processes=args.processes).start()
    try:
        rc: int | None = server.wait(timeout=3600)
    except subprocess.TimeoutExpired:
        server.kill()
        rc = None
    done.set()
    nodes.join(60)
    total = time.perf_counter() - t0
    acked_all = nodes.acked
    table, out = [], []
    for r in metrics(tmp / "run"):
        got, acked = r["clients_ok"], acked_all.get(r["round"], 0)
        table.append([r["round"], len(r["clients"]), acked, got, r["clients_failed"], acked - got,
                      f"{r['bytes_up'] / 2**20:.2f}", f"{r['seconds']:.2f}"])
        out.append({"round": r["round"], "sampled": len(r["clients"]), "acked_by_server": acked,
                    "aggregated": got, "failed": r["clients_failed"], "lost": acked - got,
                    "mib_up": r["bytes_up"] / 2**20, "seconds": r["seconds"]})
    print_table(f"fedtune server: {args.nodes} concurrent nodes, {args.rounds} rounds (server exit {rc})",
                ["round", "sampled", "acked", "aggregated", "failed", "lost", "MiB up", "round s"], table)
    print(f"server peak RSS {peak[0] / 2**20:.0f} MiB; total wall time {total:.1f} s (from the server answering); "
          f"node errors: {nodes.error_count}; calls made again: {sum(nodes.retried.values())} (by what the node "
          f"was doing and the code that ended the try: {nodes.retried}); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for e in nodes.errors[:5]:
        print("  ", e)
    write_json("federation_quick.json" if args.quick else "federation.json", {"nodes": args.nodes, "rounds": out, "server_exit": rc,
                                   "node_errors": nodes.errors[:20], "node_error_count": nodes.error_count, "retried": nodes.retried,
                                   "retried_total": sum(nodes.retried.values()),
                                   "server_peak_rss_mib": peak[0] / 2**20, "total_seconds": total,
                                   "lost_total": sum(r["lost"] for r in out), "machine": machine_info()})


if __name__ == "__main__":
    main()
