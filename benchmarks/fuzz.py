"""Fuzz a real `fedtune server` with mutated messages of every RPC and the bulk lane while honest nodes train.

A server (tiny Llama, fedavg, allow-list, plaintext on loopback) runs rounds with honest in-process nodes
for a baseline period, then an enrolled node sends ``--messages`` mutated messages
(``fedtune.transport.fuzzing``). Reported: what the server answered, by RPC and status; crashes (the server
gone), hangs (a call past its deadline), INTERNAL answers (an unexpected exception on the server); the
server's memory before and after; honest rounds per minute without and with the fuzzer.

    .venv/bin/python benchmarks/fuzz.py [--messages 100000] [--seed 0] [--honest 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import ROOT, machine_info, print_table, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--honest", type=int, default=2)
    ap.add_argument("--baseline-s", type=float, default=30.0)
    args = ap.parse_args()
    import logging

    from fedtune.transport.fuzzing import fuzz_federation

    # the honest nodes' "server unreachable, retrying" while the server starts and after it stops
    logging.getLogger("fedtune.transport.client").setLevel(logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="fedfuzz-"))
    out = fuzz_federation(work, ROOT / "simulations" / "tiny.toml", messages=args.messages, seed=args.seed,
                          honest=args.honest, baseline_s=args.baseline_s)
    rows = [(rpc, sum(c.values()), ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
            for rpc, c in sorted(out["outcomes"].items())]
    print_table(f"fuzz: {args.messages} mutated messages, seed {args.seed}", ["rpc", "sent", "answers"], rows)
    print_table("server under fuzzing", ["measure", "value"], [
        ("server alive at the end", out["server_alive"]), ("INTERNAL answers", out["internal"]),
        ("hangs (past the deadline)", out["hangs"]), ("UNAVAILABLE", out["unavailable"]),
        ("RSS before / after / peak (MiB)",
         f"{out['rss_before_mib']:.0f} / {out['rss_after_mib']:.0f} / {out['rss_peak_mib']:.0f}"),
        ("honest rounds/min without / with fuzzing",
         f"{out['rounds_per_min_baseline']:.1f} / {out['rounds_per_min_fuzzing']:.1f}"),
        ("honest rounds during fuzzing", f"{out['rounds_fuzzing']} in {out['fuzz_seconds']:.0f} s")])
    for ex in out["examples"]:
        print("  ", ex)
    path = write_json("fuzz.json", {"args": vars(args), "machine": machine_info(), **out})
    print(f"results: {path} (server log and run folder in {work})")


if __name__ == "__main__":
    main()
