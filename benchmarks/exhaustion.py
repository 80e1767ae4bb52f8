"""Honest rounds per minute of a real federation while each resource-exhaustion attack of issue 16 runs.

One real `fedtune server` process (tiny Llama, fedavg, plaintext on loopback) and ``--nodes`` lightweight
honest nodes (threads answering with small random tensors, over the bulk lane) run for the whole benchmark;
the attacks (``fedtune.transport.loadtest``) are switched on and off in turn, ``--repeats`` times each:
off, idle uploads, off, poll flood, off, slowloris, off, idle uploads, ... Each window is ``--window-rounds``
rounds. An attack runs in a process of its own, started before its window and killed after it; a window
starts ``--settle`` seconds after the switch, at the next round boundary. The attacks: idle uploads held by
an observer key (item 3), 300 open long polls of an enrolled key (item 4), 300 idle connections to the bulk
lane (item 8).

On a shared machine other jobs move a round rate by tens of percent from one minute to the next, so each
attack window is compared with the attack-off windows on either side of it (same server, same nodes, seconds
apart), and the ratios' median and range are reported (target: >= 0.8). What an attack costs the server
does not depend on the machine's load: the server's CPU time per round (``/proc``) under each attack is
reported next to the attack-off windows'. Also: failed and lost honest updates, the CPU time of the attack
process (on the same machine, it competes with the server for the cores), the load average.

    nice -n 10 .venv/bin/python benchmarks/exhaustion.py [--nodes 4] [--window-rounds 40] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from _common import machine_info, print_table, write_json


def main() -> None:
    from fedtune.transport.loadtest import ATTACKS, Window, neighbour_ratios, run_interleaved, window_plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--window-rounds", type=int, default=40, help="rounds measured per window")
    ap.add_argument("--repeats", type=int, default=4, help="windows per attack")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between a switch and its window")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    if args.nodes < 1 or args.window_rounds < 2 or args.repeats < 1 or not attacks:
        ap.error("--nodes >= 1, --window-rounds >= 2, --repeats >= 1 and at least one attack are needed")
    plan = window_plan(attacks, args.repeats)
    load_before = os.getloadavg()
    print(f"{len(plan)} windows of {args.window_rounds} rounds, {args.nodes} honest nodes; load average "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)

    def progress(w: Window) -> None:
        print(f"  {w.attack or 'off':>13}: {w.rounds_per_minute:7.1f} rounds/min, server "
              f"{w.server_cpu_ms_per_round:6.1f} CPU ms/round, load {os.getloadavg()[0]:.2f}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fedexhaust-"))
    windows = run_interleaved(tmp, args.nodes, attacks, args.repeats, args.window_rounds, settle_s=args.settle,
                              progress=progress)
    load_after = os.getloadavg()
    ratio_of = neighbour_ratios(windows)
    ratios: dict[str, list[float]] = {}
    per_window = []
    for i, (w, ratio) in enumerate(zip(windows, ratio_of, strict=True)):
        if w.attack is not None and ratio is not None:
            ratios.setdefault(w.attack, []).append(ratio)
        per_window.append([i, w.attack or "off", f"{w.rounds_per_minute:.1f}",
                           "" if ratio is None else f"{ratio:.2f}", f"{w.server_cpu_ms_per_round:.1f}",
                           f"{w.attack_cpu_s:.1f}", w.failed, w.lost])
    print_table(f"windows in order ({args.window_rounds} rounds each, {args.nodes} honest nodes)",
                ["#", "attack", "rounds/min", "ratio to neighbours", "server CPU ms/round", "attack CPU s",
                 "failed", "lost"], per_window)

    off = [w for w in windows if w.attack is None]
    off_cpu = statistics.median(w.server_cpu_ms_per_round for w in off)
    summary, out = [["off (anchor)", len(off), "1.00", "", f"{off_cpu:.1f}", "",
                     sum(w.failed for w in off), sum(w.lost for w in off)]], []
    for a in attacks:
        ws, r = [w for w in windows if w.attack == a], sorted(ratios.get(a, []))
        cpu = statistics.median(w.server_cpu_ms_per_round for w in ws)
        med = statistics.median(r) if r else 0.0
        summary.append([a, len(ws), f"{med:.2f}", f"{r[0]:.2f}-{r[-1]:.2f}" if r else "", f"{cpu:.1f}",
                        f"{cpu - off_cpu:+.1f}", sum(w.failed for w in ws), sum(w.lost for w in ws)])
        out.append({"attack": a, "windows": len(ws), "ratios": r, "ratio_median": med,
                    "server_cpu_ms_per_round_median": cpu, "extra_server_cpu_ms_per_round": cpu - off_cpu,
                    "failed_updates": sum(w.failed for w in ws), "lost_updates": sum(w.lost for w in ws)})
    print_table("honest round rate under each attack: ratio to the neighbouring attack-off windows (target >= 0.8)",
                ["attack", "windows", "ratio median", "ratio range", "server CPU ms/round", "vs off",
                 "failed", "lost"], summary)
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs")
    write_json("exhaustion.json", {
        "nodes": args.nodes, "window_rounds": args.window_rounds, "repeats": args.repeats, "attacks": out,
        "off_server_cpu_ms_per_round_median": off_cpu, "load_average_before": load_before,
        "load_average_after": load_after, "machine": machine_info(),
        "windows": [{"attack": w.attack, "rounds_per_minute": w.rounds_per_minute,
                     "server_cpu_ms_per_round": w.server_cpu_ms_per_round, "attack_cpu_s": w.attack_cpu_s,
                     "wall_s": w.wall_s, "failed": w.failed, "lost": w.lost,
                     "round_seconds": [r["seconds"] for r in w.rounds]} for w in windows]})


if __name__ == "__main__":
    main()
