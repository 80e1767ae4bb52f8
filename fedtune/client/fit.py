"""One client's work in one round, shared by the simulator and the gRPC client node.

``fit`` loads the global adapter the server sent, trains locally per the round's training instructions
(the server's ``train.*`` with the strategy's overrides on top: steps, lr, FedProx mu...), and answers with
the new values of the trainable tensors. Only adapter tensors and scalar metrics leave the site; the data
never does.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fedtune.adapters import AdapterStateError, get_state, set_state
from fedtune.config import Config, ConfigError, TrainConfig, instructed_train, train_instructions
from fedtune.models import LoadedModel
from fedtune.models.loader import activate_rank
from fedtune.train import train_local
from fedtune.types import ClientReply, Instructions


def client_seed(seed: int, round: int, index: int) -> int:
    """The training seed of one client in one round: reproducible, different per client and round."""
    return (seed * 1_000_003 + round * 10_007 + index) % 2**31


def with_training(instructions: dict[str, Instructions], tcfg: TrainConfig) -> dict[str, Instructions]:
    """Each client's instructions with the coordinator's ``train.*`` (``tcfg``) under the strategy's overrides."""
    base = train_instructions(tcfg)
    return {cid: dataclasses.replace(ins, train={**base, **ins.train}) for cid, ins in instructions.items()}


def fit(
    lm: LoadedModel,
    examples: list[dict[str, Any]],
    cfg: Config,
    ins: Instructions,
    *,
    seed: int,
    optimizer_state: dict[str, Any] | None = None,
    keep_optimizer_state: bool = False,
) -> tuple[ClientReply, dict[str, Any] | None]:
    """Train on ``examples`` from the global state in ``ins`` and return the reply (and optimizer state).

    Never raises for a client-side problem: a state that does not fit, or a training error, becomes a
    failed reply with its reason (failures are data).
    """
    start = time.perf_counter()
    activate_rank(lm.model, cfg, ins.rank)
    try:
        set_state(lm.model, ins.state)
    except AdapterStateError as exc:
        return ClientReply(ins.client_id, ins.round, None, 0, error=f"cannot load the global adapter: {exc}"), None
    try:
        tcfg = instructed_train(cfg.train, ins.train or {})
    except ConfigError as exc:
        return ClientReply(ins.client_id, ins.round, None, 0,
                           error="bad training instructions: " + "; ".join(exc.problems)), None
    try:
        result = train_local(
            lm.model, examples, tcfg, device=lm.device, compute_dtype=lm.compute_dtype,
            pad_id=lm.tokenizer.pad_token_id, seed=seed, ref_state=ins.state if tcfg.prox_mu else None,
            optimizer_state=optimizer_state, keep_optimizer_state=keep_optimizer_state)
    except (RuntimeError, ValueError) as exc:
        return ClientReply(ins.client_id, ins.round, None, 0, error=f"local training failed: {exc}"), None
    metrics = {f"train_{k}": v for k, v in result.metrics.items()}
    metrics["fit_seconds"] = time.perf_counter() - start
    reply = ClientReply(client_id=ins.client_id, round=ins.round, state=get_state(lm.model),
                        num_examples=len(examples), metrics=metrics, rank=ins.rank)
    return reply, result.optimizer_state
