"""``fedtune server``: the coordinator of a real federation, written out top to bottom.

setup (run folder, model + held-out data, strategy, gRPC server) -> the round driver (``fedtune.rounds``)
with the gRPC dispatcher (``dispatch.GrpcDispatcher``: wait for ``federation.min_clients``, publish each
phase's instructions, stream the replies in until the deadline) -> tell the nodes to stop -> summary.
Only a run that finished tells its nodes to stop: a server that fails or is interrupted leaves them
reconnecting, so a restarted server resumes with them.

It writes the same run folder as ``fedtune simulate`` (``config.toml``, ``metrics.jsonl``, ``adapter/``,
``plot.png``, ``checkpoint.pt``) and makes the same random choices, so a federation of nodes named and
partitioned like the simulator's virtual clients ends with the simulator's adapter, and a server killed and
restarted on the same ``out`` resumes from its last checkpoint and ends where an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.checkpoint import Checkpoint
from fedtune.compression.config import uplink_encoding
from fedtune.compression.link import make_link
from fedtune.compression.mask import with_mask
from fedtune.config import Config, fingerprint
from fedtune.global_model import GlobalModel
from fedtune.models import load_model
from fedtune.pipeline import encode, load_dataset
from fedtune.privacy.wrap import with_privacy
from fedtune.report import print_summary
from fedtune.rounds import RoundPlan, RunResult, has_checkpoint, open_run, run_rounds
from fedtune.runs import RunDir
from fedtune.server.coordinator import RoundCoordinator
from fedtune.server.dispatch import FederationError, GrpcDispatcher
from fedtune.strategies import Strategy, make_strategy, spec_of, strategy_config
from fedtune.strategies.screen import ReplyPolicy
from fedtune.transport import FederationServer, Limits, start_server
from fedtune.transport.security import check_exposure
from fedtune.transport.server import check_port_free

__all__ = ["Coordinator", "FederationError", "open_transport", "prepare_coordinator", "run_server"]

# Keys whose change does not alter what a resumed run computes (addresses, timeouts, more rounds).
RESUMABLE_CHANGES = ("server.", "client.name", "client.server", "client.keys_dir", "client.insecure",
                     "client.max_backoff_s", "client.bulk_min_mb", "federation.rounds", "federation.wait_timeout_s",
                     "federation.round_timeout_s", "federation.max_update_mb", "federation.heartbeat_s",
                     "federation.silence_s", "federation.eval_every", "out", "eval.", "sim.")


def _tls(cfg: Config) -> dict[str, Any]:
    """``start_server`` security arguments: TLS + allow-list from ``server.keys_dir`` (the allow-list even
    when insecure: node authentication stays on whenever keys exist)."""
    if cfg.server.keys_dir is None:
        return {"insecure": cfg.server.insecure, "allow_anyone": cfg.server.no_node_auth}
    keys = Path(cfg.server.keys_dir)
    missing = [f for f in ("server.pem", "server.key", "allowlist.txt") if not (keys / f).is_file()]
    if missing:
        raise FileNotFoundError(f"server.keys_dir={keys}: missing {', '.join(missing)} "
                                "(create them with `fedtune keys DIR --nodes a,b,c`)")
    args: dict[str, Any] = {"allowlist_file": keys / "allowlist.txt", "insecure": cfg.server.insecure}
    if not cfg.server.insecure:
        args.update(cert_file=keys / "server.pem", key_file=keys / "server.key")
    return args


def server_workers(cfg: Config) -> int:
    """``server.max_workers``, or (0) enough for ``federation.min_clients`` nodes: one thread for each node's
    poll or upload, one for its presence stream, one for a retry the server has not noticed ended, and the
    reserve for heartbeats."""
    return cfg.server.max_workers or max(256, 3 * cfg.federation.min_clients + 64)


def open_transport(cfg: Config, security: dict[str, Any]) -> tuple[RoundCoordinator, FederationServer]:
    """The round coordinator and the gRPC server around it, with the federation's liveness settings: nodes
    heartbeat every ``federation.heartbeat_s`` (sent to them at registration) and a node silent for
    ``federation.silence_s`` is no longer live. Instructions go out, and updates are counted, in
    ``client.encoding``. ``security``: ``start_server`` arguments (see ``_tls``)."""
    fed = cfg.federation
    coord = RoundCoordinator(fingerprint(cfg), fed.rounds, silence_s=fed.silence_s, encoding=uplink_encoding(cfg),
                             disconnect_grace_s=fed.disconnect_grace_s)
    limit = int(fed.max_update_mb * 2**20)
    server = start_server(coord, cfg.server.address, limits=Limits(max_tensor_bytes=limit, max_total_bytes=limit),
                          heartbeat_interval_s=fed.heartbeat_s, max_workers=server_workers(cfg), bulk_port=cfg.server.bulk_port,
                          keepalive_s=fed.keepalive_s, downlink_encoding=cfg.client.encoding, **security)
    coord.last_seen, coord.disconnected = server.servicer.last_seen, server.servicer.disconnected
    return coord, server


@dataclass
class Coordinator:
    """What a coordinator runs the round driver with, whatever reaches its clients (gRPC, Flower's Grid)."""

    run: RunDir
    checkpoint: Checkpoint | None
    model: GlobalModel
    strategy: Strategy
    plan: RoundPlan


def prepare_coordinator(cfg: Config) -> Coordinator:
    """The run folder (resumed when it holds a checkpoint of this run), the global model with the server's
    held-out data, the strategy (privacy wrapped around it) and the round plan of ``federation.*``.

    Raises:
        ValueError / FileNotFoundError: an incompatible run folder, missing data or model.
    """
    fed = cfg.federation
    run, ckpt = open_run(cfg, resume=has_checkpoint(cfg), may_change=RESUMABLE_CHANGES)
    data = load_dataset(cfg)
    lm = load_model(cfg, num_labels=len(data.label_names) or None)
    eval_examples = encode(data.eval_records, lm.tokenizer, cfg, for_training=False) if cfg.server.eval_data else []
    model = GlobalModel(cfg, lm, eval_examples, frozen_in_state=spec_of(cfg.strategy.name).frozen_in_state)
    strategy = with_privacy(with_mask(
        make_strategy(cfg.strategy.name, strategy_config(cfg, lm.quantized, fed.clients_per_round)), cfg), cfg)
    plan = RoundPlan(rounds=fed.rounds, seed=cfg.seed, train=cfg.train, eval_every=fed.eval_every,
                     policy=ReplyPolicy.from_config(fed), reorder_buffer=fed.reorder_buffer, link=make_link(cfg))
    return Coordinator(run, ckpt, model, strategy, plan)


def run_server(cfg: Config, console: Console) -> RunResult:
    """Coordinate ``cfg.federation.rounds`` rounds over gRPC; see the module docstring.

    Raises:
        FederationError: fewer than ``federation.min_clients`` nodes within ``federation.wait_timeout_s``.
        InsecureTransportError: off loopback, plaintext without ``server.insecure``, or no ``server.keys_dir``
            without ``server.no_node_auth``.
        ValueError / FileNotFoundError: a bad config, keys folder or incompatible run folder.
    """
    fed = cfg.federation
    security = _tls(cfg)
    exposure = check_exposure(cfg.server.address, tls="cert_file" in security,
                              authenticated="allowlist_file" in security, insecure=cfg.server.insecure,
                              allow_anyone=cfg.server.no_node_auth)  # before anything loads: a mistake exits at once
    for warning in exposure:
        console.print(warning, style="bold red", highlight=False, markup=False)
    check_port_free(cfg.server.address)  # a port in use is said before the model loads, not after
    c = prepare_coordinator(cfg)
    run, ckpt, model, strategy, plan = c.run, c.checkpoint, c.model, c.strategy, c.plan
    coord, server = open_transport(cfg, security)
    allowlist = security.get("allowlist_file")
    mode = "TLS" if "cert_file" in security else "plaintext"
    console.print(f"fedtune server listening on {cfg.server.address.rsplit(':', 1)[0]}:{server.port} ({mode}, "
                  f"{'allow-list ' + str(allowlist) if allowlist else 'no node authentication'}); "
                  f"waiting for {fed.min_clients} client(s)", highlight=False)
    if cfg.privacy.secagg:
        from fedtune.privacy.secagg_strategy import tolerance_note

        console.print(tolerance_note(fed.min_clients, cfg.privacy), markup=False, highlight=False)
    dispatcher = GrpcDispatcher(coord, server, strategy, min_clients=fed.min_clients,
                                wait_timeout_s=fed.wait_timeout_s, round_timeout_s=fed.round_timeout_s,
                                encoding=cfg.client.encoding, console=console)
    try:
        result = run_rounds(plan, run, model, strategy, dispatcher, console, resume=ckpt)
    except BaseException:
        dispatcher.abort()  # a crash (or Ctrl-C) never tells the nodes that the federation is done
        raise
    dispatcher.close()
    result.notes += [f"refused at registration: {msg}" for msg in coord.refused_registrations]
    if coord.refusals > len(coord.refused_registrations):
        result.notes.append(f"... {coord.refusals} registrations were refused in all; the newest "
                            f"{len(coord.refused_registrations)} are shown")
    print_summary(console, f"fedtune server: strategy={cfg.strategy.name}, {fed.rounds} rounds, "
                           f"min_clients={fed.min_clients}", result)
    return result
