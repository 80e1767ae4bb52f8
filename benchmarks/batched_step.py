"""Batched virtual clients: tokens/s of K clients trained in one pass against the same K trained one by one.

    nice -n 10 .venv/bin/python benchmarks/batched_step.py [--quick] [--threads 1]   # CPU, SmolLM2-135M NF4
    python benchmarks/batched_step.py --device cuda --shape llama-3.2-1b           # CUDA, 1B Llama shape, NF4

Both arms run on one loaded model (``fedtune.models.load_model``, as the simulator loads it) and train K
clients from the same global adapter, each client on its own synthetic examples (random token ids, every
token a target, no padding) for ``--steps`` optimizer steps of ``--batch`` x ``--seq``:

- sequential: for each client, load its state into the model, ``train_local``, read the adapter back (what
  ``sim.batch_clients=1`` does);
- batched: a ``MultiLoRA`` with K slots, every slot loaded, ``train_batched`` (one forward and backward of
  the K micro-batches per step), every slot read back (``sim.batch_clients=K``).

Both arms include loading and reading the states. "CPU-time speed-up" is the sequential arm's process CPU
time over the batched arm's: on a machine that other jobs load, it is the fairer ratio (with ``--threads 1``;
on CUDA it counts only the host's work). The order of the arms alternates between K values (a
load that drifts affects both). Peak memory is the arm's high-water mark, in all and above what the loaded model holds:
CUDA ``max_memory_allocated``, CPU the process's VmHWM (reset before each arm). On CUDA, K doubles past the
list until the batched arm runs out of memory: the largest K that fits. "batched peak / 1 client" is the
batched arm's peak (model included) over the sequential arm's at K = 1.

CPU defaults: SmolLM2-135M NF4 with bf16 compute, LoRA r=8 on q,v, batch 4 x seq 64, 2 steps (the
``sim_vs_flower`` federation). CUDA defaults: ``--shape`` (a random-weight Llama with that model's
configuration, built in a temporary folder: no download) in NF4, LoRA r=16 all-linear, batch 4 x seq 256,
4 steps. Prints a table and writes benchmarks/results/batched_step[_quick|_cuda].json.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without pip install

import torch

from benchmarks._common import (
    _proc_rss_bytes,
    machine_info,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    write_json,
)
from benchmarks.local_step import SHAPES, build_shape, synthetic_examples


def setup(args: argparse.Namespace, folder: Path) -> tuple[Any, Any]:
    from fedtune.config import load_config
    from fedtune.models import load_model

    name = args.model
    if args.shape:
        name = str(build_shape(args.shape, folder, torch.device(args.device)))
    targets = "[q_proj,v_proj]" if args.targets == "qv" else "[all-linear]"
    cfg = load_config(None, [f"model.name={name}", f"model.device={args.device}", f"quant.mode={args.quant}",
                             "quant.compute_dtype=bf16", f"adapter.r={args.rank}", f"adapter.alpha={2 * args.rank}",
                             f"adapter.target_modules={targets}", f"train.max_steps={args.steps}",
                             f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", "train.lr=1e-3",
                             f"model.gradient_checkpointing={str(args.checkpointing).lower()}"])
    return cfg, load_model(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_start(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    reset_peak_rss()
    return _proc_rss_bytes(os.getpid())


def _memory_peak(device: torch.device, start: int) -> dict[str, int]:
    """The arm's peak memory: in all (model included) and above what was held before it."""
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else peak_rss_bytes()
    return {"peak_bytes": peak, "peak_extra_bytes": peak - start}


def sequential(cfg: Any, lm: Any, data: list[list[dict[str, Any]]], start_state: dict[str, torch.Tensor]
               ) -> dict[str, float]:
    from fedtune.adapters import get_state, set_state
    from fedtune.train import train_local

    base = _memory_start(lm.device)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0.0
    for k, examples in enumerate(data):
        set_state(lm.model, start_state)
        res = train_local(lm.model, examples, cfg.train, device=lm.device, compute_dtype=lm.compute_dtype,
                          pad_id=lm.tokenizer.pad_token_id, seed=k)
        get_state(lm.model)
        tokens += res.metrics["tokens"]
    _sync(lm.device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds,
            **_memory_peak(lm.device, base)}


def batched(cfg: Any, lm: Any, data: list[list[dict[str, Any]]], start_state: dict[str, torch.Tensor]
            ) -> dict[str, float]:
    from fedtune.simulation.batched import train_batched
    from fedtune.simulation.multilora import MultiLoRA

    base = _memory_start(lm.device)
    t0, c0 = time.perf_counter(), time.process_time()
    multi = MultiLoRA(lm.model, len(data))
    for k in range(len(data)):
        multi.set_slot_state(k, start_state)
    results = train_batched(multi, data, [cfg.train] * len(data), list(range(len(data))), device=lm.device,
                            compute_dtype=lm.compute_dtype, pad_id=lm.tokenizer.pad_token_id)
    for k in range(len(data)):
        multi.get_slot_state(k)
    _sync(lm.device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(r.metrics["tokens"] for r in results)
    out = {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds,
           **_memory_peak(lm.device, base)}
    del multi
    return out


def largest_k(fits: Callable[[int], None], known: int, release: Callable[[], None] = lambda: None,
              limit: int = 1 << 16) -> tuple[int, int]:
    """The largest K (doubling from ``known``, which fits) for which ``fits(K)`` runs without running out of
    memory, and the first K that did not; memory is released (``gc`` and ``release``) after every try.

    Raises:
        RuntimeError: K reached ``limit`` without running out of memory.
    """
    largest, k = known, known
    while True:
        k *= 2
        if k > limit:
            raise RuntimeError(f"K={largest} still fits: stopped at the limit of {limit} clients")
        try:
            fits(k)
        except torch.OutOfMemoryError:
            return largest, k
        finally:
            gc.collect()
            release()
        largest = k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m", help="model.name when --shape is not given")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight Llama of this shape (temporary folder)")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--ks", default="1,2,4,8,16", help="comma-separated numbers of clients")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--targets", choices=["qv", "all"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--no-max-k", action="store_true", help="CUDA: do not search for the largest K that fits")
    ap.add_argument("--quick", action="store_true", help="K = 1, 2, 4 and one step")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (torch.cuda.is_available() is False); run on a GPU machine")
    args.rank = args.rank or (16 if cuda else 8)
    args.targets = args.targets or ("all" if cuda else "qv")
    args.seq = args.seq or (256 if cuda else 64)
    args.steps = args.steps or (1 if args.quick else 4 if cuda else 2)
    ks = [1, 2, 4] if args.quick else [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, lm = setup(args, Path(tmp))
    from fedtune.adapters import get_state

    start_state = get_state(lm.model)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    params = sum(p.numel() for p in lm.model.parameters())
    per_client = args.batch * args.steps
    clients = [synthetic_examples(per_client, args.seq, vocab, seed=i) for i in range(max(ks))]
    sequential(cfg, lm, clients[:1], start_state)  # warm-up: kernels, allocator, first-call costs
    batched(cfg, lm, clients[:2], start_state)
    rows, runs = [], []
    for i, k in enumerate(ks):
        arms = [("sequential", sequential), ("batched", batched)]
        measured = {name: fn(cfg, lm, clients[:k], start_state) for name, fn in (arms if i % 2 == 0 else arms[::-1])}
        s, b = measured["sequential"], measured["batched"]
        one = next((r["sequential"]["peak_bytes"] for r in runs if r["k"] == 1), s["peak_bytes"])
        run = {"k": k, "sequential": s, "batched": b, "speedup": b["tokens_per_s"] / s["tokens_per_s"],
               "cpu_speedup": s["cpu_seconds"] / b["cpu_seconds"],
               "memory_vs_one_client": b["peak_bytes"] / max(one, 1)}
        runs.append(run)
        print(f"K={k}: sequential {s['tokens_per_s']:.0f} tok/s, batched {b['tokens_per_s']:.0f} tok/s "
              f"({run['speedup']:.2f}x; CPU time {run['cpu_speedup']:.2f}x), peak {b['peak_bytes'] / 2**20:.0f} MiB",
              flush=True)
        rows.append([f"K={k}", f"{s['tokens_per_s']:.0f}", f"{b['tokens_per_s']:.0f}", f"{run['speedup']:.2f}x",
                     f"{run['cpu_speedup']:.2f}x",
                     f"{s['peak_bytes'] / 2**20:.0f}", f"{b['peak_bytes'] / 2**20:.0f}",
                     f"+{b['peak_extra_bytes'] / 2**20:.0f}", f"{run['memory_vs_one_client']:.2f}x"])
    largest = None
    if cuda and not args.no_max_k:
        def fits(k: int) -> None:
            batched(cfg, lm, [synthetic_examples(per_client, args.seq, vocab, seed=i) for i in range(k)], start_state)

        largest, failed = largest_k(fits, max(ks), release=torch.cuda.empty_cache)
        print(f"largest K that fits: {largest} (K={failed} ran out of memory)")
    what = (f"{args.shape or args.model} {args.quant}, LoRA r={args.rank} {args.targets}, "
            f"{args.steps} steps x batch {args.batch} x seq {args.seq}, {args.device}")
    print_table(f"batched_step: {what}", ["K clients", "sequential tok/s", "batched tok/s", "speed-up",
                                          "CPU-time speed-up",
                                          "seq peak MiB", "batched peak MiB", "batched above model MiB",
                                          "batched peak / 1 client"], rows)
    name = "batched_step_cuda.json" if cuda else "batched_step_quick.json" if args.quick else "batched_step.json"
    path = write_json(name, {"setting": what, "params": params, "runs": runs, "largest_k": largest,
                             "args": vars(args), "machine": machine_info(args.device),
                             "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                             "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
