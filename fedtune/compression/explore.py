"""The client's exploration phase of the global pruning mask (``fedtune.compression.mask``).

``mask.explore_steps`` local steps from the global state (the instructions' ``train`` says how many), then
the reply holds, per entry of every tensor it was sent, the score ``(theta_k - theta_0)^2``: how far this
client's data moved it. The trained values stay on the site. Importing this module registers the handler.
"""

from __future__ import annotations

import dataclasses

from fedtune.client.fit import fit
from fedtune.client.phases import ClientContext, register_phase, train_seed
from fedtune.compression.mask import EXPLORE
from fedtune.types import ClientReply, Instructions


def explore_phase(ctx: ClientContext, ins: Instructions) -> ClientReply:
    reply, _ = fit(ctx.lm, ctx.examples, ctx.cfg, ins, seed=train_seed(ctx, ins))
    if reply.state is None:
        return reply
    trained = reply.state
    scores = {k: (trained[k].float() - v.float()).square() for k, v in ins.state.items() if k in trained}
    return dataclasses.replace(reply, state=scores)


register_phase(EXPLORE, explore_phase)
