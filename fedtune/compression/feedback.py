"""The ``compress`` transform of the client update pipeline: compression with error feedback.

The update is the trained values minus the global state the client started from. Each round the client
compresses update + residual (``compressors.compress``), sends that as a delta, and keeps the rest as its new
residual, in float64: sent + new residual = update + old residual (a property test checks it; exact for the
sparsifiers and the quantizers with rounding to nearest, to float64 rounding for sign and stochastic rounding).
The residual is the transform's per-client state (the simulator's client store, the node's state folder),
checkpointed with them; ``compress.error_feedback = false`` keeps none.
"""

from __future__ import annotations

import dataclasses

import torch

from fedtune.compression.compressors import compress_state
from fedtune.compression.config import CompressConfig
from fedtune.types import ClientReply, Instructions, State


class CompressTransform:
    """Replaces a reply's values by the compressed delta from ``ins.state`` (``reply.delta`` set)."""

    def __init__(self, c: CompressConfig) -> None:
        self.c = c

    def apply(self, reply: ClientReply, ins: Instructions, state: State) -> tuple[ClientReply, State]:
        if reply.state is None or reply.delta:
            return reply, state
        acc: dict[str, torch.Tensor] = {}
        for name, t in reply.state.items():
            base = ins.state.get(name)
            if base is None or base.shape != t.shape:
                raise ValueError(f"tensor {name!r} has no global counterpart of shape {tuple(t.shape)} to take a "
                                 "delta from")
            acc[name] = t.double() - base.double()
            old = state.get(name)
            if old is not None and self.c.error_feedback:
                if old.shape != t.shape:
                    raise ValueError(f"the error-feedback residual of {name!r} has shape {tuple(old.shape)}, "
                                     f"the update {tuple(t.shape)}")
                acc[name] += old
        if self.c.pack and set(acc) != set(ins.state):
            raise ValueError(f"compress.pack sends every tensor the server sent; the update has {len(acc)} of "
                             f"{len(ins.state)}")
        sent, full = compress_state(acc, self.c, int(ins.extra.get("seed", ins.round)))
        residual = {n: acc[n] - full[n].double() for n in acc} if self.c.error_feedback else {}
        return dataclasses.replace(reply, state=sent, delta=True), residual
