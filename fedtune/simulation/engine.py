"""The simulated federation: many virtual clients over ONE base model (in one process, or in ``sim.workers``
forked workers that share its pages: ``workers``).

setup -> for each round: configure -> fit each sampled client (swap adapter state in, train, read it out)
-> aggregate (streaming: replies are produced one at a time and consumed at once) -> evaluate ->
checkpoint -> summary. Memory grows by adapter-sized state per client (and optimizer state when clients
keep theirs), never by a base model per client: FlowerTune's simulation rebuilds the model per client call.

Every random choice is derived from (seed, round, client), so a run resumed from its last checkpoint ends
with the same adapter as an uninterrupted run of the same seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console

from fedtune.adapters import get_state, set_state
from fedtune.client.fit import client_seed, fit, with_training
from fedtune.config import Config
from fedtune.data.partition import make_partition, render_partition_table
from fedtune.eval import evaluate, generate_answers
from fedtune.models import LoadedModel, apply_base_update, load_model
from fedtune.models.base_update import apply_round_result
from fedtune.pipeline import encode, load_dataset
from fedtune.runs import RunDir
from fedtune.simulation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.simulation.faults import inject
from fedtune.simulation.report import RunProgress, print_summary, write_plot
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.transport.messages import instructions_wire_size, reply_wire_size
from fedtune.types import ClientReply, Instructions, failed_reply

log = logging.getLogger(__name__)


@dataclass
class VirtualClient:
    cid: str
    index: int
    records: list[dict[str, Any]]
    examples: list[dict[str, Any]]


class ClientPool(Protocol):
    """Runs the sampled clients' local work of one round; replies come back in the order asked."""

    def fit_round(self, rnd: int, items: list[tuple[str, Instructions]]) -> Iterator[ClientReply]: ...

    def close(self) -> None: ...


class OptimizerStore:
    """Per-client optimizer states kept across rounds: in CPU memory, or spilled to the run folder.

    On disk each state is written per round (``optimizer/<client>.r<round>.pt``), so a resumed run reads
    the state as of its checkpoint even if the killed run had gone further.
    """

    def __init__(self, where: str, folder: Path, upto_round: int | None = None):
        self.where, self.folder, self.memory = where, folder / "optimizer", {}
        self.upto = upto_round

    def get(self, cid: str) -> dict[str, Any] | None:
        if self.where == "cpu":
            return self.memory.get(cid)
        files = sorted(self.folder.glob(f"{cid}.r*.pt"), key=lambda p: int(p.stem.rsplit(".r", 1)[1]))
        files = [f for f in files if self.upto is None or int(f.stem.rsplit(".r", 1)[1]) <= self.upto]
        return torch.load(files[-1], weights_only=False) if files else None

    def put(self, cid: str, rnd: int, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if self.where == "cpu":
            self.memory[cid] = state
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.folder / f"{cid}.r{rnd}.pt")
        for old in self.folder.glob(f"{cid}.r*.pt"):
            if int(old.stem.rsplit(".r", 1)[1]) < rnd:
                old.unlink()
        self.upto = None


class InProcPool:
    """Every virtual client trains in this process on the one shared model, one after the other."""

    def __init__(self, cfg: Config, lm: LoadedModel, clients: list[VirtualClient], store: OptimizerStore):
        self.cfg, self.lm, self.clients, self.store = cfg, lm, {c.cid: c for c in clients}, store

    def fit_round(self, rnd: int, items: list[tuple[str, Instructions]]) -> Iterator[ClientReply]:
        keep = self.cfg.sim.keep_optimizer_state
        for cid, ins in items:  # lazily: the strategy consumes each reply before the next client trains
            client = self.clients[cid]
            reply, opt_state = fit(
                self.lm, client.examples, self.cfg, ins, seed=client_seed(self.cfg.seed, rnd, client.index),
                optimizer_state=self.store.get(cid) if keep else None, keep_optimizer_state=keep)
            self.store.put(cid, rnd, opt_state)
            yield reply

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""


def make_pool(cfg: Config, lm: LoadedModel, clients: list[VirtualClient], store: OptimizerStore,
              base_updates: list[dict[str, Any]]) -> ClientPool:
    """The pool of ``cfg.sim.backend`` (and ``cfg.sim.workers``); ``base_updates`` is the log
    ``apply_round_result`` appends to."""
    if cfg.sim.backend == "flower":
        from fedtune.simulation.flower_backend import FlowerPool

        return FlowerPool(cfg, clients, store=store, base_updates=base_updates)
    workers = min(cfg.sim.workers, clients_per_round(cfg), len(clients))
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        log.warning("sim.workers=%d needs fork() (Linux); the clients train in this process", workers)
    elif workers > 1:
        from fedtune.simulation.workers import WorkerPool

        return WorkerPool(cfg, lm, clients, store, base_updates, workers)
    return InProcPool(cfg, lm, clients, store)


@dataclass
class SimResult:
    rounds: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]
    samples_before: list[str] = field(default_factory=list)
    samples_after: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    run_dir: Path = Path(".")


def strategy_config(cfg: Config, quantized: bool) -> StrategyConfig:
    """The strategy section completed with what the rest of the config already says."""
    s = cfg.strategy
    per_round = cfg.sim.clients_per_round
    return dataclasses.replace(
        s, lora_alpha=cfg.adapter.alpha, r=cfg.adapter.r, use_rslora=cfg.adapter.method == "rslora",
        quantized_base=quantized,
        clients_per_round=int(per_round) if per_round >= 1 else 0,
        fraction=per_round if 0 < per_round < 1 else 1.0 if per_round == 0 else s.fraction)


def clients_per_round(cfg: Config) -> int:
    """How many clients a federated round of ``cfg`` samples (what the centralized baseline must match)."""
    n, k = cfg.sim.num_clients, cfg.sim.clients_per_round
    if k == 0:
        return n
    return max(1, round(k * n)) if k < 1 else int(k)


def partition_clients(cfg: Config, records: list[dict[str, Any]]) -> list[list[int]]:
    sim = cfg.sim
    name = {"category": "by_category", "dirichlet": "dirichlet", "iid": "iid", "size_skew": "size_skew"}[sim.partitioner]
    opts: dict[str, Any] = {}
    if name == "by_category":
        opts["categories_per_client"] = sim.categories_per_client
    elif name == "dirichlet":
        opts["alpha"] = sim.dirichlet_alpha
    elif name == "size_skew":
        opts["sigma"] = sim.size_skew
    if name in ("by_category", "dirichlet") and not any(r.get("category") for r in records):
        raise ValueError(f"sim.partitioner={sim.partitioner} needs a category per record (data.category_field)")
    return make_partition(name, records, sim.num_clients, cfg.seed, **opts)


def full_model_bytes(lm: LoadedModel) -> int:
    """What full-model FedAvg would send per client per direction (every base weight, fp32)."""
    seen: set[int] = set()
    total = 0
    for p in lm.model.base_model.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4 if not hasattr(p, "quant_state") else p.numel() * 2 * 4
    return total


def run_simulation(cfg: Config, console: Console, resume: Path | None = None) -> SimResult:
    """Run the simulated federation described by ``cfg`` (or resume the run folder ``resume``)."""
    run = RunDir(resume or cfg.out)
    ckpt = load_checkpoint(run.path) if resume else None
    if not resume:
        run.write_config(cfg)
        run.metrics_path.unlink(missing_ok=True)
    data = load_dataset(cfg)
    lm = load_model(cfg, num_labels=len(data.label_names) or None)
    tok = lm.tokenizer
    mode = cfg.sim.mode
    parts = [list(range(len(data.train_records)))] if mode == "centralized" else partition_clients(cfg, data.train_records)
    labels = [r.get("category") or "-" for r in data.train_records]
    Console(width=max(console.width, 220), file=console.file).print(
        render_partition_table(parts, labels, title="clients x categories"))
    clients = [VirtualClient(f"client-{i}", i, [data.train_records[j] for j in p],
                             encode([data.train_records[j] for j in p], tok, cfg)) for i, p in enumerate(parts)]
    eval_ex = encode(data.eval_records, tok, cfg, for_training=False)
    eval_kw = {"device": lm.device, "pad_id": tok.pad_token_id, "batch_size": cfg.eval.batch_size,
               "max_batches": cfg.eval.max_batches, "compute_dtype": lm.compute_dtype}
    prompts = [r["prompt"] for r in data.eval_records if "prompt" in r][: cfg.eval.samples]
    gen = cfg.model.task == "causal_lm" and bool(prompts)

    def answers() -> list[str]:
        return generate_answers(lm.model, tok, prompts, device=lm.device, max_new_tokens=cfg.eval.max_new_tokens,
                                system_prompt=cfg.data.system_prompt) if gen else []

    # ffa's frozen A is part of the global state (the strategy needs it for the aggregation error) but is
    # never sent: configure() gives clients only B.
    initial = get_state(lm.model, trainable_only=cfg.strategy.name != "ffa")
    if mode == "local-only":
        return _local_only(cfg, console, run, lm, clients, initial, eval_ex, eval_kw, prompts, answers)
    strategy = make_strategy(cfg.strategy.name, strategy_config(cfg, lm.quantized))
    store = OptimizerStore(cfg.sim.optimizer_state_on, run.path)
    global_state = initial
    before = evaluate(lm.model, eval_ex, **eval_kw)
    samples_before = answers()
    rounds: list[dict[str, Any]] = []
    start_round = 1
    base_updates: list[dict[str, Any]] = []
    if ckpt is not None:
        strategy, global_state, base_updates, before, samples_before = (ckpt.strategy, ckpt.state, ckpt.base_updates,
                                                                         ckpt.before, ckpt.samples_before)
        for upd in base_updates:
            apply_base_update(lm.model, upd, lm.quantized)
        store.memory.update(ckpt.optimizer_states)
        store.upto = ckpt.round
        rounds = run.read_metrics()
        rounds = [r for r in rounds if r.get("round", 0) <= ckpt.round]
        run.rewrite_metrics(rounds)
        start_round = ckpt.round + 1
        console.print(f"resuming {run.path} after round {ckpt.round}")
    else:
        run.log({"round": 0, **before, "bytes_up": 0, "bytes_down": 0, "clients_ok": 0, "clients_failed": 0,
                 "seconds": 0.0})
    total_rounds = 1 if mode == "centralized" and cfg.sim.rounds < 1 else cfg.sim.rounds
    full_bytes = full_model_bytes(lm)
    centralized_steps = cfg.train.max_steps * clients_per_round(cfg)
    with contextlib.closing(make_pool(cfg, lm, clients, store, base_updates)) as pool, \
            RunProgress(console, total_rounds, start_round - 1) as bars:
        for rnd in range(start_round, total_rounds + 1):
            t0 = time.perf_counter()
            rng = random.Random(cfg.seed * 7919 + rnd)
            ids = [c.cid for c in clients]
            instructions = with_training(strategy.configure(rnd, ids, global_state, rng), cfg.train)
            if mode == "centralized":  # one client with all the data takes every federated client's steps
                instructions = {cid: dataclasses.replace(ins, train={**ins.train, "max_steps": centralized_steps,
                                                                       "epochs": None})
                                for cid, ins in instructions.items()}
            traffic = {"up": 0, "down": 0}

            faults = {cid: inject(cfg.sim, rng) for cid in instructions}
            per_client: dict[str, dict[str, int]] = {}
            for cid, ins in instructions.items():
                per_client[cid] = {"bytes_down": instructions_wire_size(ins), "bytes_up": 0}
                traffic["down"] += per_client[cid]["bytes_down"]
            dispatched = [(cid, ins) for cid, ins in instructions.items() if faults[cid] != "dropout"]
            bars.start_round(rnd, len(instructions))

            def replies(instructions=instructions, rnd=rnd, faults=faults, dispatched=dispatched, traffic=traffic,
                        per_client=per_client):
                fitted = pool.fit_round(rnd, dispatched)
                for cid in instructions:
                    if faults[cid] == "dropout":
                        bars.client_done(cid, "dropout")
                        yield failed_reply(cid, rnd, "dropped out (sim.dropout)")
                        continue
                    reply = next(fitted)
                    bars.client_done(cid, reply.error)
                    fault = faults[cid]
                    slowed = reply.metrics.get("fit_seconds", 0.0) * cfg.sim.straggler_slowdown
                    deadline = cfg.sim.round_deadline_s
                    if fault == "straggler" and deadline is not None and slowed > deadline:
                        yield failed_reply(cid, rnd, f"straggler: {slowed:.1f} s ({cfg.sim.straggler_slowdown}x slower) "
                                           f"is past the round deadline of {deadline} s")
                        continue
                    if fault in ("nan", "scale") and reply.state is not None:
                        reply = _corrupt(reply, fault, cfg.sim.corrupt_scale)
                    reply.bytes_up = reply_wire_size(reply)
                    traffic["up"] += reply.bytes_up
                    per_client[cid]["bytes_up"] = reply.bytes_up
                    yield reply

            result = strategy.aggregate(rnd, global_state, replies())
            global_state = apply_round_result(lm, cfg, global_state, result, base_updates)
            record: dict[str, Any] = {"round": rnd}
            if rnd % cfg.sim.eval_every == 0 or rnd == total_rounds:
                record.update(evaluate(lm.model, eval_ex, **eval_kw))
            record.update({
                "agg_error": result.metrics.get("agg_error"), "applied": result.applied,
                "bytes_up": traffic["up"], "bytes_down": traffic["down"],
                "full_model_bytes": 2 * full_bytes * len(instructions),
                "clients_ok": len(result.clients_ok), "clients_failed": len(result.clients_failed),
                "failures": result.failures, "clients": per_client, "seconds": time.perf_counter() - t0,
            })
            record.update({k: v for k, v in result.metrics.items() if k not in record and k not in ("clients_ok",
                                                                                                  "clients_failed")})
            run.log(record, durable=True)
            rounds.append(record)
            loss, err = record.get("eval_loss"), record["agg_error"]
            console.print(f"round {rnd}/{total_rounds}: eval_loss={'-' if loss is None else f'{loss:.4f}'} "
                          f"ok={record['clients_ok']} failed={record['clients_failed']} "
                          f"agg_error={'-' if err is None else f'{err:.2e}'} "
                          f"up={traffic['up'] / 2**20:.2f} MiB down={traffic['down'] / 2**20:.2f} MiB "
                          f"{record['seconds']:.1f} s")
            save_checkpoint(run.path, Checkpoint(round=rnd, state=global_state, strategy=strategy,
                                                 base_updates=base_updates, before=before,
                                                 samples_before=samples_before,
                                                 optimizer_states=store.memory))
            bars.end_round(loss)
    set_state(lm.model, global_state)
    after = {k: v for k, v in rounds[-1].items() if k in ("eval_loss", "perplexity", "accuracy")} if rounds else before
    samples_after = answers()
    run.save_adapter(lm.model)
    history = run.read_metrics()
    write_plot(history, run.path / "plot.png")
    result_obj = SimResult(history, before, after, samples_before, samples_after, prompts, run.path)
    print_summary(console, cfg, result_obj)
    return result_obj


def _corrupt(reply: ClientReply, kind: str, scale: float) -> ClientReply:
    assert reply.state is not None
    if kind == "nan":
        state = {k: v.clone().fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(reply.state.items())}
    else:
        state = {k: v * scale for k, v in reply.state.items()}
    return dataclasses.replace(reply, state=state, metrics={**reply.metrics, "corrupted": 1.0})


def _local_only(cfg, console, run, lm, clients, initial, eval_ex, eval_kw, prompts, answers) -> SimResult:
    """Baseline: each client trains alone for all rounds' steps; all are evaluated on the global held-out set."""
    from fedtune.types import Instructions

    before = evaluate(lm.model, eval_ex, **eval_kw)
    samples_before = answers()
    run.log({"round": 0, **before})
    steps = cfg.train.max_steps * cfg.sim.rounds
    per_client = []
    for c in clients:
        ins = Instructions(round=1, client_id=c.cid, state=initial, train={"max_steps": steps, "epochs": None})
        fit(lm, c.examples, cfg, ins, seed=client_seed(cfg.seed, 1, c.index))
        metrics = evaluate(lm.model, eval_ex, **eval_kw)
        per_client.append(metrics)
        run.log({"client": c.cid, "steps": steps, **metrics})
        console.print(f"{c.cid}: eval_loss={metrics.get('eval_loss', float('nan')):.4f}")
    mean = {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}
    run.log({"round": cfg.sim.rounds, "local_only_mean": True, **mean})
    set_state(lm.model, initial)
    result = SimResult(run.read_metrics(), before, mean, samples_before, [], prompts, run.path)
    print_summary(console, cfg, result)
    return result
