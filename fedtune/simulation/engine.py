"""``fedtune simulate``: many virtual clients over ONE base model, run by the round driver.

setup (data, one model, the clients' partitions) -> the round driver (``fedtune.rounds``) with the
simulator's dispatcher (``dispatch.SimDispatcher``: a pool of virtual clients in this process, in
``sim.workers`` forked workers sharing the model's pages, or on Flower's Ray actors; faults; bytes counted from
the encoded messages) -> sample answers -> summary. Memory grows by adapter-sized state per client (and kept
optimizer or pipeline state), never by a base model per client: FlowerTune's simulation rebuilds the model per
client call.

Every random choice is derived from (seed, round, client), so a run resumed from its last checkpoint ends
with the same adapter as an uninterrupted run of the same seed. ``sim.mode`` picks the federated run or a
baseline: ``centralized`` (one client with all the data and every sampled client's steps) goes through the
same driver; ``local-only`` (each client alone) is no federation and has its own short loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.adapters import set_state
from fedtune.client.fit import client_seed, fit
from fedtune.compression.link import make_link
from fedtune.compression.mask import with_mask
from fedtune.config import Config
from fedtune.data.partition import partition_clients, render_partition_table
from fedtune.dispatch import Dispatcher
from fedtune.eval import generate_answers
from fedtune.global_model import GlobalModel
from fedtune.models import load_model
from fedtune.pipeline import encode, load_dataset
from fedtune.privacy.wrap import with_privacy
from fedtune.report import print_summary
from fedtune.rounds import Model, RoundPlan, RunResult, open_run, run_rounds
from fedtune.runs import RunDir
from fedtune.simulation.dispatch import SimDispatcher
from fedtune.simulation.pools import VirtualClient, clients_per_round, make_pool
from fedtune.simulation.store import ClientStore
from fedtune.strategies import Strategy, make_strategy, spec_of, strategy_config
from fedtune.strategies.screen import ReplyPolicy
from fedtune.types import Instructions

# Keys a resumed simulation may change: more rounds, evaluation, where and how clients run.
RESUMABLE_CHANGES = ("out", "eval.", "sim.rounds", "sim.eval_every", "sim.workers", "sim.batch_clients", "sim.backend",
                     "sim.ray_address", "server.", "federation.rounds", "federation.min_clients",
                     "federation.clients_per_round", "federation.round_timeout_s", "federation.wait_timeout_s",
                     "federation.max_update_mb", "federation.heartbeat_s", "federation.silence_s",
                     "federation.eval_every", "federation.reorder_buffer")  # other federation.* keys bound replies


def run_simulation(cfg: Config, console: Console, resume: Path | None = None) -> RunResult:
    """Run the simulated federation described by ``cfg`` (or resume the run folder ``resume``).

    Raises:
        ValueError: a config the run cannot use (partitioner without categories, a resumed folder of another
            run), or a checkpoint that cannot be loaded (``CheckpointError``).
    """
    if resume is not None:
        cfg = dataclasses.replace(cfg, out=str(resume))
    run, ckpt = open_run(cfg, resume=resume is not None, may_change=RESUMABLE_CHANGES)
    data = load_dataset(cfg)
    if cfg.sim.batch_clients == "auto":  # before the model loads: free memory still has room for its weights
        cfg = _auto_batch_clients(cfg, len(data.label_names) or None, console)
    lm = load_model(cfg, num_labels=len(data.label_names) or None)
    tok = lm.tokenizer
    mode = cfg.sim.mode
    parts = [list(range(len(data.train_records)))] if mode == "centralized" else partition_clients(cfg, data.train_records)
    labels = [r.get("category") or "-" for r in data.train_records]
    console.print(render_partition_table(parts, labels, title="clients x categories"))
    clients = [VirtualClient(f"client-{i}", i, [data.train_records[j] for j in p],
                             encode([data.train_records[j] for j in p], tok, cfg)) for i, p in enumerate(parts)]
    spec = spec_of(cfg.strategy.name)
    model = GlobalModel(cfg, lm, encode(data.eval_records, tok, cfg, for_training=False),
                        frozen_in_state=spec.frozen_in_state)
    prompts = [r["prompt"] for r in data.eval_records if "prompt" in r][: cfg.eval.samples]
    gen = cfg.model.task == "causal_lm" and bool(prompts)

    def answers() -> list[str]:
        return generate_answers(lm.model, tok, prompts, device=lm.device, max_new_tokens=cfg.eval.max_new_tokens,
                                system_prompt=cfg.data.system_prompt) if gen else []

    if mode == "local-only":
        return _local_only(cfg, console, run, model, clients, prompts, answers)
    overrides: dict[str, Any] = {}
    driven: Model = model
    if mode == "centralized":  # one client with all the data takes every federated client's steps
        overrides = {"max_steps": cfg.train.max_steps * clients_per_round(cfg), "epochs": None}
    if mode == "gossip":
        from fedtune.gossip.sim import GossipDispatcher, gossip_setup

        nodes, driven = gossip_setup(cfg, model, [c.cid for c in clients])
        strategy: Strategy = nodes
        overrides = {"max_steps": cfg.gossip.local_steps, "epochs": None} if cfg.gossip.local_steps else {}
        what = f"gossip {cfg.gossip.topology}/{cfg.gossip.mix}"
    else:
        strategy = with_privacy(with_mask(make_strategy(
            cfg.strategy.name, strategy_config(cfg, lm.quantized, cfg.sim.clients_per_round)), cfg), cfg)
        what = f"strategy={cfg.strategy.name}"
        if cfg.privacy.secagg:
            from fedtune.privacy.secagg_strategy import tolerance_note

            n = clients_per_round(cfg)
            expected = max(1, round(cfg.privacy.sample_rate * n)) if cfg.privacy.dp != "off" else n
            console.print(tolerance_note(expected, cfg.privacy), markup=False, highlight=False)
    samples_before = ckpt.samples_before if ckpt is not None else answers()
    plan = RoundPlan(rounds=cfg.sim.rounds, seed=cfg.seed, train=cfg.train, eval_every=cfg.sim.eval_every,
                     policy=ReplyPolicy.from_config(cfg.federation), reorder_buffer=cfg.federation.reorder_buffer,
                     train_overrides=overrides, link=make_link(cfg))
    store = ClientStore(cfg.sim.optimizer_state_on, run.path)
    pool = make_pool(cfg, lm, clients, store, model.base_updates)
    dispatcher: Dispatcher = SimDispatcher(cfg, clients, pool, store)
    if mode == "gossip":
        dispatcher = GossipDispatcher(dispatcher, nodes, cfg.gossip.departures())
    with contextlib.closing(dispatcher):
        result = run_rounds(plan, run, driven, strategy, dispatcher, console, resume=ckpt,
                            samples_before=samples_before)
    result.samples_after, result.prompts = answers(), prompts
    print_summary(console, f"fedtune simulate: {mode}, {what}, {cfg.sim.num_clients} clients, "
                           f"{cfg.sim.rounds} rounds", result)
    return result


def _auto_batch_clients(cfg: Config, num_labels: int | None, console: Console) -> Config:
    """``cfg`` with ``sim.batch_clients=auto`` replaced by the number ``fedtune info`` would choose."""
    from fedtune.info import available_bytes, choose_batch_clients, estimate

    free, where = available_bytes(cfg.model.device)
    k, why = choose_batch_clients(cfg, estimate(cfg, num_labels), free, where)
    console.print(f"sim.batch_clients=auto: {k} ({why})", markup=False)
    return dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, batch_clients=k))


def _local_only(cfg: Config, console: Console, run: RunDir, model: GlobalModel, clients: list[VirtualClient],
                prompts: list[str], answers: Any) -> RunResult:
    """Baseline: each client trains alone for all rounds' steps; all are evaluated on the global held-out set."""
    initial = model.initial_state()
    before = model.evaluate()
    samples_before = answers()
    run.log({"round": 0, **before})
    steps = cfg.train.max_steps * cfg.sim.rounds
    per_client = []
    for c in clients:
        ins = Instructions(round=1, client_id=c.cid, state=initial, train={"max_steps": steps, "epochs": None})
        fit(model.lm, c.examples, cfg, ins, seed=client_seed(cfg.seed, 1, c.index))
        metrics = model.evaluate()
        per_client.append(metrics)
        run.log({"client": c.cid, "steps": steps, **metrics})
        console.print(f"{c.cid}: eval_loss={metrics.get('eval_loss', float('nan')):.4f}")
    mean = {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}
    run.log({"round": cfg.sim.rounds, "local_only_mean": True, **mean})
    set_state(model.lm.model, initial)
    result = RunResult(run.read_metrics(), before, mean, run.path, samples_before, [], prompts)
    print_summary(console, f"fedtune simulate: local-only, {cfg.sim.num_clients} clients", result)
    return result
