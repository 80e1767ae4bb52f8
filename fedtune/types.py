"""Plain data that crosses module boundaries: what a server asks of a client and what the client answers.

Adapter state is always ``dict[str, torch.Tensor]`` keyed by PEFT state-dict names with the adapter name
removed, as ``peft.get_peft_model_state_dict`` returns them, for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. A LoRA layer is the prefix before
``.lora_A.weight`` / ``.lora_B.weight``; ``lora_A`` is (r x d_in) and ``lora_B`` is (d_out x r), so the
update of that layer is ``scale * B @ A`` in nn.Linear's (out x in) orientation.

Protobuf never appears here: the transport converts these to and from the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LowRankUpdate:
    """A dense update of one base weight kept in factored form: ``dW = B @ A`` (scale already folded in).

    Strategies that change the frozen base weights (``flora``, ``fedex``) return these; a client with a
    non-quantized base adds ``B @ A`` to the weight, one with a quantized base keeps the factors as a frozen
    full-precision residual next to the quantized weight.
    """

    B: torch.Tensor  # d_out x k
    A: torch.Tensor  # k x d_in


def updates_to_plain(updates: Mapping[str, LowRankUpdate]) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: LowRankUpdate}`` as plain ``{layer: {"B": ..., "A": ...}}`` (checkpoints, state dicts)."""
    return {layer: {"B": u.B, "A": u.A} for layer, u in updates.items()}


def updates_from_plain(plain: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, LowRankUpdate]:
    """The inverse of ``updates_to_plain``."""
    return {layer: LowRankUpdate(B=u["B"], A=u["A"]) for layer, u in plain.items()}


@dataclass(frozen=True)
class Instructions:
    """What one client is asked to do in one phase of one round."""

    round: int
    client_id: str
    state: State
    """Global adapter tensors to load before training (trainable ones; frozen parts are rebuilt from the seed)."""
    train: dict[str, Any] = field(default_factory=dict)
    """This round's ``train.*`` instructions: the coordinator's section under the strategy's overrides."""
    rank: int | None = None
    """Rank this client trains at (heterogeneous-rank strategies); ``None`` keeps the configured rank."""
    mask: State | None = None
    """Boolean masks of coordinates the client may send (sparse or masked aggregation)."""
    base_update: dict[str, LowRankUpdate] | None = None
    """Pending updates of frozen base weights keyed by module name (``flora``, ``fedex``)."""
    phase: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientReply:
    """A client's answer to ``Instructions``. A failed or rejected reply keeps ``error`` and no state.

    ``state`` holds the *values* of the trainable tensors after local training (not deltas). When ``mask``
    is given, only the masked coordinates were sent; the others are to be read as unchanged.
    """

    client_id: str
    round: int
    state: State | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    mask: State | None = None
    rank: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    delta: bool = False
    """``state`` holds a compressed delta from the instructions' state (``fedtune.compression``), not values;
    it travels as tensor group ``delta`` and the server rebuilds the values before aggregating."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.state is not None


def failed_reply(client_id: str, round: int, reason: str) -> ClientReply:
    """A reply that records why a client did not contribute (failures are data, not exceptions)."""
    return ClientReply(client_id=client_id, round=round, state=None, num_examples=0, error=reason)
