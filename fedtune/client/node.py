"""``fedtune client``: a site's node loop, written out top to bottom.

setup (model and data loaded once, the node's state folder read) -> connect (signed challenge over TLS) ->
loop: wait for instructions, fold pending base updates into the frozen base, answer with the handler of the
instructions' phase (``phases.run_phase``: ``train`` is ``fit`` then the update pipeline), save the node's
state, stream the reply back (encoded with ``client.encoding``) -> exit 0 when the server says the
federation is done. Every registration reports how many base updates (flora, fedex) the model
holds, so a restarted node (none) is sent all of them; instructions say which base they build on
(``base_from`` -> ``base_to``), and a node whose base differs registers again to have them rebuilt.

Key files are checked before the model loads. When the server refuses or drops the connection the node
reconnects with backoff (each wait capped at ``client.max_backoff_s``) and carries on when it returns, or
gives up after ``client.max_retry_s`` without contact (``ServerUnreachable``). A connection that cannot work
as configured (a host that does not resolve, TLS on one side only, a certificate for another host or CA) and
a refusal (unknown key, revoked, config mismatch) end the node at once with the whole reason and the key
to change (``NodeMisconfigured``, ``NodeRefused``).

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
from cryptography import x509
from rich.console import Console

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
    ConnectionSetupError,
    FederationClient,
    InsecureTransportError,
    MessageRejected,
    PermissionDeniedError,
    TransportError,
    check_plaintext_allowed,
    load_node_key,
)
from fedtune.types import ClientReply
from fedtune.untrusted import MAX_NAME, shown

log = logging.getLogger(__name__)
STATE_FILE = "client_state.pt"


class NodeRefused(RuntimeError):
    """The server refused this node (not allow-listed, revoked, or a config mismatch); retrying is pointless."""


class NodeMisconfigured(RuntimeError):
    """The connection cannot work as configured (address, TLS); the message names the key to change."""


class ServerUnreachable(RuntimeError):
    """The server refused or dropped every connection for ``client.max_retry_s``."""


def setup_advice(e: ConnectionSetupError, cfg: Config) -> str:
    """What went wrong in ``e`` for this node, and which key to change."""
    c = cfg.client
    host = c.server.rpartition(":")[0].strip("[]")
    keys = c.keys_dir or "the keys folder"
    advice = {
        "dns": f"the host {host!r} of client.server does not resolve: set client.server to the coordinator's "
               f"host:port",
        "tls_hostname": f"the server's TLS certificate is not valid for {host!r}: set client.server to a name "
                        f"the certificate lists, or have the operator add this one with `fedtune keys DIR "
                        f"--server-host {host}`",
        "tls_ca": f"the server's TLS certificate is not signed by {keys}/ca.pem: set client.keys_dir to the "
                  f"keys folder of this server's federation",
        "tls_plaintext": "the server speaks plaintext, not TLS: set client.insecure = true (--insecure) if that "
                         "is intended, or have the operator start it with server.keys_dir",
        "plaintext_tls": "the server speaks TLS: set client.keys_dir to the folder with ca.pem and "
                         f"nodes/{c.name}.key from `fedtune keys`",
    }.get(e.kind, f"the TLS handshake failed: check client.keys_dir ({keys}) and client.server")
    return f"cannot connect to {c.server}: {advice}.\n  gRPC said: {e.reason}"


@dataclass
class NodeResult:
    rounds: list[int]
    reconnects: int


def connection_args(cfg: Config) -> dict[str, object]:
    """``FederationClient`` security arguments from ``client.keys_dir`` / ``client.insecure``.

    Raises:
        FileNotFoundError: ``client.keys_dir`` lacks ``ca.pem`` or ``nodes/<client.name>.key``.
        ValueError: one of them is not what `fedtune keys` writes.
        InsecureTransportError: no ``client.keys_dir`` for a server off loopback, without ``client.insecure``.
    """
    c = cfg.client
    if c.keys_dir is None:
        check_plaintext_allowed(c.server, c.insecure)
        return {"insecure": c.insecure}
    keys = Path(c.keys_dir)
    key = keys / "nodes" / f"{c.name}.key"
    missing = [str(p) for p in (keys / "ca.pem", key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"client.keys_dir={keys}: missing {', '.join(missing)} (the federation's operator "
                                f"makes them with `fedtune keys DIR --nodes {c.name}`; client.name picks the key)")
    try:
        load_node_key(key)
        x509.load_pem_x509_certificate((keys / "ca.pem").read_bytes())
    except (ValueError, TypeError) as e:
        raise ValueError(f"client.keys_dir={keys}: {key.name} or ca.pem is not what `fedtune keys` writes "
                         f"({e})") from None
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
        NodeMisconfigured: the connection cannot work as configured (host name, TLS).
        ServerUnreachable: no contact with the server for ``client.max_retry_s``.
        InsecureTransportError: plaintext to a non-loopback server without ``client.insecure``.
        FileNotFoundError / ValueError: ``client.keys_dir`` lacks a key file or holds a broken one.
    """
    c = cfg.client
    security = connection_args(cfg)  # key files first: a typo must not cost a model load
    data = load_dataset(cfg)
    lm = load_model(cfg, num_labels=len(data.label_names) or None)
    examples = encode(data.train_records, lm.tokenizer, cfg)
    state_path = Path(cfg.out) / STATE_FILE
    ctx = ClientContext(cfg, lm, examples, load_node_state(state_path))
    console.print(f"node {c.name}: {len(examples)} training examples, model {cfg.model.name}; "
                  f"joining {c.server}", highlight=False)
    backoff = Backoff(initial_s=0.5, max_s=c.max_backoff_s, max_attempts=4)

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
    contact = time.monotonic()  # last time the server answered
    try:
        while True:
            try:
                if fc is None:
                    fc = connect()
                    attempt = 0
                    console.print(f"node {c.name}: registered with {c.server}", highlight=False)
                contact = time.monotonic()
                ins = fc.wait_for_instructions(poll_s=20.0)
                contact = time.monotonic()
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
                                      + ", ".join(f"train.{shown(k, MAX_NAME)}={shown(v, 200)} (this site's "
                                                  f"config: {shown(getattr(cfg.train, k), 200)})"
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
                console.print(f"node {c.name}: round {ins.round} {shown(ins.phase, MAX_NAME)} "
                              f"{'failed: ' + shown(reply.error) if reply.error else f'train_loss={loss:.4f}' if loss else ''} "
                              f"-> {shown(note)}", highlight=False)
            except (AuthenticationError, PermissionDeniedError, ConfigMismatch) as e:
                raise NodeRefused(f"the server refused node {c.name!r}: {e.reason}") from None
            except ConnectionSetupError as e:
                raise NodeMisconfigured(setup_advice(e, cfg)) from None
            except InsecureTransportError:
                raise
            except TransportError as e:
                reconnects += 1
                delay = min(c.max_backoff_s, 0.5 * 2**attempt) * (1 + random.uniform(-0.2, 0.2))
                attempt += 1
                left = c.max_retry_s - (time.monotonic() - contact)
                if left <= 0:
                    raise ServerUnreachable(f"gave up on {c.server} after {c.max_retry_s:g} s without contact "
                                            f"(client.max_retry_s): {shown(e.reason)}") from None
                delay = min(delay, left)
                console.print(f"node {c.name}: server unreachable ({shown(e.reason)}); reconnecting in "
                              f"{delay:.1f} s (giving up in {left:.0f} s)", highlight=False)
                if fc is not None:
                    fc.close()
                    fc = None
                time.sleep(delay)
    finally:
        if fc is not None:
            fc.close()
