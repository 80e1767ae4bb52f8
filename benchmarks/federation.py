"""200 concurrent lightweight nodes against one real `fedtune server` process for 5 rounds: is any update lost?

The nodes are threads in this process, each a ``FederationClient`` that answers every round with random
LoRA-shaped tensors (no model). The server is the real one (tiny Llama for its global adapter, plaintext on
loopback, fedavg). Counts per round: sampled, accepted, failed; and the wall time of each round.

    .venv/bin/python benchmarks/federation.py [--clients 200] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine_info, print_table, write_json  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="8 nodes, 2 rounds (seconds): a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.rounds = 8, 2
    import tempfile

    import torch

    from fedtune.config import fingerprint, load_config
    from fedtune.transport import Backoff, FederationClient
    from fedtune.types import ClientReply

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="fedbench-"))
    overrides = ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "adapter.r=4",
                 "adapter.target_modules=[q_proj,v_proj]", "data.max_records=40", "eval.samples=0",
                 "server.eval_data=false", f"federation.rounds={args.rounds}", f"federation.min_clients={args.clients}",
                 "federation.round_timeout_s=300", "federation.wait_timeout_s=300", f"out={tmp / 'run'}",
                 f"server.address=127.0.0.1:{port}"]
    cfg = load_config(None, overrides)
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "fedtune.cli_federation", "server", *overrides], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    sent: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def node(i: int) -> None:
        name = f"node-{i:03d}"
        try:
            with FederationClient(f"127.0.0.1:{port}", name, fingerprint=fingerprint(cfg),
                                  backoff=Backoff(initial_s=0.5, max_s=2.0, max_attempts=60)) as fc:
                while (ins := fc.wait_for_instructions(poll_s=20)) is not None and ins.phase != "stop":
                    state = {k: torch.randn_like(v) * 0.01 for k, v in ins.state.items()}
                    ack = fc.submit(ClientReply(name, ins.round, state, num_examples=10))
                    if ack.accepted:
                        with lock:
                            sent[ins.round] = sent.get(ins.round, 0) + 1
        except Exception as e:  # noqa: BLE001 - report, do not hide
            errors.append(f"{name}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    rc = server.wait(timeout=1800)
    for t in threads:
        t.join(timeout=30)
    total = time.perf_counter() - t0
    rows_json = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in rows_json if r["round"] >= 1]
    table, out = [], []
    for r in rounds:
        got = r["clients_ok"]
        acked = sent.get(r["round"], 0)
        table.append([r["round"], len(r["clients"]), acked, got, r["clients_failed"], acked - got,
                      f"{r['bytes_up'] / 2**20:.2f}", f"{r['seconds']:.2f}"])
        out.append({"round": r["round"], "sampled": len(r["clients"]), "acked_by_server": acked,
                    "aggregated": got, "failed": r["clients_failed"], "lost": acked - got,
                    "mib_up": r["bytes_up"] / 2**20, "seconds": r["seconds"]})
    print_table(f"fedtune server: {args.clients} concurrent nodes, {args.rounds} rounds (server exit {rc})",
                ["round", "sampled", "acked", "aggregated", "failed", "lost", "MiB up", "round s"], table)
    print(f"total wall time {total:.1f} s (server start-up included); node errors: {len(errors)}")
    for e in errors[:5]:
        print("  ", e)
    write_json("federation_quick.json" if args.quick else "federation.json", {"clients": args.clients, "rounds": out, "server_exit": rc, "node_errors": errors,
                              "total_seconds": total, "lost_total": sum(r["lost"] for r in out),
                              "machine": machine_info()})


if __name__ == "__main__":
    main()
