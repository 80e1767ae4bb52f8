"""Aggregation benchmark: time, peak memory and bandwidth of the server's aggregation on SmolLM2-135M adapters.

    .venv/bin/python benchmarks/aggregate.py [--quick] [--threads N] [--repeat N]

LoRA rank 16 (fp32, random) on every projection of SmolLM2-135M's 30 blocks (q/o 576->576, k/v 576->192,
gate/up 576->1536, down 1536->576): 4.9 M parameters in 420 tensors, 19.5 MB per client. For K = 8, 64, 256
clients it runs streaming fedavg, fedavg with ``agg_error`` (the default ``auto``: the streamed sketch at these
K, and the exact Gram form for reference, except at K = 256), svd (exact and randomized), flora and median,
next to a plain memory copy of the same bytes. Each cell is a fresh process (same machine, back to back, same
torch thread count). ``--quick``: 2 blocks, K = 256 only for fedavg with and without ``agg_error``, every cell
in this one process (its peak memory then counts only heap that earlier cells did not leave behind).

The cost of ``agg_error``: the two fedavg + agg_error rows time plain fedavg alternately with themselves in
the same process (``PAIRED``) and report the ratio of the fastest runs (``x fedavg``), in wall time and in CPU
time of the process; the latter leaves out the time other processes held the cores, so on a shared machine
it is the steadier of the two (single-threaded runs only: with more threads it adds up every thread).

How the copy anchor is measured, and why it is a fair one:

- Same bytes, same source: ``copy (copy_)`` copies each of the K replies' 19.5 MB, read from the same pool
  as the strategies read them, into one destination. The destination is allocated and touched before the
  clock starts, so the anchor is pure bandwidth (no page faults); the strategies allocate their
  accumulators inside the timed call, which only makes the comparison stricter for them.
  ``copy (clone)`` allocates a fresh copy per reply (page faults included), for reference.
- Not cache-resident, in either direction: replies come from a pool of adapters at least twice the size of
  the last-level cache (4 at the least), taken round-robin and continuing across repeats, so every reply
  is read from DRAM by the copy and by the strategies alike, never from a cache warmed by the run before.
- Same timing rule for every row: the call is repeated (``--repeat``, fresh strategy object each time,
  stopping once 10 s have been spent) and the fastest run is kept; peak memory is the first run's.
- Same moment: each timed run follows a ``copy_`` of the same K replies in the same process, and
  ``% of copy`` is against the fastest of those (``copy GB/s``), so load from other processes on a shared
  machine hits the anchor and the run alike.
- Threads: torch's default (``--threads`` to set it). ``copy_`` of one 19.5 MB buffer uses every thread;
  the strategies' per-tensor kernels (<= 100 KB each) mostly run on one. On a shared machine, threads beyond
  the idle cores wreck the multi-threaded rows instead (a 2-core VM at load 2: ``copy_`` 2.5 GB/s on two
  threads, 17 GB/s on one; a 576 x 576 eigh 20 ms on one, up to 1.2 s on two), which flatters the
  strategies against the anchor; use ``--threads 1`` there.

Replies are produced lazily, one at a time, so neither generation time nor K live copies of the replies are
counted: peak memory is what aggregation itself allocates (peak RSS growth over the call, reset through
/proc/self/clear_refs, after ``malloc_trim`` so that reusing freed heap counts as growth). Strategies that
need every reply (median) would hold K x 19.5 MB of replies on top in a real server. ``compute_error`` is
off in the other rows. Validation of every reply (names, shapes, finiteness) is part of every strategy row.

Prints a table and writes benchmarks/results/aggregate.json (aggregate_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without pip install

from benchmarks._common import RESULTS, machine_info, peak_rss_bytes, print_table, reset_peak_rss
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.types import ClientReply, State

MODULES = {  # name: (d_out, d_in)
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
RANK = 16
MIN_POOL = 4
REPEAT_BUDGET_S = 10.0


def shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"base_model.model.model.layers.{i}.{m}": s for i in range(layers) for m, s in MODULES.items()}


def make_adapter(
    layout: dict[str, tuple[int, int]], gen: torch.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, State]:
    """One flat fp32 buffer and the adapter state viewing it (so a copy of the same bytes is one copy)."""
    sizes = [(RANK, d_in) for d_out, d_in in layout.values()] + [(d_out, RANK) for d_out, d_in in layout.values()]
    flat = (torch.randn(sum(a * b for a, b in sizes), generator=gen) * 0.02).to(device)
    state: State = {}
    offset = 0
    names = [p + ".lora_A.weight" for p in layout] + [p + ".lora_B.weight" for p in layout]
    for name, (rows, cols) in zip(names, sizes, strict=True):
        state[name] = flat[offset : offset + rows * cols].view(rows, cols)
        offset += rows * cols
    return flat, state


def llc_bytes() -> int:
    """Total last-level (L3) cache of this machine, summed over its instances; 64 MiB when sysfs says nothing."""
    seen: dict[str, int] = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
            seen[(index / "shared_cpu_list").read_text().strip()] = int(size.rstrip("K")) * 1024
        except (OSError, ValueError):
            continue
    return sum(seen.values()) or 64 * 2**20


class Pool:
    """Adapters to take replies from, round-robin, at least twice the last-level cache in total.

    The position carries over from one use to the next, so a reply is read again only after a whole pool
    (>= 2 x LLC) of other bytes has gone through the cache: every read is a DRAM read.
    """

    def __init__(self, layout: dict[str, tuple[int, int]], gen: torch.Generator, device: str) -> None:
        first = make_adapter(layout, gen, device)
        size = max(MIN_POOL, math.ceil(2 * llc_bytes() / (first[0].numel() * 4))) if device == "cpu" else MIN_POOL
        adapters = [first] + [make_adapter(layout, gen, device) for _ in range(size - 1)]
        self.flats = [f for f, _ in adapters]
        self.states = [s for _, s in adapters]
        self.nbytes = self.flats[0].numel() * 4
        self._next = 0

    def take(self, k: int) -> list[int]:
        """The pool indices of the next ``k`` replies."""
        out = [(self._next + i) % len(self.flats) for i in range(k)]
        self._next = (self._next + k) % len(self.flats)
        return out

    def replies(self, k: int) -> Iterator[ClientReply]:
        for i, j in enumerate(self.take(k)):
            yield ClientReply(f"c{i}", 1, self.states[j], num_examples=1 + i % 7)


def _release_free_heap() -> None:
    """Hand memory freed earlier back to the OS (glibc keeps freed blocks), so RSS growth counts reuse too."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn: Callable[[], object], device: str = "cpu") -> tuple[float, float, float]:
    """(seconds, peak memory growth in MB, CPU seconds of this process) of ``fn()``.

    Peak memory: RSS on CPU (peak reset first), the allocator on CUDA. CPU seconds leave out the time other
    processes held the cores: on a loaded machine they compare two single-threaded runs more steadily.
    """
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        del out
        return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20, cpu
    gc.collect()
    _release_free_heap()
    before = _rss_bytes()
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = max(peak_rss_bytes() - before, 0) / 2**20
    del out
    gc.collect()
    return seconds, peak, cpu


def copy_all(pool: Pool, k: int, out: torch.Tensor) -> torch.Tensor:
    """Copy the next K replies' bytes into ``out``, allocated and touched beforehand: memory bandwidth only."""
    for j in pool.take(k):
        out.copy_(pool.flats[j])
    return out


def clone_all(pool: Pool, k: int) -> torch.Tensor:
    """Clone the next K replies' bytes one at a time (each copy dropped, as a streaming server would)."""
    out = pool.flats[0]
    for j in pool.take(k):
        out = pool.flats[j].clone()
    return out


# label: (strategy name, config overrides); compute_error is off unless stated
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg (streaming)": ("fedavg", {}),
    "fedavg + agg_error": ("fedavg", {"compute_error": True}),  # auto: the sketch past a stacked rank of 32
    "fedavg + agg_error exact": ("fedavg", {"compute_error": True, "agg_error_method": "exact"}),
    "svd exact": ("svd", {}),
    "svd randomized": ("svd", {"svd_method": "randomized"}),
    "flora": ("flora", {}),
    "median": ("median", {}),
}
PAIRED = {"fedavg + agg_error": "fedavg (streaming)", "fedavg + agg_error exact": "fedavg (streaming)"}
"""Runs timed alternately with a baseline in the same process, for a ratio that load on a shared machine hits alike."""
COPIES = ("copy (copy_)", "copy (clone)")
SKIP = {("fedavg + agg_error exact", 256)}  # Gram matrices of 16 + 4096 stacked columns per layer: minutes on a small CPU
QUICK_LABELS = ("fedavg (streaming)", "fedavg + agg_error")  # --quick at K = 256 (seconds)


def wanted(label: str, k: int, quick: bool, device: str) -> bool:
    """Whether a run has a cell at ``k``: SKIP on the CPU; with --quick, few rows at K = 256 and no slow Gram."""
    if quick:
        if label == "fedavg + agg_error exact":
            return k == 8
        return k < 256 or label in (COPIES[0], *QUICK_LABELS)
    return device != "cpu" or (label, k) not in SKIP


def run_cell(label: str, k: int, layers: int, device: str, repeat: int) -> dict[str, Any]:
    """Best-of-``repeat`` time and first-run peak memory of one run, in this (fresh) process.

    Every timed run is preceded by a ``copy_`` of K replies (the paired anchor): on a shared machine the
    anchor and the run then see the same load, and ``% of copy`` compares runs made seconds apart.
    """
    gen = torch.Generator().manual_seed(0)
    layout = shapes(layers)
    pool = Pool(layout, gen, device)
    _, global_state = make_adapter(layout, gen, device)
    global_state = {key: v.clone() for key, v in global_state.items()}
    out = torch.empty_like(pool.flats[0])
    out.copy_(pool.flats[-1])  # touch the destination; the pool's last adapter is read last anyway

    def anchor() -> object:
        return copy_all(pool, k, out)
    if label == COPIES[0]:
        fn = anchor
    elif label == COPIES[1]:
        def fn() -> object:
            return clone_all(pool, k)
    else:
        fn = strategy_run(label, k, pool, global_state, gen, device)
    baseline = strategy_run(PAIRED[label], k, pool, global_state, gen, device) if label in PAIRED else None
    times: list[float] = []
    cpu_times: list[float] = []
    copies: list[float] = []
    base_times: list[float] = []
    base_cpu: list[float] = []
    peak = 0.0
    while len(times) < max(repeat, 1) and (not times or sum(times) < REPEAT_BUDGET_S):
        copies.append(measure(anchor, device)[0])
        if baseline is not None:
            seconds, _, cpu = measure(baseline, device)
            base_times.append(seconds)
            base_cpu.append(cpu)
        seconds, mb, cpu = measure(fn, device)
        peak = peak if times else mb
        times.append(seconds)
        cpu_times.append(cpu)
    gbs = k * pool.nbytes / min(times) / 1e9
    copy_gbs = k * pool.nbytes / min(copies) / 1e9
    row = {"run": label, "K": k, "seconds": min(times), "runs": len(times), "gb_per_s": gbs,
           "copy_gb_per_s": copy_gbs, "pct_copy": 100 * gbs / copy_gbs, "peak_mb": peak,
           "bytes_per_client": pool.nbytes, "pool": len(pool.flats)}
    if baseline is not None:
        row.update({"baseline": PAIRED[label], "baseline_seconds": min(base_times),
                    "x_baseline": min(times) / min(base_times), "cpu_seconds": min(cpu_times),
                    "baseline_cpu_seconds": min(base_cpu), "x_baseline_cpu": min(cpu_times) / min(base_cpu)})
    return row


def strategy_run(label: str, k: int, pool: Pool, global_state: State, gen: torch.Generator,
                 device: str) -> Callable[[], object]:
    """A call aggregating the next K replies of ``pool`` with the strategy of ``label`` (fresh each call)."""
    name, overrides = RUNS[label]
    cfg = dataclasses.replace(StrategyConfig(r=RANK, lora_alpha=32.0, compute_error=False), **overrides)
    _, warm = make_adapter({"warm.q_proj": (32, 24)}, gen, device)  # warm-up on a tiny layout only
    make_strategy(name, cfg).aggregate(1, warm, iter([ClientReply(f"w{i}", 0, warm, 1) for i in range(40)]))

    def fn() -> object:
        return make_strategy(name, cfg).aggregate(1, global_state, pool.replies(k))
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 blocks; K = 8 and 64, and 256 for fedavg with and without agg_error (seconds)")
    parser.add_argument("--device", default="cpu", help="where the server aggregates: cpu (default) or cuda")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: results/)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these labels (the copies always run)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads in every cell (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=0,
                        help="timed runs per cell, fastest kept (fewer past 10 s); 0: 3, or 1 with --quick")
    parser.add_argument("--cell", nargs=3, metavar=("LABEL", "K", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.cell:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        row = run_cell(args.cell[0], int(args.cell[1]), int(args.cell[2]), args.device, args.repeat)
        print(json.dumps({**row, "threads": torch.get_num_threads()}))
        return
    layers, ks = (2, (8, 64, 256)) if args.quick else (30, (8, 64, 256))
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for k in ks:
        for label in (*COPIES, *RUNS):
            if not wanted(label, k, args.quick, args.device) or (args.only is not None and label not in (*COPIES, *args.only)):
                continue
            if args.quick:  # in this process: seconds, not a torch start-up per cell
                if args.threads > 0:
                    torch.set_num_threads(args.threads)
                row = {**run_cell(label, k, layers, args.device, args.repeat), "threads": torch.get_num_threads()}
            else:  # a fresh process per run: peak RSS is then what this run allocates, not memory freed earlier
                cmd = [sys.executable, __file__, "--cell", label, str(k), str(layers), "--device", args.device,
                       "--threads", str(args.threads), "--repeat", str(args.repeat)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            paired = (f"  {row['x_baseline']:.2f}x {row['baseline']} ({row['x_baseline_cpu']:.2f}x in CPU time)"
                      if "x_baseline" in row else "")
            print(f"{label:>26}  K={k:<4} {row['seconds']:8.3f} s  {row['gb_per_s']:7.2f} GB/s  "
                  f"{row['pct_copy']:5.1f}% of copy  peak {row['peak_mb']:8.1f} MB{paired}", flush=True)
    default = "aggregate_quick.json" if args.quick else "aggregate.json"
    if args.device != "cpu":
        default = default.replace(".json", f"_{args.device}.json")
    meta = {**machine_info(args.device), "device": args.device, "layers": layers, "rank": RANK,
            "bytes_per_client": rows[0]["bytes_per_client"], "pool": rows[0]["pool"], "llc_bytes": llc_bytes(),
            "threads": rows[0]["threads"], "repeat": args.repeat, "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "timing": f"fastest of up to {args.repeat} runs (fewer once {REPEAT_BUDGET_S:.0f} s are spent), "
            "fresh strategy each run",
            "peak_memory": "cpu: peak RSS growth during the first run (VmHWM after clear_refs), fresh process per "
            "cell; cuda: torch.cuda.max_memory_allocated growth"}
    report(rows, meta, args.json or RESULTS / default)


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    title = (f"aggregation on {meta['device']} ({meta['cpus']} CPUs, {meta['threads']} torch threads, load "
             f"{meta['load_avg_before'][0]:.1f}), {meta['layers']} blocks x 7 LoRA r={RANK}, "
             f"{int(meta['bytes_per_client']) / 1e6:.1f} MB per client, pool of {meta['pool']}")
    columns = ("run", "K", "seconds", "runs", "GB/s", "copy GB/s", "% of copy", "peak MB", "x fedavg", "x fedavg cpu")
    print_table(title, columns, [
        (r["run"], r["K"], f"{r['seconds']:.3f}", r["runs"], f"{r['gb_per_s']:.2f}", f"{r['copy_gb_per_s']:.2f}",
         f"{r['pct_copy']:.1f}", f"{r['peak_mb']:.1f}", f"{r['x_baseline']:.2f}" if "x_baseline" in r else "",
         f"{r['x_baseline_cpu']:.2f}" if "x_baseline" in r else "")
        for r in rows])
    print("x fedavg: the run's time over plain fedavg's, timed alternately in the same process (best of each); "
          "x fedavg cpu: the same in CPU seconds of the process (what other processes' load does not inflate)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
