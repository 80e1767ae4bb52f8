"""The local training loop, written out plainly: what ``fedtune train`` runs and what every client runs.

No Trainer: a seeded shuffle, micro-batches with gradient accumulation, optional bf16 autocast, gradient
clipping, a warm-up + constant/cosine/linear schedule, and FedProx's proximal term
``mu/2 * ||w - w_ref||^2`` against a reference adapter state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.adapters import param_by_key
from fedtune.config import TrainConfig
from fedtune.data.tokenize import collate
from fedtune.loss import answer_loss
from fedtune.types import State

Example = dict[str, Any]


@dataclass
class TrainResult:
    """What local training reports: loss, tokens, seconds, tokens/s, and the optimizer state if kept."""

    metrics: dict[str, float]
    optimizer_state: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float) -> Any:
    """AdamW (torch), bitsandbytes 8-bit / paged 8-bit AdamW, or SGD."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer: {name!r} is not one of adamw, adamw8bit, paged_adamw8bit, sgd")


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warm-up, then constant, cosine or linear decay."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded reshuffles of ``examples`` in micro-batches (each epoch a new permutation)."""
    if not examples:
        raise ValueError("no training examples: check data.path, data.categories and data.eval_fraction")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [examples[j] for j in order[i : i + batch_size]]
            if len(chunk) < batch_size and len(examples) >= batch_size:
                break  # drop the ragged tail: equal-sized steps
            yield collate(chunk, pad_id)


def autocast_for(device: torch.device, dtype: torch.dtype, enabled: bool) -> Any:
    if not enabled or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def total_steps(tcfg: TrainConfig, num_examples: int) -> int:
    """``train.max_steps``, or the steps that ``train.epochs`` epochs take."""
    if tcfg.epochs is not None:
        per_epoch = max(1, num_examples // (tcfg.batch_size * tcfg.grad_accum))
        return max(1, math.ceil(tcfg.epochs * per_epoch))
    return tcfg.max_steps


def train_local(
    model: torch.nn.Module,
    examples: Sequence[Example],
    tcfg: TrainConfig,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    pad_id: int,
    seed: int,
    ref_state: State | None = None,
    optimizer_state: dict[str, Any] | None = None,
    keep_optimizer_state: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
    progress: Any = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``examples`` per ``tcfg`` (a ``TrainConfig``).

    A federation's per-round instructions arrive as ``tcfg`` itself (see ``client.fit``).
    ``ref_state`` is the adapter state the proximal term pulls towards (keys as ``adapters.get_state``).
    ``progress`` is a callable ``progress(step, total, loss)`` or None.

    Raises:
        ValueError: no examples, or a bad optimizer name.
    """
    torch.manual_seed(seed)
    named = trainable_parameters(model)
    params = [p for _, p in named]
    steps = total_steps(tcfg, len(examples))
    peak_lr = tcfg.lr
    mu = tcfg.prox_mu
    optimizer = make_optimizer(params, tcfg.optimizer, peak_lr, tcfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:
            group["lr"] = peak_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, steps))
    refs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if mu > 0 and ref_state is not None:
        by_key = param_by_key(model)
        refs = [(by_key[k], v.to(device=by_key[k].device, dtype=torch.float32)) for k, v in ref_state.items()
                if k in by_key]
    use_autocast = tcfg.bf16 and compute_dtype != torch.float32
    data = batches(examples, tcfg.batch_size, pad_id, seed)
    pin = device.type == "cuda"
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    upcoming = next(data)
    for step in range(steps):
        step_loss = torch.zeros((), device=device)
        for _ in range(tcfg.grad_accum):
            cpu_batch = upcoming
            tokens += int(cpu_batch["attention_mask"].sum())  # counted on the CPU: no device sync
            batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in cpu_batch.items()}
            with autocast_for(device, compute_dtype, use_autocast):
                loss = answer_loss(model, batch).float() / tcfg.grad_accum
            loss.backward()
            step_loss += loss.detach()
            upcoming = next(data)  # collate the next batch while the device works
        if refs:
            prox = sum(((p.float() - r) ** 2).sum() for p, r in refs) * (mu / 2)
            prox.backward()  # type: ignore[union-attr]
        if tcfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(step_loss)  # the one device sync of a step
        losses.append(value)
        if on_step is not None and (step + 1) % tcfg.log_every == 0:
            on_step({"step": step + 1, "loss": value, "lr": float(scheduler.get_last_lr()[0])})
        if progress is not None:
            progress(step + 1, steps, value)
    seconds = time.perf_counter() - start
    model.eval()
    metrics = {
        "loss": sum(losses) / len(losses) if losses else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "steps": float(steps),
        "tokens": float(tokens),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "num_examples": float(len(examples)),
    }
    opt_state = optimizer.state_dict() if keep_optimizer_state else None
    if opt_state is not None:
        opt_state = _to_cpu(opt_state)
    return TrainResult(metrics=metrics, optimizer_state=opt_state, losses=losses)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
