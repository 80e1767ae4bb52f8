"""``fedtune client``: a site's node loop, written out top to bottom.

setup (model and data loaded once, the node's state folder read) -> connect (signed challenge over TLS) ->
loop: wait for instructions, fold pending base updates into the frozen base, answer with the handler of the
instructions' phase (``phases.run_phase``: ``train`` is ``fit`` then the update pipeline), save the node's
state, stream the reply back (encoded with ``client.encoding``) -> exit 0 when the server says the
federation is done. Every registration reports how many base updates (flora, fedex) the model
holds, so a restarted node (none) is sent all of them; instructions say which base they build on
(``base_from`` -> ``base_to``), and a node whose base differs registers again to have them rebuilt. When the server goes away the node reconnects with backoff (capped at
``client.max_backoff_s``) and carries on when it returns; a refusal (unknown key, revoked, config mismatch)
ends the node with a clear message instead.

Only adapter tensors and scalar metrics (loss, steps, seconds) leave the site: the data never does. What the
phase handlers keep between rounds (the update pipeline's state, e.g. error-feedback residuals) is written
atomically to ``<out>/client_state.pt`` (plain tensors, read with ``weights_only=True``), so it survives a
restart of the node.
"""

from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from fedtune.client.phases import ClientContext, run_phase
from fedtune.compression.config import uplink_encoding
from fedtune.config import Config, fingerprint
from fedtune.models import apply_base_update, load_model
from fedtune.pipeline import encode, load_dataset
from fedtune.runs import atomic_write_bytes
from fedtune.transport import (
    AuthenticationError,
    Backoff,
    ConfigMismatch,
    FederationClient,
    MessageRejected,
    PermissionDeniedError,
    TransportError,
)
from fedtune.types import ClientReply

log = logging.getLogger(__name__)
STATE_FILE = "client_state.pt"


class NodeRefused(RuntimeError):
    """The server refused this node (not allow-listed, revoked, or a config mismatch); retrying is pointless."""


@dataclass
class NodeResult:
    rounds: list[int]
    reconnects: int


def connection_args(cfg: Config) -> dict[str, object]:
    """``FederationClient`` security arguments from ``client.keys_dir`` / ``client.insecure``.

    Raises:
        FileNotFoundError: ``client.keys_dir`` lacks ``ca.pem`` or ``nodes/<client.name>.key``.
    """
    c = cfg.client
    if c.keys_dir is None:
        return {"insecure": c.insecure}
    keys = Path(c.keys_dir)
    key = keys / "nodes" / f"{c.name}.key"
    missing = [str(p) for p in (keys / "ca.pem", key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"client.keys_dir={keys}: missing {', '.join(missing)} (the federation's operator "
                                f"makes them with `fedtune keys DIR --nodes {c.name}`)")
    args: dict[str, object] = {"key": key, "insecure": c.insecure}
    if not c.insecure:
        args["ca_file"] = keys / "ca.pem"
    return args


def load_node_state(path: Path) -> dict[str, Any]:
    """The node's saved per-client state (empty when there is none yet)."""
    return dict(torch.load(path, weights_only=True)) if path.is_file() else {}


def save_node_state(path: Path, state: dict[str, Any]) -> None:
    """Write the node's per-client state atomically (nothing while there is none)."""
    if not state and not path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def run_client(cfg: Config, console: Console) -> NodeResult:
    """Take part in the federation at ``client.server`` until it is done; see the module docstring.

    Raises:
        NodeRefused: the server refused this node.
        InsecureTransportError: plaintext to a non-loopback server without ``client.insecure``.
    """
    c = cfg.client
    data = load_dataset(cfg)
    lm = load_model(cfg, num_labels=len(data.label_names) or None)
    examples = encode(data.train_records, lm.tokenizer, cfg)
    state_path = Path(cfg.out) / STATE_FILE
    ctx = ClientContext(cfg, lm, examples, load_node_state(state_path))
    console.print(f"node {c.name}: {len(examples)} training examples, model {cfg.model.name}; "
                  f"joining {c.server}", highlight=False)
    backoff = Backoff(initial_s=0.5, max_s=c.max_backoff_s, max_attempts=4)
    security = connection_args(cfg)

    held = 0  # base updates folded into this process's model; a fresh process holds none

    def connect() -> FederationClient:
        new = FederationClient(c.server, c.name, fingerprint=fingerprint(cfg), backoff=backoff,
                               heartbeat_s=cfg.federation.heartbeat_s, base_updates=held, encoding=uplink_encoding(cfg),
                               bulk=c.bulk_min_mb is not None, bulk_min_bytes=int((c.bulk_min_mb or 0) * 2**20),
                               **security)  # type: ignore[arg-type]
        try:
            return new.connect()
        except BaseException:
            new.close()
            raise

    fc: FederationClient | None = None
    resynced = -1  # last round whose instructions assumed another base (asked for once per round)
    told: dict[str, object] = {}  # the server's train.* that differ from this site's config, as last printed
    done: list[int] = []
    attempt = reconnects = 0
    try:
        while True:
            try:
                if fc is None:
                    fc = connect()
                    attempt = 0
                    console.print(f"node {c.name}: registered with {c.server}", highlight=False)
                ins = fc.wait_for_instructions(poll_s=20.0)
                if ins is None:
                    continue
                if ins.phase == "stop":
                    console.print(f"node {c.name}: the federation is done after round {ins.round}", highlight=False)
                    return NodeResult(done, reconnects)
                base_from, base_to = ins.extra.get("base_from", held), ins.extra.get("base_to", held)
                if held in (base_from, base_to):
                    if held == base_from and ins.base_update:  # held == base_to: folded in already (sent again)
                        apply_base_update(lm.model, ins.base_update, lm.quantized)
                    held = fc.base_updates = base_to
                    overridden = {k: v for k, v in ins.train.items() if getattr(cfg.train, k, v) != v}
                    if overridden and overridden != told:
                        console.print(f"node {c.name}: round {ins.round} trains per the server's instructions: "
                                      + ", ".join(f"train.{k}={v} (this site's config: {getattr(cfg.train, k)})"
                                                  for k, v in overridden.items()), highlight=False)
                    told = overridden
                    reply = run_phase(ctx, ins)
                    save_node_state(state_path, ctx.state)
                elif resynced != ins.round:  # e.g. the node missed a round's instructions
                    console.print(f"node {c.name}: holds {held} base update(s), round {ins.round} builds on "
                                  f"{base_from}; asking the server for the missing ones", highlight=False)
                    resynced = ins.round
                    fc.report_base(held)
                    continue
                else:
                    reply = ClientReply(c.name, ins.round, None, 0, error=f"base model out of sync: holds {held} "
                                        f"base update(s), the server's instructions build on {base_from}")
                try:
                    try:
                        ack = fc.submit(reply, phase=ins.phase)
                    except ValueError as e:  # client.encoding cannot carry this update: say so instead
                        reply = ClientReply(c.name, ins.round, None, 0, error=f"cannot encode the update as "
                                            f"{uplink_encoding(cfg)}: {e}")
                        ack = fc.submit(reply, phase=ins.phase)
                    note = ack.message
                except MessageRejected as e:  # e.g. past the deadline: the server left it out
                    note = f"refused: {e.reason}"
                done.append(ins.round)
                loss = reply.metrics.get("train_loss")
                console.print(f"node {c.name}: round {ins.round} {escape(ins.phase[:64])} "
                              f"{'failed: ' + reply.error if reply.error else f'train_loss={loss:.4f}' if loss else ''} "
                              f"-> {note}", highlight=False)
            except (AuthenticationError, PermissionDeniedError, ConfigMismatch) as e:
                raise NodeRefused(f"the server refused node {c.name!r}: {e.reason}") from None
            except TransportError as e:
                reconnects += 1
                delay = min(c.max_backoff_s, 0.5 * 2**attempt) * (1 + random.uniform(-0.2, 0.2))
                attempt += 1
                console.print(f"node {c.name}: server unreachable ({e.reason.splitlines()[0][:120]}); "
                              f"reconnecting in {delay:.1f} s", highlight=False)
                if fc is not None:
                    fc.close()
                    fc = None
                time.sleep(delay)
    finally:
        if fc is not None:
            fc.close()
