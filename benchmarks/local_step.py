"""Local training step: fedtune's ``train_local`` against a plain transformers + peft loop, side by side.

    .venv/bin/python benchmarks/local_step.py [--quick]
    python benchmarks/local_step.py --device cuda --shape llama-3.2-1b      # the H100 anchor (DESIGN.md 10)

Both sides load the same folder with ``from_pretrained`` (bitsandbytes NF4 with bf16 compute, or bf16 weights),
put the same LoRA on it (r=16, alpha=32, all-linear, no dropout), and train on the same synthetic batches
(random token ids, every token counted in the loss, no padding) with bf16 autocast, AdamW, gradient clipping
at 1.0 and optional non-reentrant gradient checkpointing. fedtune goes through ``load_model`` and
``train_local`` exactly as ``fedtune train`` does (metrics.jsonl written every step); the baseline is the
loop written out below. Both models stay loaded and the measurements alternate: each round runs a few steps
of one side, then of the other, in ABBA order. Warm-up steps are dropped; the table shows the median step
and the median over rounds of fedtune's time over the baseline's time in the same round (robust to a load that
drifts, as on a shared CPU).

Defaults: CPU: SmolLM2-135M, batch 4, seq 128, 6 measured steps alternating every step, no checkpointing.
CUDA: batch 8, seq 1024, 10 measured steps alternating every 2, gradient checkpointing. ``--shape llama-3.2-1b`` (or 3b) builds a random Llama with that
model's configuration into a temporary folder (no download). Prints a table and writes
benchmarks/results/local_step.json (local_step_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without pip install

import torch

from benchmarks._common import machine_info, median, peak_rss_bytes, print_table, write_json

SHAPES: dict[str, dict[str, Any]] = {  # Llama-3.2 configurations (tie_word_embeddings as in the originals)
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
}
# Plain transformers + peft + bitsandbytes on one H100, tokens/s (DESIGN.md section 10).
ANCHORS = {("llama-3.2-1b", "bf16"): 23_800, ("llama-3.2-1b", "nf4"): 10_400,
           ("llama-3.2-3b", "bf16"): 10_800, ("llama-3.2-3b", "nf4"): 5_400}
LR = 2e-4


def build_shape(shape: str, folder: Path, device: torch.device) -> Path:
    """Save a random-weight Llama with ``shape``'s configuration (bf16) and a tiny tokenizer to ``folder``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(252)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # initialise directly in bf16: half the memory and time
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    del model
    return folder


def synthetic_examples(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` full-length examples of random token ids; every token is a target."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (seq,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": list(ids)})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Side:
    """One implementation under test: ``run(k)`` trains ``k`` steps and returns each step's seconds."""

    name: str
    run: Callable[[int], list[float]]
    device: torch.device
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    static_bytes: int = 0
    peak_extra_bytes: int = 0

    def measure(self, k: int, keep: bool = True) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        times = self.run(k)
        if self.device.type == "cuda":
            self.peak_extra_bytes = max(self.peak_extra_bytes, torch.cuda.max_memory_allocated(self.device) - before)
        if keep:
            self.times.extend(times)


def cuda_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def fedtune_side(mode: str, model_name: str, args: argparse.Namespace, examples: list[dict[str, Any]],
                 workdir: Path) -> Side:
    """fedtune's path: ``load_config`` -> ``load_model`` -> ``train_local``, as ``fedtune train`` calls it."""
    from fedtune.config import load_config
    from fedtune.models import load_model
    from fedtune.runs import RunDir
    from fedtune.train import train_local

    cfg = load_config(None, [
        f"model.name={model_name}", f"model.device={args.device}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"quant.mode={'nf4' if mode == 'nf4' else 'none'}", "quant.compute_dtype=bf16",
        f"adapter.r={args.rank}", f"adapter.alpha={2 * args.rank}", "adapter.dropout=0.0",
        "adapter.target_modules=[all-linear]", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
        f"train.lr={LR}", "train.max_grad_norm=1.0", "train.bf16=true", f"out={workdir / f'fedtune-{mode}'}"])
    device = torch.device(args.device)
    before = cuda_allocated(device)
    lm = load_model(cfg)
    run = RunDir(cfg.out)
    calls = [0]
    side = Side("fedtune", lambda k: [], lm.device)
    side.static_bytes = cuda_allocated(device) - before

    def run_steps(k: int) -> list[float]:
        times: list[float] = []
        sync(lm.device)
        last = [time.perf_counter()]

        def progress(step: int, total: int, loss: float) -> None:
            sync(lm.device)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            side.losses.append(loss)

        calls[0] += 1
        # train_local takes every setting from its TrainConfig, the number of steps included
        train_local(lm.model, examples, dataclasses.replace(cfg.train, max_steps=k), device=lm.device,
                    compute_dtype=lm.compute_dtype, pad_id=lm.tokenizer.pad_token_id, seed=cfg.seed + calls[0],
                    on_step=run.log, progress=progress)
        return times

    side.run = run_steps
    return side


def baseline_side(mode: str, folder: str, args: argparse.Namespace, examples: list[dict[str, Any]]) -> Side:
    """The reference: from_pretrained + get_peft_model + AdamW and a plain loop, nothing from fedtune."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(args.device)
    before = cuda_allocated(device)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if mode == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if mode != "nf4":
        model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    batches = [{k: torch.tensor([ex[k] for ex in examples[i:i + args.batch]]) for k in examples[0]}
               for i in range(0, len(examples) - args.batch + 1, args.batch)]
    side = Side("peft baseline", lambda k: [], device)
    side.static_bytes = cuda_allocated(device) - before
    counter = [0]

    def run_steps(k: int) -> list[float]:
        times = []
        model.train()
        for _ in range(k):
            sync(device)
            start = time.perf_counter()
            batch = {key: v.to(device) for key, v in batches[counter[0] % len(batches)].items()}
            counter[0] += 1
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                out = model(**batch)
            loss = out.loss.float()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            side.losses.append(loss.item())
            sync(device)
            times.append(time.perf_counter() - start)
        model.eval()
        return times

    side.run = run_steps
    return side


def free(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_mode(mode: str, model_name: str, folder: str, vocab: int, args: argparse.Namespace,
               workdir: Path) -> list[dict[str, Any]]:
    examples = synthetic_examples(args.batch * 4, args.seq, vocab, seed=1)
    sides = [fedtune_side(mode, model_name, args, examples, workdir), baseline_side(mode, folder, args, examples)]
    for s in sides:
        s.measure(args.warmup, keep=False)
    paired: list[float] = []  # fedtune / baseline seconds within one round: robust to drifting load
    rounds = math.ceil(args.steps / args.per_round)
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        k = min(args.per_round, args.steps - len(sides[0].times))
        for s in order:
            s.measure(k)
        paired.append(sum(sides[0].times[-k:]) / sum(sides[1].times[-k:]))
    tokens = args.batch * args.seq
    base_median = median(sides[1].times)
    rows = []
    for s in sides:
        med = median(s.times)
        row: dict[str, Any] = {
            "mode": mode, "impl": s.name, "steps": len(s.times), "s_per_step": med, "s_min": min(s.times),
            "s_max": max(s.times), "step_times": s.times, "tokens_per_s": tokens / med,
            "ratio_of_medians": med / base_median, "losses": s.losses,
            "ratio_vs_baseline": median(paired) if s.name == "fedtune" else 1.0, "paired_ratios": paired,
            "finite_losses": all(math.isfinite(v) for v in s.losses),
        }
        if s.device.type == "cuda":
            row["peak_gib"] = (s.static_bytes + s.peak_extra_bytes) / 2**30
        anchor_settings = args.device.startswith("cuda") and (args.batch, args.seq, args.rank) == (8, 1024, 16) \
            and args.gradient_checkpointing
        if anchor_settings and s.name == "peft baseline" and (args.shape, mode) in ANCHORS:
            row["anchor_tokens_per_s_h100"] = ANCHORS[(args.shape, mode)]
        rows.append(row)
    free(sides, examples)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", *SHAPES],
                    help="smollm2-135m (the built-in) or a random Llama with a Llama-3.2 configuration")
    ap.add_argument("--modes", default="nf4,bf16", help="comma list of nf4, bf16")
    ap.add_argument("--batch", type=int, help="examples per step (CPU 4, CUDA 8)")
    ap.add_argument("--seq", type=int, help="tokens per example (CPU 128, CUDA 1024)")
    ap.add_argument("--steps", type=int, help="measured steps per side (CPU 6, CUDA 10)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side before measuring")
    ap.add_argument("--per-round", type=int, help="steps of one side before switching to the other (CPU 1, CUDA 2)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="non-reentrant gradient checkpointing (default: on for CUDA, off for CPU)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: batch 2, seq 64, 2 steps, 1 warm-up")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/local_step[_quick].json)")
    args = ap.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = args.batch or 2, args.seq or 64, args.steps or 2, 1
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (1024 if cuda else 128)
    args.steps = args.steps or (10 if cuda else 6)
    args.per_round = args.per_round or (2 if cuda else 1)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = cuda
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in ("nf4", "bf16")]:
        ap.error(f"--modes: unknown {', '.join(bad)}; use nf4, bf16")

    from fedtune.cli import _quiet_libraries

    _quiet_libraries()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedtune-local-step-") as tmp:
        workdir = Path(tmp)
        if args.shape in SHAPES:
            folder = str(build_shape(args.shape, workdir / args.shape, torch.device(args.device)))
            model_name, vocab = folder, 256
        else:
            from fedtune.models import resolve

            model_name, folder = args.shape, resolve(args.shape).path
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(folder))
        for mode in modes:
            rows.extend(bench_mode(mode, model_name, folder, vocab, args, workdir))
    report(rows, args, time.perf_counter() - started)
    return 0


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    machine = machine_info(args.device)
    cuda = args.device.startswith("cuda")
    columns = ["mode", "impl", "s/step (median)", "min-max", "tokens/s", "fedtune/baseline (paired median)"]
    if cuda:
        columns.append("peak GiB")
    table_rows = []
    for r in rows:
        ratio = f"{r['ratio_vs_baseline']:.3f}" if r["impl"] == "fedtune" else ""
        row = [r["mode"], r["impl"], f"{r['s_per_step']:.3f}", f"{r['s_min']:.3f}-{r['s_max']:.3f}",
               f"{r['tokens_per_s']:,.0f}", ratio]
        if cuda:
            row.append(f"{r.get('peak_gib', float('nan')):.2f}")
        table_rows.append(row)
    title = (f"local step on {machine['device_name']}: {args.shape}, LoRA r={args.rank} all-linear, batch {args.batch}"
             f" x seq {args.seq}, {'gradient checkpointing' if args.gradient_checkpointing else 'no checkpointing'},"
             f" median of {args.steps} steps after {args.warmup} warm-up")
    print_table(title, columns, table_rows)
    for r in rows:
        if "anchor_tokens_per_s_h100" in r:
            print(f"{r['mode']}: baseline {r['tokens_per_s']:,.0f} tokens/s; DESIGN.md anchor on an H100 "
                  f"{r['anchor_tokens_per_s_h100']:,} tokens/s")
    print("target: fedtune/baseline <= 1.05; " + ", ".join(
        f"{r['mode']} {'ok' if r['ratio_vs_baseline'] <= 1.05 else 'SLOWER'}" for r in rows if r["impl"] == "fedtune"))
    payload = {
        "benchmark": "local_step", "quick": args.quick, "machine": machine,
        "settings": {"device": args.device, "shape": args.shape, "batch": args.batch, "seq": args.seq,
                     "steps": args.steps, "warmup": args.warmup, "per_round": args.per_round, "rank": args.rank,
                     "alpha": 2 * args.rank, "target_modules": "all-linear",
                     "gradient_checkpointing": args.gradient_checkpointing, "autocast": "bf16", "lr": LR},
        "rows": rows, "peak_rss_gib": peak_rss_bytes() / 2**30, "wall_s": seconds,
    }
    out = Path(args.out) if args.out else None
    if out is None:
        path = write_json("local_step_quick.json" if args.quick else "local_step.json", payload)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        import json

        out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        path = out
    print(f"wrote {path} ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
