"""What a client does in each phase of a round: handlers keyed by the phase name the instructions carry.

The gRPC node loop (``fedtune.client.node``), the simulator's pools (in-process, forked workers) and the
Flower ClientApp all answer instructions with ``run_phase(ctx, ins)``, so a phase added here (secure
aggregation's advertise-keys, share-keys, masked-upload, unmask; a gossip exchange) works everywhere at once,
without touching any of those loops. The built-in phase is ``train``: ``fit`` then the update pipeline.

A handler works on a ``ClientContext``: the site's (or virtual client's) model, examples, config and its
per-client ``state``, a dict of plain values that outlives the phase and the round (kept optimizer state under
``"optimizer"``, the pipeline transforms' states under ``"pipeline"``, and whatever a phase needs to
remember for a later one, such as a secret key). Whoever runs the handler stores ``state`` afterwards: the
simulator's per-client store (checkpointed), or the node's state folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedtune.client.fit import client_seed, fit
from fedtune.client.pipeline import Transform, make_pipeline, run_pipeline
from fedtune.compression.link import HELD, REF_ROUND, receive_downlink
from fedtune.compression.mask import EXPLORE, mask_of, masked_reply, take_mask
from fedtune.compression.rank import MAX_RANK, pad
from fedtune.config import Config
from fedtune.models import LoadedModel
from fedtune.types import ClientReply, Instructions, failed_reply


@dataclass
class ClientContext:
    """One client as its phase handlers see it; ``state`` is theirs to read and update (plain values only)."""

    cfg: Config
    lm: LoadedModel
    examples: list[dict[str, Any]]
    state: dict[str, Any] = field(default_factory=dict)
    keep_optimizer_state: bool = False
    """Keep the local optimizer's state across rounds (``sim.keep_optimizer_state``; simulation only)."""
    pipeline: list[tuple[str, Transform]] | None = None
    """The update pipeline; None: built from ``cfg.client.pipeline`` on first use."""


PhaseHandler = Callable[[ClientContext, Instructions], ClientReply]


def train_seed(ctx: ClientContext, ins: Instructions) -> int:
    """The training seed the instructions carry (``extra["seed"]``, set by the round driver); without one, a
    seed of this client's name and the round."""
    given = ins.extra.get("seed")
    return int(given) if given is not None else client_seed(ctx.cfg.seed, ins.round, zlib.crc32(ins.client_id.encode()))


def finish_train(ctx: ClientContext, ins: Instructions, reply: ClientReply,
                 optimizer_state: dict[str, Any] | None) -> ClientReply:
    """After ``fit``: keep the optimizer state (if asked) and pass the reply through the update pipeline."""
    if ctx.keep_optimizer_state and optimizer_state is not None:
        ctx.state["optimizer"] = optimizer_state
    if ctx.pipeline is None:
        ctx.pipeline = make_pipeline(ctx.cfg)
    reply, ins = masked_reply(reply, ins)  # a global pruning mask: only its entries are sent
    if ctx.pipeline:
        reply, ctx.state["pipeline"] = run_pipeline(ctx.pipeline, reply, ins, ctx.state.get("pipeline", {}))
    return reply


def received(ctx: ClientContext, ins: Instructions) -> Instructions | ClientReply:
    """``ins`` as this client trains on it: with ``compress.downlink`` its state is (a delta from) the
    reference the client holds, rebuilt here; LoRA factors trimmed to a smaller rank are padded back to the
    adapter's (``extra["max_rank"]``); under a global pruning mask, ``ins.mask`` is the mask this client holds.
    A failed reply when any of that cannot be done."""
    if MAX_RANK in ins.extra:
        try:
            ins = dataclasses.replace(ins, state=pad(ins.state, int(ins.extra[MAX_RANK])))
        except ValueError as exc:
            return failed_reply(ins.client_id, ins.round, f"rank: {exc}")
    if ins.extra.get(REF_ROUND) is not None:  # first: a packed delta (compress.pack) names no tensor of the mask
        try:
            ins, ctx.state[HELD] = receive_downlink(ctx.state.get(HELD), ins, ctx.lm.initial, mask_of(ctx.state, ins))
        except ValueError as exc:
            ctx.state.pop(HELD, None)  # whatever it held is of no use now: the next round sends it in full
            return failed_reply(ins.client_id, ins.round, f"downlink: {exc}")
    masked = take_mask(ctx.state, ins)
    return failed_reply(ins.client_id, ins.round, masked) if isinstance(masked, str) else masked


def train_phase(ctx: ClientContext, ins: Instructions) -> ClientReply:
    """Local training from the instructions' global state (``fit``, seeded by ``train_seed``), then the update
    pipeline (``finish_train``)."""
    got = received(ctx, ins)
    if isinstance(got, ClientReply):
        return got
    ins = got
    keep = ctx.keep_optimizer_state
    reply, optimizer_state = fit(ctx.lm, ctx.examples, ctx.cfg, ins, seed=train_seed(ctx, ins),
                                 optimizer_state=ctx.state.get("optimizer") if keep else None,
                                 keep_optimizer_state=keep)
    return finish_train(ctx, ins, reply, optimizer_state)


PHASES: dict[str, PhaseHandler] = {"train": train_phase}
"""Handlers by phase name; ``register_phase`` adds one."""

PHASE_MODULES: dict[str, str] = {
    **{name: "fedtune.privacy.client"
       for name in ("secagg_advertise", "secagg_share", "secagg_upload", "secagg_unmask")},
    EXPLORE: "fedtune.compression.explore",
}
"""Modules that register the handlers of these phases when imported, loaded on first use (by name, so this
module does not depend on them)."""


def register_phase(name: str, handler: PhaseHandler) -> None:
    """Answer instructions of phase ``name`` with ``handler`` on every kind of client."""
    PHASES[name] = handler


def run_phase(ctx: ClientContext, ins: Instructions) -> ClientReply:
    """The reply to ``ins`` from the handler of its phase; a phase nobody handles is a failed reply."""
    handler = PHASES.get(ins.phase)
    if handler is None and ins.phase in PHASE_MODULES:
        importlib.import_module(PHASE_MODULES[ins.phase])
        handler = PHASES.get(ins.phase)
    if handler is None:
        return failed_reply(ins.client_id, ins.round,
                            f"this client has no handler for phase {ins.phase[:64]!r} "
                            f"(known: {', '.join(sorted(PHASES))}); is it an older fedtune?")
    return handler(ctx, ins)
