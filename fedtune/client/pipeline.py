"""The client update pipeline: what happens to a client's update between local training and the wire.

Every client (a gRPC node, a simulated client in any pool, a Flower actor) runs the same steps after ``fit``:

1. the transforms named in ``client.pipeline``, in that order (clipping, DP noise, compression with error
   feedback, secure-aggregation masking: later issues add them with ``register_transform``);
2. the wire encoding ``client.encoding`` (``fedtune.transport.encodings``: dense, bf16, int8 blocks, sparse,
   fixed point), applied by the transport on a node and by the simulator's dispatcher, which also decodes,
   so a lossy encoding changes a simulated run exactly as it changes a real one. The server's downlink uses
   the same encoding.

A transform may keep per-client state across rounds (an error-feedback residual, a DP accountant's share):
plain tensors, handed in and returned by ``apply``, never kept on the transform object. In the simulator that
state lives in the per-client store beside optimizer states and is checkpointed with the run; on a real
node it lives in the node's state folder (``<out>/client_state.pt``, written atomically). Server and nodes
must agree on ``client.pipeline`` and ``client.encoding``: both are part of the registration fingerprint.

This module imports no torch (the config system checks ``client.pipeline`` names against ``TRANSFORMS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.types import ClientReply, Instructions, State


class Transform(Protocol):
    """One step of the pipeline. ``apply`` must not keep state on the object: all of it is in ``state``.

    ``reply`` holds the values of the trained tensors (``ClientReply.state``, optionally ``mask``); ``ins`` the
    instructions it answers (the global state the client started from is ``ins.state``: the update is the
    difference). ``state`` is what this transform returned for this client last time (empty the first time).
    Returns the transformed reply and the new state. A ``ValueError`` becomes a failed reply.
    """

    def apply(self, reply: ClientReply, ins: Instructions, state: State) -> tuple[ClientReply, State]: ...


TransformFactory = Callable[[Any], Transform]
"""Builds a transform from the run config (its own section, e.g. ``compress.*``)."""

def _compress(cfg: Any) -> Transform:
    from fedtune.compression.feedback import (
        CompressTransform,  # torch: only when a client builds its pipeline
    )

    return CompressTransform(cfg.compress)


def _rank_prune(cfg: Any) -> Transform:
    from fedtune.compression.rank import RankPruneTransform

    return RankPruneTransform(cfg)


TRANSFORMS: dict[str, TransformFactory] = {"compress": _compress, "rank_prune": _rank_prune}
"""Registered transforms by the name ``client.pipeline`` lists: ``compress`` (``compress.*``, with error feedback:
``fedtune.compression``) and ``rank_prune`` (``compress.energy``: each LoRA layer at its energy rank) are
built in."""


def register_transform(name: str, factory: TransformFactory) -> None:
    """Make ``name`` available to ``client.pipeline``."""
    TRANSFORMS[name] = factory


def pipeline_problems(names: list[str]) -> list[str]:
    """Config problems of ``client.pipeline``, each naming the key (empty when every name is registered)."""
    valid = ", ".join(sorted(TRANSFORMS)) or "none registered yet"
    problems = [f"client.pipeline: unknown transform {n!r}; valid: {valid}" for n in names if n not in TRANSFORMS]
    problems += [f"client.pipeline: {n!r} is listed twice (a transform keeps one state per client)"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    return problems


def make_pipeline(cfg: Config) -> list[tuple[str, Transform]]:
    """The transforms of ``cfg.client.pipeline``, in order, with their names (the keys of their state)."""
    return [(name, TRANSFORMS[name](cfg)) for name in cfg.client.pipeline]


def run_pipeline(
    pipeline: list[tuple[str, Transform]], reply: ClientReply, ins: Instructions,
    states: Mapping[str, State],
) -> tuple[ClientReply, dict[str, State]]:
    """Pass ``reply`` through every transform; returns it and each transform's new state (by name).

    A failed reply passes untouched (its states too); a transform that raises ``ValueError`` turns the reply
    into a failed one naming it, and the states of that round are not updated.
    """
    new_states = dict(states)
    if reply.error is not None or not pipeline:
        return reply, new_states
    for name, transform in pipeline:
        try:
            reply, new_states[name] = transform.apply(reply, ins, states.get(name, {}))
        except ValueError as exc:
            failed = dataclasses.replace(reply, state=None, mask=None, error=f"update pipeline step {name!r}: {exc}")
            return failed, dict(states)
    return reply, new_states
