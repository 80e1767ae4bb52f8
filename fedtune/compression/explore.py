"""The client's exploration phase of the global pruning mask (``fedtune.compression.mask``).

``mask.explore_steps`` local steps from the global state (the instructions' ``train`` says how many), then
the reply holds one importance score per entry of every tensor it was sent (``extra["mask_score"]``):

- ``update``: ``(theta_k - theta_0)^2``, how far this client's data moved the entry;
- ``grad_weight``: ``|grad * theta_k|`` at the explored weights, on one batch of the client's examples (the
  first-order loss change of zeroing the entry).

The trained values stay on the site. Importing this module registers the handler.
"""

from __future__ import annotations

import dataclasses

import torch

from fedtune.adapters import param_by_key
from fedtune.client.fit import fit
from fedtune.client.phases import ClientContext, register_phase, train_seed
from fedtune.compression.mask import EXPLORE, SCORE
from fedtune.loss import answer_loss
from fedtune.train import batches
from fedtune.types import ClientReply, Instructions, State


def grad_weight(ctx: ClientContext, names: list[str], seed: int) -> State:
    """``|grad * weight|`` of the named trainable tensors on one batch of the client's examples."""
    model, lm = ctx.lm.model, ctx.lm
    params = param_by_key(model)
    batch = next(batches(ctx.examples, ctx.cfg.train.batch_size, lm.tokenizer.pad_token_id, seed))
    model.zero_grad(set_to_none=True)
    answer_loss(model, {k: v.to(lm.device) for k, v in batch.items()}).float().backward()
    out = {}
    for k in names:
        p = params[k]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[k] = (grad.float() * p.detach().float()).abs().cpu()
    model.zero_grad(set_to_none=True)
    return out


def explore_phase(ctx: ClientContext, ins: Instructions) -> ClientReply:
    seed = train_seed(ctx, ins)
    reply, _ = fit(ctx.lm, ctx.examples, ctx.cfg, ins, seed=seed)
    if reply.state is None:
        return reply
    trained = reply.state
    names = [k for k in ins.state if k in trained]
    if ins.extra.get(SCORE) == "grad_weight":
        return dataclasses.replace(reply, state=grad_weight(ctx, names, seed))
    return dataclasses.replace(reply, state={k: (trained[k].float() - ins.state[k].float()).square() for k in names})


register_phase(EXPLORE, explore_phase)
