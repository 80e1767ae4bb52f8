"""The one round driver: a federated run written out once, for the simulator, the gRPC server and what comes next.

``run_rounds`` reads top to bottom like a recipe:

    resume (or evaluate the starting point) -> for each round:
        sample (the round's seeded generator) -> for each phase the strategy declares:
            configure -> add the run's training instructions and each client's seed -> dispatch ->
            aggregate the replies as they stream in
        -> apply the result to the global model -> evaluate (every ``eval_every`` rounds and after the last)
        -> record (``metrics.jsonl``) -> checkpoint -> print the round's line
    -> save the adapter, write the plot.

Only the ``Dispatcher`` differs between callers (``fedtune.dispatch``). The sampling seed, the client seeds,
the evaluation schedule, the round record, resume and the checkpoint exist here and nowhere else; the run's
summary table is ``fedtune.report.print_summary``. The strategy is driven only through its protocol
(``fedtune.strategies.base.Strategy``): phases, capabilities and ``state_dict``, never its name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from fedtune.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint, save_checkpoint
from fedtune.client.fit import client_seed, with_training
from fedtune.compression.link import Link, dense_fp32_bytes
from fedtune.config import Config, TrainConfig, load_config, to_dict
from fedtune.dispatch import ClientOrder, Dispatcher, in_order, sampling_rng
from fedtune.report import RunProgress, round_line, write_plot
from fedtune.runs import RunDir, atomic_write_bytes
from fedtune.strategies.base import PhaseResult, RoundResult, Strategy
from fedtune.strategies.screen import ReplyPolicy, Screen, result_problem
from fedtune.types import ClientReply, Instructions, LowRankUpdate, State
from fedtune.untrusted import MAX_NAME, clean


class Model(Protocol):
    """The coordinator's model as the driver uses it (``fedtune.global_model.GlobalModel``)."""

    base_updates: list[dict[str, LowRankUpdate]]

    def initial_state(self) -> State: ...
    def restore(self, state: State, base_updates: list[dict[str, LowRankUpdate]]) -> None: ...
    def apply(self, global_state: State, result: RoundResult) -> State: ...
    def evaluate(self) -> dict[str, float]: ...
    def full_model_bytes(self) -> int: ...
    def save(self, run: RunDir, global_state: State) -> None: ...


@dataclass(frozen=True)
class RoundPlan:
    """What the driver needs from the run config, whichever section it came from (``sim.*``, ``federation.*``)."""

    rounds: int
    seed: int
    train: TrainConfig
    """The run's ``[train]``: every client's training instructions, with the strategy's on top."""
    eval_every: int = 1
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """Training instructions on top of the strategy's too (the centralized baseline's step count)."""
    policy: ReplyPolicy = ReplyPolicy()
    """What one reply may contribute (``federation.*``): every phase's replies pass its ``Screen``."""
    reorder_buffer: int = 64
    """Early replies held to aggregate in client order (``ClientOrder``; ``federation.reorder_buffer``)."""
    link: Link | None = None
    """Compression between the strategy and the dispatcher (``fedtune.compression.link``; ``make_link``)."""


@dataclass
class RunResult:
    """What a run ends with; ``rounds`` are the ``metrics.jsonl`` records, round 0 (the start) first."""

    rounds: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]
    run_dir: Path
    samples_before: list[str] = field(default_factory=list)
    samples_after: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def open_run(cfg: Config, *, resume: bool, may_change: tuple[str, ...]) -> tuple[RunDir, Checkpoint | None]:
    """The run folder ``cfg.out`` and, with ``resume``, the checkpoint to continue from.

    A resumed run's ``config.toml`` must equal ``cfg`` except for keys starting with one of ``may_change``
    (addresses, timeouts, more rounds: what does not alter what the run computes). A fresh run writes its
    config and starts a new ``metrics.jsonl``.

    Raises:
        ValueError: the folder holds a checkpoint of a run with another config (naming the keys).
        FileNotFoundError / CheckpointError: as ``load_checkpoint``.
    """
    run = RunDir(cfg.out)
    if not resume:
        run.write_config(cfg)
        run.metrics_path.unlink(missing_ok=True)
        return run, None
    if (run.path / "config.toml").is_file():
        old, new = _flat(to_dict(load_config(run.path / "config.toml"))), _flat(to_dict(cfg))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(may_change))
        if changed:
            raise ValueError(f"{run.path} holds a checkpoint of a run with another config ({', '.join(changed)} "
                             "differ): choose a new out=... or delete the folder to start over")
    return run, load_checkpoint(run.path)


def has_checkpoint(cfg: Config) -> bool:
    """Whether ``cfg.out`` holds a run to continue (a checkpoint and its config)."""
    path = Path(cfg.out)
    return (path / CHECKPOINT).is_file() and (path / "config.toml").is_file()


def _complete(instructions: dict[str, Instructions], plan: RoundPlan, rnd: int,
              dispatcher: Dispatcher) -> dict[str, Instructions]:
    """The strategy's instructions with the run's training instructions under its own and each client's seed."""
    out = {}
    for cid, ins in with_training(instructions, plan.train).items():
        seed = client_seed(plan.seed, rnd, dispatcher.client_index(cid))
        out[cid] = dataclasses.replace(ins, train={**ins.train, **plan.train_overrides}, extra={**ins.extra, "seed": seed})
    return out


def _counted(replies: Iterable[ClientReply], per_client: dict[str, dict[str, int]],
             bars: RunProgress, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
    """Pass the replies on, adding up each client's bytes (and their dense fp32 size), moving the progress bar."""
    for reply in replies:
        seen = per_client.setdefault(reply.client_id, {"bytes_down": 0, "bytes_up": 0, "dense_fp32_bytes": 0})
        seen["bytes_down"] += reply.bytes_down
        seen["bytes_up"] += reply.bytes_up
        if reply.client_id in instructions:
            seen["dense_fp32_bytes"] += dense_fp32_bytes(instructions[reply.client_id], reply)
        bars.client_done(reply.client_id, reply.error)
        yield reply


@dataclass
class _Played:
    """One round's exchanges: the result, every phase's failures, each client's bytes, how many were sampled,
    what the screens reported."""

    result: RoundResult
    failures: dict[str, str]
    per_client: dict[str, dict[str, int]]
    sampled: int
    screened: dict[str, Any] = field(default_factory=dict)


def _play(rnd: int, ids: list[str], global_state: State, plan: RoundPlan, strategy: Strategy,
          dispatcher: Dispatcher, bars: RunProgress) -> _Played:
    """The strategy's phases of round ``rnd``: configure -> dispatch -> aggregate each, in order, each phase
    handed the previous one's result; the round ends with the first ``RoundResult``."""
    rng = sampling_rng(plan.seed, rnd)
    played = _Played(RoundResult(state=global_state), {}, {}, 0)
    outcome: RoundResult | PhaseResult | None = None
    for phase in strategy.phases(rnd):
        previous = outcome if isinstance(outcome, PhaseResult) else None
        instructions = strategy.configure(rnd, ids, global_state, rng, phase=phase, previous=previous)
        instructions = _complete(instructions, plan, rnd, dispatcher)
        played.sampled = played.sampled or len(instructions)
        bars.start_round(rnd, len(instructions))
        wire = plan.link.down(rnd, instructions) if plan.link is not None else instructions
        replies: Iterable[ClientReply] = dispatcher.dispatch(rnd, phase, wire)
        if plan.link is not None:
            replies = plan.link.up(replies, instructions)
        replies = _counted(replies, played.per_client, bars, instructions)
        ordered = ClientOrder(list(instructions), plan.reorder_buffer)
        if strategy.needs_all_replies or plan.policy.holds_round:
            replies = in_order(replies, list(instructions))
        else:  # streamed, but summed in one fixed order: real, restarted and simulated runs agree bit for bit
            replies = ordered(replies)
        screen = Screen(plan.policy, global_state)
        outcome = strategy.aggregate(rnd, global_state, screen(replies), phase=phase)
        played.failures.update(outcome.failures)
        played.screened.update(screen.report)
        if ordered.out_of_order:
            played.screened["out_of_order"] = played.screened.get("out_of_order", 0) + ordered.out_of_order
        if isinstance(outcome, RoundResult):
            played.result = outcome
            return played
    raise TypeError(f"strategy {strategy.name!r} ended round {rnd} without a RoundResult "
                    f"(its last phase returned {type(outcome).__name__})")


@contextlib.contextmanager
def _save_on_interrupt(run: RunDir, model: Model, completed: dict[str, Any], console: Console) -> Iterator[None]:
    """On Ctrl-C, save the adapter of the last completed round (``completed``: its number and global state)
    before the interrupt goes on; the checkpoint of that round is already written."""
    try:
        yield
    except KeyboardInterrupt:
        if completed["round"] >= 1:
            model.save(run, completed["state"])
            console.print(f"interrupted: the adapter of round {completed['round']} is in {run.adapter_path}",
                          highlight=False)
        raise


def run_rounds(plan: RoundPlan, run: RunDir, model: Model, strategy: Strategy, dispatcher: Dispatcher,
               console: Console, *, resume: Checkpoint | None = None,
               samples_before: list[str] | None = None) -> RunResult:
    """Run rounds ``1..plan.rounds`` (after ``resume.round`` when resuming); see the module docstring.

    ``samples_before``: sample answers before training, kept in every checkpoint for the summary.

    Raises:
        TypeError: the strategy's last phase did not end the round with a ``RoundResult``.
        Whatever ``dispatcher.available`` raises to give up (too few clients).
    """
    rounds: list[dict[str, Any]] = []
    notes: list[str] = []
    if resume is not None:
        strategy.load_state_dict(resume.strategy)
        model.restore(resume.state, resume.base_updates)
        dispatcher.load_state_dict(resume.clients, resume.round)
        global_state, before, start = resume.state, resume.before, resume.round + 1
        samples_before = resume.samples_before
        rounds = [r for r in run.read_metrics() if r.get("round", 0) <= resume.round]
        run.rewrite_metrics(rounds)
        console.print(f"resuming {run.path} after round {resume.round}", highlight=False)
    else:
        global_state, before, start = model.initial_state(), model.evaluate(), 1
        first = {"round": 0, **before, "bytes_up": 0, "bytes_down": 0, "clients_ok": 0, "clients_failed": 0,
                 "seconds": 0.0}
        run.log(first)
        rounds.append(first)
    full_bytes = model.full_model_bytes()
    completed: dict[str, Any] = {"round": start - 1, "state": global_state}  # the last checkpointed round
    with _save_on_interrupt(run, model, completed, console), RunProgress(console, plan.rounds, start - 1) as bars:
        for rnd in range(start, plan.rounds + 1):
            stop = stop_reason(strategy, rnd)
            if stop is not None:  # a privacy budget: the run ends with what it has
                console.print(stop, highlight=False, markup=False)
                notes.append(stop)
                break
            kept = copy.deepcopy(strategy.state_dict())  # what a refused aggregate must not leave behind
            ids = dispatcher.available(rnd)
            t0 = time.perf_counter()  # the round's own time: waiting for clients to connect is not in it
            played = _play(rnd, ids, global_state, plan, strategy, dispatcher, bars)
            result = played.result
            refused = result_problem(result.state, result.base_update, plan.policy) if result.applied else None
            if refused is not None:  # the previous global model stays, and the strategy's state with it
                strategy.load_state_dict(kept)
                result = dataclasses.replace(result, state=global_state, base_update=None, reset_adapter=False,
                                             applied=False)
            global_state = model.apply(global_state, result)
            record: dict[str, Any] = {"round": rnd}
            if refused is not None:
                record["not_applied"] = refused
            if played.screened:
                record["screen"] = played.screened
            if rnd % plan.eval_every == 0 or rnd == plan.rounds:
                record.update(model.evaluate())
            sent = sum(c["bytes_up"] + c["bytes_down"] for c in played.per_client.values())
            dense = sum(c["dense_fp32_bytes"] for c in played.per_client.values())
            record.update({
                "agg_error": result.metrics.get("agg_error"), "applied": result.applied,
                "bytes_up": sum(c["bytes_up"] for c in played.per_client.values()),
                "bytes_down": sum(c["bytes_down"] for c in played.per_client.values()),
                "dense_fp32_bytes": dense, "compression_ratio": dense / sent if sent else None,
                "full_model_bytes": 2 * full_bytes * played.sampled,
                "clients_ok": len(result.clients_ok), "clients_failed": len(played.failures),
                **dispatcher.metrics(), "failures": played.failures, "clients": played.per_client,
                "seconds": time.perf_counter() - t0,
            })
            record.update({k: v for k, v in result.metrics.items() if k not in record})
            run.log(record, durable=True)  # then the checkpoint: a kill in between re-runs this round
            rounds.append(record)
            save_checkpoint(run.path, Checkpoint(
                round=rnd, state=global_state, strategy=strategy.state_dict(), base_updates=model.base_updates,
                before=before, samples_before=samples_before or [], clients=dispatcher.state_dict()))
            completed.update(round=rnd, state=global_state)
            console.print(round_line(record, plan.rounds), highlight=False)
            for cid, why in played.failures.items():
                console.print(f"  {clean(cid, MAX_NAME)}: {clean(why)}", highlight=False, markup=False)
            bars.end_round(record.get("eval_loss"))
    model.save(run, global_state)
    _write_privacy(run, rounds, notes)
    history = run.read_metrics()
    write_plot(history, run.path / "plot.png")
    last = rounds[-1] if rounds else {}
    after = {k: v for k, v in last.items() if k in ("eval_loss", "perplexity", "accuracy")} if rounds else before
    return RunResult(history, before, after, run.path, samples_before=samples_before or [], notes=notes)


def stop_reason(strategy: Strategy, rnd: int) -> str | None:
    """Why the run must end before round ``rnd``: a strategy's optional ``stop_before`` (a privacy budget that
    round would exceed; ``DPStrategy``), or None. Optional, so strategies that keep no budget need not say."""
    stop_before = getattr(strategy, "stop_before", None)
    return stop_before(rnd) if callable(stop_before) else None


def _write_privacy(run: RunDir, rounds: list[dict[str, Any]], notes: list[str]) -> None:
    """``privacy.json``: the privacy a DP run spent (its last round's epsilon at delta), for auditors."""
    spent = [r for r in rounds if "epsilon" in r]
    if not spent:
        return
    last = spent[-1]
    summary = {"epsilon": last["epsilon"], "delta": last.get("delta"), "rounds": last.get("dp_rounds"),
               "after_round": last["round"], "stopped": notes[-1] if notes else None}
    atomic_write_bytes(run.path / "privacy.json", (json.dumps(summary, indent=1) + "\n").encode())
