"""Aggregation benchmark: time, peak memory and bandwidth of the server's aggregation on SmolLM2-135M adapters.

    .venv/bin/python benchmarks/aggregate.py [--quick]

LoRA rank 16 (fp32, random) on every projection of SmolLM2-135M's 30 blocks (q/o 576->576, k/v 576->192,
gate/up 576->1536, down 1536->576): 4.9 M parameters, 19.6 MB per client. For K = 8, 64, 256 clients it runs
streaming fedavg, svd (exact and randomized), flora and median, next to a plain memory copy of the same bytes
(``copy_`` into one buffer, and ``clone``). Each run is a fresh process (same machine, back to back).

Replies are produced lazily, one at a time, from a pool of 4 pre-generated adapters, so neither generation
time nor K live copies of the replies are counted: peak memory is what aggregation itself allocates (peak RSS
over the call, reset through /proc/self/clear_refs). Strategies that need every reply (median) would hold
K x 19.6 MB of replies on top in a real server. ``compute_error`` is off in the timed runs; the cost of the
aggregation error is measured separately on fedavg.

Prints a table and writes benchmarks/results/aggregate.json (aggregate_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
POOL = 4


def shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"base_model.model.model.layers.{i}.{m}": s for i in range(layers) for m, s in MODULES.items()}


def make_adapter(
    layout: dict[str, tuple[int, int]], gen: torch.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, State]:
    """One flat fp32 buffer and the adapter state viewing it (so a copy of the same bytes is one clone)."""
    sizes = [(RANK, d_in) for d_out, d_in in layout.values()] + [(d_out, RANK) for d_out, d_in in layout.values()]
    flat = (torch.randn(sum(a * b for a, b in sizes), generator=gen) * 0.02).to(device)
    state: State = {}
    offset = 0
    names = [p + ".lora_A.weight" for p in layout] + [p + ".lora_B.weight" for p in layout]
    for name, (rows, cols) in zip(names, sizes, strict=True):
        state[name] = flat[offset : offset + rows * cols].view(rows, cols)
        offset += rows * cols
    return flat, state


def lazy_replies(pool: list[State], k: int) -> Iterator[ClientReply]:
    for i in range(k):
        yield ClientReply(f"c{i}", 1, pool[i % len(pool)], num_examples=1 + i % 7)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn, device: str = "cpu") -> tuple[float, float]:
    """(seconds, peak memory growth in MB) of ``fn()``: RSS on CPU (peak reset first), allocator on CUDA."""
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        del out
        return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    before = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = max(_rss_kib("VmHWM") - before, 0) / 1024
    del out
    gc.collect()
    return seconds, peak


def clone_all(flats: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """Clone K adapters' bytes one at a time (each copy dropped, as a streaming server would)."""
    out = flats[0]
    for i in range(k):
        out = flats[i % len(flats)].clone()
    return out


def copy_all(flats: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """Copy K adapters' bytes into one preallocated buffer: memory bandwidth without allocation."""
    out = torch.empty_like(flats[0])
    for i in range(k):
        out.copy_(flats[i % len(flats)])
    return out


RUNS = {  # label: (strategy name, config overrides); compute_error off unless stated
    "fedavg (streaming)": ("fedavg", {}),
    "fedavg + agg_error": ("fedavg", {"compute_error": True}),
    "svd exact": ("svd", {}),
    "svd randomized": ("svd", {"svd_method": "randomized"}),
    "flora": ("flora", {}),
    "median": ("median", {}),
}
COPIES = ("copy (copy_)", "copy (clone)")
SKIP = {("svd exact", 256), ("fedavg + agg_error", 256)}  # minutes each on a small CPU; see the report


def run_cell(label: str, k: int, layers: int, device: str) -> dict[str, object]:
    """Time and peak memory of one run, in this (fresh) process; warm-up on a tiny layout only."""
    gen = torch.Generator().manual_seed(0)
    layout = shapes(layers)
    flats, pool = zip(*(make_adapter(layout, gen, device) for _ in range(POOL)), strict=True)
    _, global_state = make_adapter(layout, gen, device)
    global_state = {key: v.clone() for key, v in global_state.items()}
    nbytes = flats[0].numel() * 4
    if label in COPIES:
        fn = copy_all if label == COPIES[0] else clone_all
        fn(flats, 2)
        seconds, peak = measure(lambda: fn(flats, k), device)
    else:
        name, overrides = RUNS[label]
        cfg = StrategyConfig(**{"r": RANK, "lora_alpha": 32.0, "compute_error": False, **overrides})
        tiny = {"warm.q_proj": (32, 24)}
        _, warm = make_adapter(tiny, gen, device)
        make_strategy(name, cfg).aggregate(0, warm, lazy_replies([warm], 3))
        strategy = make_strategy(name, cfg)
        seconds, peak = measure(lambda: strategy.aggregate(1, global_state, lazy_replies(list(pool), k)), device)
    return {"run": label, "K": k, "seconds": seconds, "gb_per_s": k * nbytes / seconds / 1e9, "peak_mb": peak,
            "bytes_per_client": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, K = 8 and 64 (seconds)")
    parser.add_argument("--device", default="cpu", help="where the server aggregates: cpu (default) or cuda")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: results/)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these labels (the copies always run)")
    parser.add_argument("--cell", nargs=3, metavar=("LABEL", "K", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], int(args.cell[1]), int(args.cell[2]), args.device)))
        return
    layers, ks = (2, (8, 64)) if args.quick else (30, (8, 64, 256))
    rows: list[dict[str, object]] = []
    for k in ks:
        copy_gbs = 0.0
        for label in (*COPIES, *RUNS):
            if (label, k) in SKIP and not args.quick and args.device == "cpu":
                continue
            if args.only is not None and label not in (*COPIES, *args.only):
                continue
            # A fresh process per run: peak RSS is then what this run allocates, not memory freed earlier.
            cmd = [sys.executable, __file__, "--cell", label, str(k), str(layers), "--device", args.device]
            out = subprocess.run(cmd,
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            copy_gbs = copy_gbs or float(row["gb_per_s"])
            row["pct_copy"] = 100 * float(row["gb_per_s"]) / copy_gbs
            rows.append(row)
            print(f"{label:>20}  K={k:<4} {row['seconds']:8.3f} s  {row['gb_per_s']:7.2f} GB/s  "
                  f"peak {row['peak_mb']:8.1f} MB", flush=True)
    default = "aggregate_quick.json" if args.quick else "aggregate.json"
    if args.device != "cpu":
        default = default.replace(".json", f"_{args.device}.json")
    report(rows, layers, int(rows[0]["bytes_per_client"]), args.json or ROOT / "benchmarks" / "results" / default,
           args.device)


def report(rows: list[dict[str, object]], layers: int, nbytes: int, out: Path, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"aggregation on {device}, {layers} blocks x 7 LoRA r={RANK}, {nbytes / 1e6:.1f} MB per client")
    for col in ("run", "K", "seconds", "GB/s", "% of copy", "peak MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["run"]), str(r["K"]), f"{r['seconds']:.3f}", f"{r['gb_per_s']:.2f}",
                      f"{r['pct_copy']:.0f}", f"{r['peak_mb']:.1f}")
    Console().print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"layers": layers, "rank": RANK, "bytes_per_client": nbytes, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device,
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "machine": platform.processor() or platform.machine(),
            "peak_memory": "cpu: peak RSS growth during the call (VmHWM after clear_refs), fresh process per run; "
            "cuda: torch.cuda.max_memory_allocated growth; replies from a shared pool of 4"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
