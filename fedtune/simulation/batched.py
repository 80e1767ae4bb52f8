"""Batched virtual clients: K clients' local training in one forward and backward pass per step.

``fit_batch`` is ``fedtune.client.fit.fit`` for K clients at once on one shared model: each client's global
state goes into a slot of a ``MultiLoRA``; each step concatenates the K clients' micro-batches, runs the base
model once, and the loss is the sum of the clients' own mean losses, so each slot's gradient is that client's
alone. Everything else is per slot, as ``fedtune.train.train_local`` does it for one client: the data order
(the client's seed), the optimizer and its state (``sim.keep_optimizer_state``), the learning-rate schedule
position, gradient clipping, the FedProx term against the client's own reference state, and the number of
steps. A client with fewer steps leaves the batch when it is done: its slot gets no more updates and its
optimizer moments stay as they were. The result equals K sequential ``fit`` calls up to float rounding (the
tests check 1e-5 in fp32).

Differences from the sequential path, by design: with ``adapter.dropout`` > 0 the dropout draws differ (one
random stream for the batch); ``fit_seconds`` is the client's share of the batch's time (by its tokens), which
the straggler simulation scales. Adapters that cannot be batched (DoRA, VeRA, a trained classifier head:
``multilora.unsupported``) and clients of another rank or ``train.bf16`` form a batch of their own, with the reason logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from fedtune.adapters import AdapterStateError
from fedtune.client.fit import fit
from fedtune.client.phases import (
    PHASES,
    ClientContext,
    finish_train,
    received,
    run_phase,
    train_phase,
    train_seed,
)
from fedtune.config import Config, ConfigError, TrainConfig, instructed_train
from fedtune.loss import segment_answer_losses
from fedtune.models import LoadedModel
from fedtune.models.loader import activate_rank
from fedtune.simulation.multilora import MultiLoRA, unsupported
from fedtune.train import (
    Example,
    TrainResult,
    _to_cpu,
    autocast_for,
    batches,
    lr_lambda,
    make_optimizer,
    total_steps,
)
from fedtune.types import ClientReply, Instructions

log = logging.getLogger(__name__)
T = TypeVar("T")
_logged: set[str] = set()


@dataclass
class Job:
    """One client's share of a batch: what ``fit`` takes for it."""

    examples: list[Example]
    ins: Instructions
    seed: int
    optimizer_state: dict[str, Any] | None = None


def _pad(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` right-padded to ``width`` tokens (pads after the text change no causal LM's outputs)."""
    extra = width - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fills.get(k, 0)) for k, v in batch.items()}


def train_batched(multi: MultiLoRA, examples: list[list[Example]], tcfgs: list[TrainConfig], seeds: list[int], *,
                  device: torch.device, compute_dtype: torch.dtype, pad_id: int,
                  refs: list[dict[str, torch.Tensor] | None] | None = None,
                  optimizer_states: list[dict[str, Any] | None] | None = None,
                  keep_optimizer_state: bool = False) -> list[TrainResult]:
    """Train slot k of ``multi`` on ``examples[k]`` per ``tcfgs[k]``, all slots in the same passes.

    ``tcfgs`` must agree on ``grad_accum`` handling per slot (each slot steps after its own accumulation),
    and on ``bf16``; ``refs[k]`` is slot k's FedProx reference (its global state) or None.

    Raises:
        ValueError: a client without examples, or a bad optimizer name.
    """
    k_all = len(examples)
    refs = refs or [None] * k_all
    optimizer_states = optimizer_states or [None] * k_all
    torch.manual_seed(seeds[0])  # dropout only: one stream for the batch
    params = [multi.slot_parameters(k) for k in range(k_all)]
    steps = [total_steps(t, len(ex)) for t, ex in zip(tcfgs, examples, strict=True)]
    optimizers, schedulers, prox = [], [], []
    for k, t in enumerate(tcfgs):
        opt = make_optimizer(params[k], t.optimizer, t.lr, t.weight_decay)
        if optimizer_states[k] is not None:
            opt.load_state_dict(optimizer_states[k])
            for group in opt.param_groups:
                group["lr"] = t.lr
        optimizers.append(opt)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, t.warmup_steps, steps[k])))
        ref = refs[k]
        prox.append([(multi.slot_tensor(k, key), v.to(device=device, dtype=torch.float32))
                     for key, v in ref.items() if key in multi.trainable_keys] if t.prox_mu > 0 and ref else [])
    use_autocast = tcfgs[0].bf16 and compute_dtype != torch.float32
    data = [batches(ex, t.batch_size, pad_id, s) for ex, t, s in zip(examples, tcfgs, seeds, strict=True)]
    losses: list[list[float]] = [[] for _ in range(k_all)]
    tokens = [0] * k_all
    start = time.perf_counter()
    multi.model.train()
    with multi.active():
        for step in range(max(steps)):
            stepping = [k for k in range(k_all) if step < steps[k]]  # finished clients leave the batch
            step_loss = {k: torch.zeros((), device=device) for k in stepping}
            for micro in range(max(tcfgs[k].grad_accum for k in stepping)):
                slots = [k for k in stepping if micro < tcfgs[k].grad_accum]
                cpu = [next(data[k]) for k in slots]
                for k, b in zip(slots, cpu, strict=True):
                    tokens[k] += int(b["attention_mask"].sum())
                width = max(b["input_ids"].shape[1] for b in cpu)
                padded = [_pad(b, width, pad_id) for b in cpu]
                batch = {key: torch.cat([b[key] for b in padded]).to(device) for key in padded[0]}
                rows = [b["input_ids"].shape[0] for b in cpu]
                multi.set_batch(slots, rows)
                with autocast_for(device, compute_dtype, use_autocast):
                    per_slot = segment_answer_losses(multi.model, batch, rows).float()
                scaled = per_slot / torch.tensor([float(tcfgs[k].grad_accum) for k in slots], device=device)
                scaled.sum().backward()
                for i, k in enumerate(slots):
                    step_loss[k] += scaled[i].detach()
            for k in stepping:
                t = tcfgs[k]
                if prox[k]:
                    term = sum(((p.float() - r) ** 2).sum() for p, r in prox[k]) * (t.prox_mu / 2)
                    term.backward()  # type: ignore[union-attr]
                if t.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params[k], t.max_grad_norm)
                optimizers[k].step()
                schedulers[k].step()
                optimizers[k].zero_grad(set_to_none=True)
                losses[k].append(float(step_loss[k]))
    seconds = time.perf_counter() - start
    multi.model.eval()
    results = []
    total_tokens = max(1, sum(tokens))
    for k in range(k_all):
        share = seconds * tokens[k] / total_tokens
        metrics = {
            "loss": sum(losses[k]) / len(losses[k]) if losses[k] else float("nan"),
            "final_loss": losses[k][-1] if losses[k] else float("nan"),
            "steps": float(steps[k]),
            "tokens": float(tokens[k]),
            "seconds": share,
            "tokens_per_s": tokens[k] / share if share > 0 else 0.0,
            "num_examples": float(len(examples[k])),
        }
        opt_state = _to_cpu(optimizers[k].state_dict()) if keep_optimizer_state else None
        results.append(TrainResult(metrics=metrics, optimizer_state=opt_state, losses=losses[k]))
    return results


def _once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("sim.batch_clients: %s; these clients train one after another", reason)


def _failed(ins: Instructions, error: str) -> tuple[ClientReply, None]:
    return ClientReply(ins.client_id, ins.round, None, 0, error=error), None


def _group_key(t: TrainConfig, ins: Instructions) -> tuple[Any, ...]:
    """Clients batch together when these agree (everything else may differ per slot)."""
    return (ins.rank, t.bf16)


def fit_batch(lm: LoadedModel, cfg: Config, jobs: list[Job], *, keep_optimizer_state: bool = False
              ) -> list[tuple[ClientReply, dict[str, Any] | None]]:
    """``fit`` for every job, batched where the adapter and settings allow; results in the jobs' order.

    Never raises for a client-side problem: a bad global state or bad training instructions fail that
    client's reply only; a training error of a batch (out of memory) retrains its clients one by one.
    """
    out: list[tuple[ClientReply, dict[str, Any] | None] | None] = [None] * len(jobs)
    groups: dict[tuple[Any, ...], list[tuple[int, TrainConfig]]] = {}
    for i, job in enumerate(jobs):
        try:
            tcfg = instructed_train(cfg.train, job.ins.train or {})
        except ConfigError as exc:
            out[i] = _failed(job.ins, "bad training instructions: " + "; ".join(exc.problems))
            continue
        groups.setdefault(_group_key(tcfg, job.ins), []).append((i, tcfg))
    if len(groups) > 1:
        _once("the sampled clients differ in rank or train.bf16; each kind is batched apart")
    for members in groups.values():
        for i, result in _fit_group(lm, cfg, jobs, members, keep_optimizer_state):
            out[i] = result
    return [r for r in out if r is not None]


def _fit_group(lm: LoadedModel, cfg: Config, jobs: list[Job], members: list[tuple[int, TrainConfig]],
               keep: bool) -> list[tuple[int, tuple[ClientReply, dict[str, Any] | None]]]:
    start = time.perf_counter()
    first = jobs[members[0][0]].ins
    activate_rank(lm.model, cfg, first.rank)
    reason = unsupported(lm.model)
    if reason is None and len(members) == 1:
        reason = "one client"
    if reason is not None:
        if reason != "one client":
            _once(reason)
        return [(i, _fit_one(lm, cfg, jobs[i], keep)) for i, _ in members]
    multi = MultiLoRA(lm.model, len(members))
    done: list[tuple[int, tuple[ClientReply, dict[str, Any] | None]]] = []
    slots: list[tuple[int, TrainConfig]] = []
    for i, tcfg in members:
        try:
            multi.set_slot_state(len(slots), jobs[i].ins.state)
        except AdapterStateError as exc:
            done.append((i, _failed(jobs[i].ins, f"cannot load the global adapter: {exc}")))
            continue
        slots.append((i, tcfg))
    if len(slots) < len(members):  # fewer slots than made: drop the unused ones
        multi.slots = multi.slots[: len(slots)]
        multi.k = len(slots)
    if not slots:
        return done
    picked = [jobs[i] for i, _ in slots]
    tcfgs = [t for _, t in slots]
    try:
        results = train_batched(
            multi, [j.examples for j in picked], tcfgs, [j.seed for j in picked], device=lm.device,
            compute_dtype=lm.compute_dtype, pad_id=lm.tokenizer.pad_token_id,
            refs=[j.ins.state if t.prox_mu else None for j, t in zip(picked, tcfgs, strict=True)],
            optimizer_states=[j.optimizer_state for j in picked], keep_optimizer_state=keep)
    except (RuntimeError, ValueError) as exc:
        _once(f"a batch of {len(slots)} failed ({str(exc)[:200]})")
        return done + [(i, _fit_one(lm, cfg, jobs[i], keep)) for i, _ in slots]
    setup = (time.perf_counter() - start) - sum(r.metrics["seconds"] for r in results)
    for k, ((i, _), job, result) in enumerate(zip(slots, picked, results, strict=True)):
        metrics = {f"train_{key}": v for key, v in result.metrics.items()}
        metrics["fit_seconds"] = result.metrics["seconds"] + setup / len(slots)
        reply = ClientReply(client_id=job.ins.client_id, round=job.ins.round, state=multi.get_slot_state(k),
                            num_examples=len(job.examples), metrics=metrics, rank=job.ins.rank)
        done.append((i, (reply, result.optimizer_state)))
    return done


def _fit_one(lm: LoadedModel, cfg: Config, job: Job, keep: bool) -> tuple[ClientReply, dict[str, Any] | None]:
    return fit(lm, job.examples, cfg, job.ins, seed=job.seed,
               optimizer_state=job.optimizer_state if keep else None, keep_optimizer_state=keep)


def batch_clients(cfg: Config) -> int:
    """``sim.batch_clients`` as a number.

    Raises:
        TypeError: it is still ``auto`` (``run_simulation`` resolves that before it makes a pool).
    """
    k = cfg.sim.batch_clients
    if not isinstance(k, int):
        raise TypeError("sim.batch_clients=auto must be resolved before clients are pooled "
                         "(by choose_batch_clients, as run_simulation does)")
    return k


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` in consecutive groups of ``size`` (the last one shorter): the batches of ``sim.batch_clients``."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(1, size))]


def answer(ctxs: list[ClientContext], inss: list[Instructions]) -> list[ClientReply]:
    """Replies to ``inss`` (one per context, same order): a batch of train phases is trained together
    (``fit_batch``), anything else (another phase, one client) goes through ``run_phase`` one by one."""
    batchable = len(inss) > 1 and PHASES.get("train") is train_phase and all(i.phase == "train" for i in inss)
    if not batchable:
        return [run_phase(ctx, ins) for ctx, ins in zip(ctxs, inss, strict=True)]
    replies: list[ClientReply | None] = [None] * len(inss)
    todo: list[tuple[int, ClientContext, Instructions]] = []
    for i, (ctx, ins) in enumerate(zip(ctxs, inss, strict=True)):
        got = received(ctx, ins)  # a compressed downlink: the state rebuilt from what this client holds
        if isinstance(got, ClientReply):
            replies[i] = got
        else:
            todo.append((i, ctx, got))
    keep = ctxs[0].keep_optimizer_state
    jobs = [Job(ctx.examples, ins, train_seed(ctx, ins), ctx.state.get("optimizer") if keep else None)
            for _, ctx, ins in todo]
    results = fit_batch(ctxs[0].lm, ctxs[0].cfg, jobs, keep_optimizer_state=keep) if jobs else []
    for (i, ctx, ins), (reply, opt) in zip(todo, results, strict=True):
        replies[i] = finish_train(ctx, ins, reply, opt)
    return [r for r in replies if r is not None]
