"""fedtune as a Flower App: ``flwr run`` on an existing SuperLink with SuperNodes, equal to ``fedtune server``.

The ServerApp is fedtune's coordinator with one dispatcher swapped: ``GridDispatcher`` sends each phase's
instructions to SuperNodes as Flower ``Message``s and brings the replies back, and the round driver
(``fedtune.rounds``) does the rest (strategy, phases, evaluation, run folder, checkpoints, resume), as it does
for the gRPC server and the simulator. The ClientApp is a fedtune node: ``run_phase`` (``fit`` and the update
pipeline) on the SuperNode's own data.

What travels: a message's content holds fedtune's own wire frames (``fedtune.transport.messages``), each as
one raw-bytes ``Array`` (stype ``fedtune.frames``), so bf16, int8 and packed 4-bit tensors cross without a
numpy detour, with ``client.encoding`` applied and every tensor's digest checked by fedtune's decoder on
arrival; the bytes counted in ``metrics.jsonl`` are those frames, as on fedtune's own wire.

A SuperNode names itself in its ``--node-config``: ``client-name`` (default ``client-<partition-id>``),
``partition-id`` (its index: training seeds derive from it, as from a simulated client's), and either
``data-path`` (the site's own JSONL file, used whole) or ``num-partitions`` (the node takes its part of the
federation's data set, split by fedtune's partitioner as the simulator splits it: Flower's ``:local:``
simulation sets both), and optionally ``overrides`` (the site's own fedtune settings, e.g.
``data.eval_fraction=0``). Per-client state (kept optimizer state, the update pipeline's residuals, the base-weight
updates of ``flora`` / ``fedex``) lives in the node's Flower context, never on the server.
"""

from __future__ import annotations

import dataclasses
import io
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.markup import escape

from fedtune.compression.config import uplink_encoding
from fedtune.config import Config, load_config
from fedtune.server.dispatch import FederationError
from fedtune.transport.codec import Limits
from fedtune.transport.errors import MessageRejected
from fedtune.transport.messages import (
    frames_to_instructions,
    frames_to_reply,
    instructions_to_frames,
    reply_to_frames,
)
from fedtune.types import ClientReply, Instructions, failed_reply, updates_from_plain, updates_to_plain
from fedtune.untrusted import clean

FRAMES = "fedtune.frames"
"""The ``stype`` of an ``Array`` holding one fedtune wire frame as raw bytes."""
MAX_ERROR_CHARS = 500
"""How much of a node's error text the server keeps (it came from the network)."""


def _error_text(text: object) -> str:
    """A node's error text, bounded and with control characters shown: its end, where Python puts the
    exception (a ClientApp's reason is a traceback)."""
    s = str(text)
    return clean(s if len(s) <= MAX_ERROR_CHARS else "..." + s[-MAX_ERROR_CHARS:], MAX_ERROR_CHARS + 3)


# --- messages: fedtune frames in Flower records --------------------------------------------------------------

def frames_to_content(frames: list[bytes], meta: dict[str, Any]) -> RecordDict:
    """A message content holding ``frames`` byte for byte (one raw ``Array`` each) and ``meta`` (scalars)."""
    arrays = {f"{i:06d}": Array(dtype="uint8", shape=(len(f),), stype=FRAMES, data=bytes(f))
              for i, f in enumerate(frames)}
    return RecordDict({"frames": ArrayRecord(arrays), "meta": ConfigRecord(meta)})


def content_frames(content: RecordDict) -> tuple[list[bytes], dict[str, Any]]:
    """The frames and meta of ``frames_to_content``'s content.

    Raises:
        MessageRejected: the content is not fedtune's (missing records, an array of another kind).
    """
    if "frames" not in content.array_records or "meta" not in content.config_records:
        raise MessageRejected("not a fedtune message: no 'frames' array record or no 'meta' config record")
    record = content.array_records["frames"]
    frames = []
    for key in sorted(record):
        array = record[key]
        if array.stype != FRAMES:
            raise MessageRejected(f"array {key[:40]!r} holds {array.stype[:40]!r}, not fedtune frames")
        frames.append(bytes(array.data))
    return frames, dict(content.config_records["meta"])


def frames_size(frames: list[bytes]) -> int:
    return sum(len(f) for f in frames)


# --- the server side ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Node:
    node_id: int
    name: str
    index: int


class GridDispatcher:
    """The round driver's ``Dispatcher`` over Flower's ``Grid`` (see the module docstring).

    ``available`` waits for ``federation.min_clients`` SuperNodes and asks each new one who it is (a ``query``
    message); ``dispatch`` pushes one ``train`` message per client and pulls the replies until all are in or
    ``federation.round_timeout_s`` has passed (a missing reply is a recorded failure, as on fedtune's server).
    """

    def __init__(self, grid: Grid, cfg: Config, strategy: Any, console: Console, poll_s: float = 0.1) -> None:
        self.grid, self.cfg, self.console, self.poll_s = grid, cfg, console, poll_s
        self.base_log = strategy.base_log
        self.nodes: dict[str, _Node] = {}
        self._asked: set[int] = set()
        limit = int(cfg.federation.max_update_mb * 2**20)
        self.limits = Limits(max_tensor_bytes=limit, max_total_bytes=limit)

    def _identify(self, node_ids: list[int]) -> None:
        """Ask the nodes not asked yet for their name and index."""
        new = [n for n in node_ids if n not in self._asked]
        if not new:
            return
        query = [Message(RecordDict({"meta": ConfigRecord({"what": "identity"})}), dst_node_id=n, message_type="query")
                 for n in new]
        for reply in self.grid.send_and_receive(query, timeout=self.cfg.federation.round_timeout_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error() or "meta" not in reply.content.config_records:  # asked again at the next poll
                why = reply.error.reason if reply.has_error() else "no 'meta' record"
                self.console.print(f"SuperNode {node_id} did not say who it is: {escape(_error_text(why))}",
                                   highlight=False)
                continue
            self._asked.add(node_id)
            meta = reply.content.config_records["meta"]
            name, index = str(meta.get("name", ""))[:128], _int(meta.get("index", -1))
            if not name or name in self.nodes:
                self.console.print(f"SuperNode {node_id} refused: name {escape(name)!r} is empty or taken",
                                   highlight=False)
                continue
            self.nodes[name] = _Node(node_id, name, index)
            if self.base_log is not None:
                self.base_log.rewind(name, _int(meta.get("held", 0)))

    def available(self, round: int) -> list[str]:
        """The identified SuperNodes' clients in natural name order, once ``federation.min_clients`` are there.

        Raises:
            FederationError: fewer than ``federation.min_clients`` within ``federation.wait_timeout_s``.
        """
        fed = self.cfg.federation
        deadline = time.monotonic() + fed.wait_timeout_s
        while True:
            live = sorted(self.grid.get_node_ids())
            self._identify(live)
            names = [n.name for n in self.nodes.values() if n.node_id in live]
            if len(names) >= fed.min_clients:
                return sorted(names, key=_natural)
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(names)} of federation.min_clients={fed.min_clients} SuperNode(s) within "
                    f"federation.wait_timeout_s={fed.wait_timeout_s:g} s (round {round}); start more SuperNodes "
                    "or lower federation.min_clients")
            time.sleep(max(self.poll_s, 0.5))

    def client_index(self, client_id: str) -> int:
        node = self.nodes[client_id]
        return node.index if node.index >= 0 else sorted(self.nodes, key=_natural).index(client_id)

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        encoding = self.cfg.client.encoding
        sizes: dict[str, int] = {}
        pending: dict[str, str] = {}  # message id -> client
        messages = []
        for cid, ins in instructions.items():
            frames = list(instructions_to_frames(ins, encoding))
            sizes[cid] = frames_size(frames)
            messages.append(Message(frames_to_content(frames, {"phase": phase, "client": cid}),
                                    dst_node_id=self.nodes[cid].node_id, message_type="train"))
        for msg_id, cid in zip(self.grid.push_messages(messages), instructions, strict=True):
            pending[msg_id] = cid
        deadline = time.monotonic() + self.cfg.federation.round_timeout_s
        while pending:
            for msg in self.grid.pull_messages(list(pending)):
                got = pending.pop(msg.metadata.reply_to_message_id, None)
                if got is not None:
                    reply = self._reply(got, round, msg, phase)
                    reply.bytes_down = sizes[got]
                    yield reply
            if pending and time.monotonic() > deadline:
                for cid in pending.values():
                    reply = failed_reply(cid, round, "no reply within federation.round_timeout_s="
                                                     f"{self.cfg.federation.round_timeout_s:g} s (SuperNode gone?)")
                    reply.bytes_down = sizes[cid]
                    yield reply
                return
            if pending:
                time.sleep(self.poll_s)

    def _reply(self, cid: str, round: int, msg: Message, phase: str) -> ClientReply:
        """The fedtune reply inside ``msg`` from ``cid``, or a failed one saying what was wrong with it."""
        if msg.has_error():
            return failed_reply(cid, round, f"the node's ClientApp failed: {_error_text(msg.error.reason)}")
        try:
            frames, meta = content_frames(msg.content)
            reply = frames_to_reply(frames, self.limits)
        except MessageRejected as e:
            return failed_reply(cid, round, f"rejected update: {_error_text(e.reason)}")
        if self.base_log is not None and "held" in meta:
            self.base_log.rewind(cid, int(meta["held"]))
        if reply.client_id != cid or reply.round != round:
            return failed_reply(cid, round, f"rejected update: it is {reply.client_id[:64]!r}'s for round "
                                            f"{reply.round}, not {cid!r}'s for round {round}")
        if reply.error:
            reply.error = _error_text(reply.error)
        reply.bytes_up = frames_size(frames)
        return reply

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        """Nothing: each SuperNode keeps its client's state in its own context."""

    def close(self) -> None:
        """Nothing to release: the SuperLink ends the run when the ServerApp returns."""


def _int(value: object) -> int:
    """A node's integer field (it came from the network): -1 when it is not one."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _natural(name: str) -> tuple[Any, ...]:
    """``client-2`` before ``client-10`` (the order fedtune's server and simulator number clients in)."""
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def app_config(config_file: Path, run_config: dict[str, Any]) -> Config:
    """The run's fedtune config: the app's ``fedtune.toml`` with the run config's ``overrides`` on top
    (``flwr run APP CONN -c 'overrides="federation.rounds=5 out=/runs/x"'``)."""
    return load_config(config_file, shlex.split(str(run_config.get("overrides", ""))))


def run_flower_server(cfg: Config, grid: Grid, console: Console) -> Any:
    """``fedtune server``'s run with the Grid as its dispatcher: same run folder, strategy, driver, summary."""
    from fedtune.report import print_summary
    from fedtune.rounds import run_rounds
    from fedtune.server.loop import prepare_coordinator

    fed = cfg.federation
    c = prepare_coordinator(cfg)
    console.print(f"fedtune Flower App: strategy={cfg.strategy.name}, {fed.rounds} rounds, waiting for "
                  f"{fed.min_clients} SuperNode(s); run folder {c.run.path}", highlight=False)
    result = run_rounds(c.plan, c.run, c.model, c.strategy, GridDispatcher(grid, cfg, c.strategy, console), console,
                        resume=c.checkpoint)
    print_summary(console, f"fedtune Flower App: strategy={cfg.strategy.name}, {fed.rounds} rounds", result)
    return result


def make_server_app(config_file: Path) -> ServerApp:
    """The ServerApp of an app folder whose fedtune config is ``config_file``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_flower_server(app_config(config_file, dict(context.run_config)), grid, Console(width=120))

    return app


# --- the node side ------------------------------------------------------------------------------------------

STATE_KEY = "fedtune"
_CACHE: dict[str, Any] = {}  # per process: the loaded model and the node's examples (a ``:local:`` actor reuses them)
_LOCK = threading.Lock()  # one message at a time per process: an actor may serve several nodes, each its own model


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with dotted ``key=value`` overrides on top, validated as a config file is."""
    from fedtune.flower.records import config_overrides

    return load_config(None, [*config_overrides(cfg), *overrides]) if overrides else cfg


def node_identity(node_config: dict[str, Any]) -> tuple[str, int]:
    """The client name and index a SuperNode's ``--node-config`` gives it."""
    index = int(node_config.get("partition-id", -1))
    name = str(node_config.get("client-name", f"client-{index}" if index >= 0 else ""))
    if not name:
        raise ValueError("the SuperNode's --node-config names no client: give client-name=... or partition-id=N")
    return name, index


def node_config_for(cfg: Config, node_config: dict[str, Any]) -> tuple[Config, list[int] | None]:
    """The node's fedtune config (the federation's, with its own data) and, for a partitioned node, the
    indices of its records in the federation's data set (``num-partitions``)."""
    if "overrides" in node_config:  # the site's own fedtune settings (e.g. data.eval_fraction=0)
        cfg = apply_overrides(cfg, shlex.split(str(node_config["overrides"])))
    if "data-path" in node_config:
        data = dataclasses.replace(cfg.data, path=str(node_config["data-path"]))
        return dataclasses.replace(cfg, data=data), None
    if "num-partitions" in node_config and "partition-id" in node_config:
        sim = dataclasses.replace(cfg.sim, num_clients=int(node_config["num-partitions"]))
        return dataclasses.replace(cfg, sim=sim), []
    raise ValueError("the SuperNode's --node-config gives neither data-path=FILE (its own data) nor "
                     "partition-id=N and num-partitions=M (its part of the federation's data)")


def _load_node(cfg: Config, node_config: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    from fedtune.data.partition import partition_clients
    from fedtune.models import load_model
    from fedtune.pipeline import encode, load_dataset

    key = repr((cfg, sorted(node_config.items())))
    if _CACHE.get("key") != key:
        _CACHE.clear()
        site_cfg, part = node_config_for(cfg, node_config)
        data = load_dataset(site_cfg)
        records = data.train_records
        if part is not None:
            records = [records[j] for j in partition_clients(site_cfg, records)[int(node_config["partition-id"])]]
        lm = load_model(site_cfg, num_labels=len(data.label_names) or None)
        _CACHE.update(key=key, cfg=site_cfg, lm=lm, examples=encode(records, lm.tokenizer, site_cfg), applied=0)
    return _CACHE["lm"], _CACHE["examples"]


def _node_state(context: Context) -> dict[str, Any]:
    """What this node keeps between rounds: its client state, and the base updates it holds (in order)."""
    if STATE_KEY not in context.state.config_records:
        return {"client": {}, "bundles": []}
    blob = context.state.config_records[STATE_KEY]["blob"]
    return dict(torch.load(io.BytesIO(blob), weights_only=True))  # type: ignore[arg-type]


def _keep_node_state(context: Context, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    context.state.config_records[STATE_KEY] = ConfigRecord({"blob": buf.getvalue()})


def make_client_app(config_file: Path) -> ClientApp:
    """The ClientApp of an app folder: train on the SuperNode's data when the ServerApp asks."""
    app = ClientApp()

    @app.query()
    def identity(msg: Message, context: Context) -> Message:
        name, index = node_identity(dict(context.node_config))
        held = len(_node_state(context)["bundles"])
        return Message(RecordDict({"meta": ConfigRecord({"name": name, "index": index, "held": held})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return node_train(config_file, msg, context)

    return app


def node_train(config_file: Path, msg: Message, context: Context) -> Message:
    """The ClientApp's ``train``: one message at a time in this process (module-level, so that Ray pickles
    the ClientApp by reference, not the lock)."""
    with _LOCK:
        return _train(config_file, msg, context)


def _train(config_file: Path, msg: Message, context: Context) -> Message:
    from fedtune.client.phases import ClientContext, run_phase
    from fedtune.models import apply_base_update

    cfg = app_config(config_file, dict(context.run_config))
    frames, meta = content_frames(msg.content)
    ins = frames_to_instructions(frames, Limits(require_finite=False))
    assert ins is not None, "instructions frames decode to instructions"
    lm, examples = _load_node(cfg, dict(context.node_config))
    node = _node_state(context)
    bundles = [updates_from_plain(b) for b in node["bundles"]]
    for update in bundles[_CACHE["applied"]:]:  # a fresh process: the updates this node holds
        apply_base_update(lm.model, update, lm.quantized)
    _CACHE["applied"] = len(bundles)
    base_from, base_to = ins.extra.get("base_from", len(bundles)), ins.extra.get("base_to", len(bundles))
    if len(bundles) == base_from and ins.base_update and base_to > base_from:
        apply_base_update(lm.model, ins.base_update, lm.quantized)
        node["bundles"].append(updates_to_plain(ins.base_update))
        _CACHE["applied"] = len(node["bundles"])
    if len(node["bundles"]) not in (base_from, base_to):
        reply = failed_reply(ins.client_id, ins.round, f"base model out of sync: holds {len(node['bundles'])} "
                                                       f"base update(s), the instructions build on {base_from}")
    else:
        ctx = ClientContext(_CACHE["cfg"], lm, examples, node["client"],
                            keep_optimizer_state=_CACHE["cfg"].sim.keep_optimizer_state)
        reply = run_phase(ctx, ins)
        node["client"] = ctx.state
    _keep_node_state(context, node)
    up = uplink_encoding(cfg)  # client.encoding, or the compressor's own (compress in client.pipeline)
    try:
        out = list(reply_to_frames(reply, meta.get("phase", ins.phase), up))
    except ValueError as e:  # the encoding cannot carry this update: say so instead
        reply = failed_reply(ins.client_id, ins.round, f"cannot encode the update as {up}: {e}")
        out = list(reply_to_frames(reply, ins.phase, up))
    return Message(frames_to_content(out, {"held": len(node["bundles"])}), reply_to=msg)
