"""``fedtune server``: the coordinator's round loop over gRPC, written out top to bottom.

setup (run folder, model + held-out data, strategy, gRPC server) -> wait for ``federation.min_clients``
-> for each round: configure -> hand out instructions -> stream replies into ``strategy.aggregate`` until
the deadline -> apply -> evaluate -> checkpoint -> log; then tell the nodes to stop and print a summary.

It writes the same run folder as ``fedtune simulate`` (``config.toml``, ``metrics.jsonl``, ``adapter/``,
``plot.png``, ``checkpoint.pt``) and makes the same random choices: round ``r`` samples clients with
``random.Random(seed * 7919 + r)`` over the live clients in natural name order, and client ``c`` trains
with ``client_seed(seed, r, index(c))`` where ``index`` is the position of ``c`` among every node that registered
since the server started, in natural order (``client-0``, ``client-1``, ... ``client-10``, as the simulator
numbers its virtual clients). So a federation of nodes named and partitioned like the
simulator's virtual clients ends with the simulator's adapter, and a server killed and restarted on the
same ``out`` resumes from its last checkpoint and ends where an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.adapters import get_state, set_state
from fedtune.client.fit import client_seed, with_training
from fedtune.config import Config, fingerprint, to_dict
from fedtune.eval import evaluate
from fedtune.models import apply_base_update, load_model
from fedtune.models.base_update import apply_round_result
from fedtune.pipeline import encode, load_dataset
from fedtune.runs import RunDir
from fedtune.server.coordinator import RoundCoordinator
from fedtune.server.report import print_server_summary
from fedtune.simulation.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint, save_checkpoint
from fedtune.simulation.engine import strategy_config
from fedtune.simulation.report import write_plot
from fedtune.strategies import StrategyConfig, make_strategy
from fedtune.transport import FederationServer, Limits, instructions_wire_size, start_server
from fedtune.types import ClientReply, Instructions

STOP_GRACE_S = 10.0
# Keys whose change does not alter what a resumed run computes (addresses, timeouts, more rounds).
RESUMABLE_CHANGES = ("server.", "client.", "federation.rounds", "federation.wait_timeout_s",
                     "federation.round_timeout_s", "federation.max_update_mb", "federation.heartbeat_s",
                     "federation.silence_s", "out", "eval.", "sim.")


class FederationError(RuntimeError):
    """The federation cannot go on (too few clients within ``federation.wait_timeout_s``)."""


@dataclass
class ServerResult:
    rounds: list[dict[str, Any]]
    run_dir: Path
    port: int
    refused: list[str] = field(default_factory=list)


def federation_strategy_config(cfg: Config, quantized: bool) -> StrategyConfig:
    """``strategy_config`` of the simulator with the federation's sampling (``federation.clients_per_round``).

    A round is applied when at least ``strategy.min_replies`` valid replies came in, as in the simulator;
    ``federation.min_clients`` is how many live nodes a round waits for before it starts.
    """
    sim_like = dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, clients_per_round=cfg.federation.clients_per_round))
    return strategy_config(sim_like, quantized)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _resume_point(run: RunDir, cfg: Config) -> Checkpoint | None:
    """The checkpoint to resume from, when ``cfg.out`` holds one of a compatible run.

    Raises:
        ValueError: the folder holds a checkpoint of a run with another config (naming the keys).
    """
    if not (run.path / CHECKPOINT).is_file() or not (run.path / "config.toml").is_file():
        return None
    from fedtune.config import load_config

    old = _flat(to_dict(load_config(run.path / "config.toml")))
    new = _flat(to_dict(cfg))
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        raise ValueError(f"{run.path} holds a checkpoint of a run with another config ({', '.join(changed)} "
                         "differ): choose a new out=... or delete the folder to start over")
    return load_checkpoint(run.path)


def _replies(coord: RoundCoordinator, per_client: dict[str, dict[str, int]], order: list[str],
             hold_all: bool) -> Iterator[ClientReply]:
    """The round's replies for ``strategy.aggregate``, counting bytes up per client.

    Streaming strategies get them in arrival order; one that holds every reply anyway gets them in client
    order, as the simulator produces them (robust aggregators can depend on the order).
    """
    stream: Iterable[ClientReply] = coord.replies()
    if hold_all:
        stream = sorted(stream, key=lambda r: order.index(r.client_id) if r.client_id in order else len(order))
    for reply in stream:
        per_client.setdefault(reply.client_id, {"bytes_down": 0, "bytes_up": 0})["bytes_up"] = reply.bytes_up
        yield reply


def _tls(cfg: Config) -> dict[str, Any]:
    """``start_server`` security arguments: TLS + allow-list from ``server.keys_dir`` unless insecure."""
    if cfg.server.keys_dir is None:
        return {"insecure": cfg.server.insecure}
    keys = Path(cfg.server.keys_dir)
    missing = [f for f in ("server.pem", "server.key", "allowlist.txt") if not (keys / f).is_file()]
    if missing:
        raise FileNotFoundError(f"server.keys_dir={keys}: missing {', '.join(missing)} "
                                "(create them with `fedtune keys DIR --nodes a,b,c`)")
    args: dict[str, Any] = {"allowlist_file": keys / "allowlist.txt", "insecure": cfg.server.insecure}
    if not cfg.server.insecure:
        args.update(cert_file=keys / "server.pem", key_file=keys / "server.key")
    return args


def open_transport(cfg: Config, security: dict[str, Any]) -> tuple[RoundCoordinator, FederationServer]:
    """The round coordinator and the gRPC server around it, with the federation's liveness settings: nodes
    heartbeat every ``federation.heartbeat_s`` (sent to them at registration) and a node silent for
    ``federation.silence_s`` is no longer live. ``security``: ``start_server`` arguments (see ``_tls``)."""
    fed = cfg.federation
    coord = RoundCoordinator(fingerprint(cfg), fed.rounds, silence_s=fed.silence_s)
    limit = int(fed.max_update_mb * 2**20)
    server = start_server(coord, cfg.server.address, limits=Limits(max_tensor_bytes=limit, max_total_bytes=limit),
                          heartbeat_interval_s=fed.heartbeat_s, max_workers=256, bulk_port=cfg.server.bulk_port,
                          **security)
    coord.last_seen = server.servicer.last_seen
    return coord, server


class BaseSync:
    """Which base-weight updates (flora, fedex) each node's process holds, kept true across node restarts.

    The strategy's ``base_log`` sends every sampled node the updates it has not been sent yet. A node reports
    at each registration how many it holds (a restarted process: none); ``rewind`` takes those reports in
    before a round is configured, and ``rebase`` rebuilds the open round's instructions of a node whose
    process restarted after they were made. Instructions carry ``base_from`` / ``base_to`` (the updates the
    node must hold before and after them) so a node can tell a stale bundle from a fresh one.
    """

    def __init__(self, strategy: Any) -> None:
        self.log = getattr(strategy, "base_log", None)

    def rewind(self, held: dict[str, int]) -> None:
        """Take in what each node reported at its registration (``RoundCoordinator.take_registrations``)."""
        if self.log is None:
            return
        for node, n in held.items():
            self.log.rewind(node, n)

    def extra(self, ids: list[str]) -> dict[str, dict[str, int]]:
        """Per node, the ``base_from`` / ``base_to`` of the instructions about to be configured."""
        if self.log is None:
            return {cid: {} for cid in ids}
        return {cid: {"base_from": self.log.held_by(cid), "base_to": len(self.log.log)} for cid in ids}

    def rebase(self, node: str, held: int, ins: Instructions) -> Instructions:
        assert self.log is not None, "only instructions with a base range need a rebase"
        self.log.rewind(node, held)
        return dataclasses.replace(ins, base_update=self.log.pending(node),
                                   extra={**ins.extra, "base_from": held, "base_to": len(self.log.log)})


def run_server(cfg: Config, console: Console) -> ServerResult:
    """Coordinate ``cfg.federation.rounds`` rounds over gRPC; see the module docstring.

    Raises:
        FederationError: fewer than ``federation.min_clients`` nodes within ``federation.wait_timeout_s``.
        InsecureTransportError: plaintext on a non-loopback address without ``server.insecure``.
        ValueError / FileNotFoundError: a bad config, keys folder or incompatible run folder.
    """
    fed = cfg.federation
    run = RunDir(cfg.out)
    ckpt = _resume_point(run, cfg)
    security = _tls(cfg)
    if ckpt is None:
        run.write_config(cfg)
        run.metrics_path.unlink(missing_ok=True)
    data = load_dataset(cfg)
    lm = load_model(cfg, num_labels=len(data.label_names) or None)
    eval_ex = encode(data.eval_records, lm.tokenizer, cfg, for_training=False) if cfg.server.eval_data else []
    eval_kw = {"device": lm.device, "pad_id": lm.tokenizer.pad_token_id, "batch_size": cfg.eval.batch_size,
                   "max_batches": cfg.eval.max_batches, "compute_dtype": lm.compute_dtype}

    def evaluate_global() -> dict[str, float]:
        return evaluate(lm.model, eval_ex, **eval_kw) if eval_ex else {}

    global_state = get_state(lm.model, trainable_only=cfg.strategy.name != "ffa")
    strategy = make_strategy(cfg.strategy.name, federation_strategy_config(cfg, lm.quantized))
    base_updates: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    start = 1
    if ckpt is not None:
        strategy, global_state, base_updates, before = ckpt.strategy, ckpt.state, ckpt.base_updates, ckpt.before
        for upd in base_updates:
            apply_base_update(lm.model, upd, lm.quantized)
        rounds = [r for r in run.read_metrics() if r.get("round", 0) <= ckpt.round]
        run.rewrite_metrics(rounds)
        start = ckpt.round + 1
        console.print(f"resuming {run.path} after round {ckpt.round}")
    else:
        before = evaluate_global()
        first = {"round": 0, **before, "bytes_up": 0, "bytes_down": 0, "clients_ok": 0, "clients_failed": 0,
                 "seconds": 0.0}
        run.log(first)
        rounds.append(first)

    coord, server = open_transport(cfg, security)
    base_sync = BaseSync(strategy)
    coord.rebase = base_sync.rebase
    allowlist = security.get("allowlist_file")
    mode = "TLS" if "cert_file" in security else "plaintext"
    console.print(f"fedtune server listening on {cfg.server.address.rsplit(':', 1)[0]}:{server.port} ({mode}, "
                  f"{'allow-list ' + str(allowlist) if allowlist else 'no node authentication'}); "
                  f"waiting for {fed.min_clients} client(s)", highlight=False)
    try:
        for rnd in range(start, fed.rounds + 1):
            coord.set_phase("waiting", rnd)
            if not coord.wait_for_clients(fed.min_clients, fed.wait_timeout_s):
                raise FederationError(
                    f"only {len(coord.live_clients())} of federation.min_clients={fed.min_clients} client(s) "
                    f"connected within federation.wait_timeout_s={fed.wait_timeout_s:g} s (round {rnd}); "
                    f"start more clients or lower federation.min_clients. The run resumes from {run.path} "
                    "when the server is started again")
            t0 = time.perf_counter()
            ids = coord.live_clients()
            order = coord.known_clients()
            rng = random.Random(cfg.seed * 7919 + rnd)
            base_sync.rewind(coord.take_registrations())
            base = base_sync.extra(ids)
            instructions = with_training(strategy.configure(rnd, ids, global_state, rng), cfg.train)
            instructions = {cid: dataclasses.replace(ins, extra={
                **ins.extra, "seed": client_seed(cfg.seed, rnd, order.index(cid) if cid in order else len(order)),
                **base[cid]}) for cid, ins in instructions.items()}
            per_client = {cid: {"bytes_down": instructions_wire_size(ins), "bytes_up": 0}
                          for cid, ins in instructions.items()}
            coord.open_round(rnd, instructions, fed.round_timeout_s,
                             buffer=len(instructions) + 1 if strategy.needs_all_replies else 2)

            result = strategy.aggregate(rnd, global_state, _replies(coord, per_client, list(instructions),
                                                                     strategy.needs_all_replies))
            coord.set_phase("evaluating")
            global_state = apply_round_result(lm, cfg, global_state, result, base_updates)
            record: dict[str, Any] = {"round": rnd, **evaluate_global()}
            record.update({
                "agg_error": result.metrics.get("agg_error"), "applied": result.applied,
                "bytes_up": sum(c["bytes_up"] for c in per_client.values()),
                "bytes_down": sum(c["bytes_down"] for c in per_client.values()),
                "clients_ok": len(result.clients_ok), "clients_failed": len(result.clients_failed),
                "rejected": coord.rejected, "failures": result.failures, "clients": per_client,
                "seconds": time.perf_counter() - t0,
            })
            record.update({k: v for k, v in result.metrics.items() if k not in record})
            run.log(record)  # then the checkpoint: a kill in between re-runs this round, dropping this line
            rounds.append(record)
            save_checkpoint(run.path, Checkpoint(round=rnd, state=global_state, strategy=strategy,
                                                 base_updates=base_updates, before=before))
            loss, err = record.get("eval_loss"), record["agg_error"]
            console.print(f"round {rnd}/{fed.rounds}: eval_loss={'-' if loss is None else f'{loss:.4f}'} "
                          f"ok={record['clients_ok']} failed={record['clients_failed']} "
                          f"rejected={record['rejected']} {'' if result.applied else '(not applied) '}"
                          f"agg_error={'-' if err is None else f'{err:.2e}'} "
                          f"up={record['bytes_up'] / 2**20:.2f} MiB down={record['bytes_down'] / 2**20:.2f} MiB "
                          f"{record['seconds']:.1f} s", highlight=False)
            for cid, why in result.failures.items():
                console.print(f"  {cid}: {why}", highlight=False)
        set_state(lm.model, global_state)
        run.save_adapter(lm.model)
        history = run.read_metrics()
        write_plot(history, run.path / "plot.png")
        coord.finish()
        missing = coord.wait_stopped(STOP_GRACE_S)
        if missing:
            console.print(f"not told to stop (gone?): {', '.join(missing)}", highlight=False)
    finally:
        coord.finish()
        server.stop(grace=1.0)
    result_obj = ServerResult(history, run.path, server.port, coord.refused_registrations)
    print_server_summary(console, cfg, result_obj)
    return result_obj
