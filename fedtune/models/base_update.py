"""Apply updates of the frozen base weights (``flora``, ``fedex``) to a PEFT model.

On a non-quantized base the factored update ``B @ A`` is added to the weight of the adapted layer (in
nn.Linear's out x in orientation; transposed for GPT-2's Conv1D, ``fan_in_fan_out``). A quantized base
cannot absorb it without re-quantization error, so the factors are kept next to the quantized weight as a
frozen full-precision residual and added in the forward pass: it costs ``(d_out + d_in) * k * 4`` bytes per
layer, k growing with every round's stacked rank (``flora``) or residual rank (``fedex`` refuses
quantized bases instead).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from fedtune.config import Config
from fedtune.types import LowRankUpdate, State


class FrozenResidual(nn.Module):
    """Frozen ``x @ A^T @ B^T`` added to a quantized base layer's output; grows by concatenation."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("A", torch.zeros(0), persistent=True)
        self.register_buffer("B", torch.zeros(0), persistent=True)

    def extend(self, update: LowRankUpdate, device: torch.device) -> None:
        a, b = update.A.float().to(device), update.B.float().to(device)
        if self.A.numel() == 0:
            self.A, self.B = a, b
        else:
            self.A = torch.cat([self.A, a], 0)
            self.B = torch.cat([self.B, b], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.A.dtype) @ self.A.T) @ self.B.T).to(x.dtype)


def _hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    residual = cast(FrozenResidual, module.fedtune_residual)
    return output + residual(inputs[0])


def apply_base_update(model: nn.Module, updates: dict[str, LowRankUpdate], quantized: bool) -> int:
    """Fold each layer's ``B @ A`` into its base weight (or keep it as a frozen residual when quantized).

    Keys are LoRA layer prefixes (``...self_attn.q_proj``) as in ``fedtune.adapters.lora_pairs``. Returns the
    bytes the residuals now hold (0 on a non-quantized base).

    Raises:
        KeyError: a key names no adapted layer of ``model``.
        ValueError: a factor's shape does not fit the layer's weight.
    """
    modules = dict(model.named_modules())
    residual_bytes = 0
    for prefix, upd in updates.items():
        layer = modules.get(prefix)
        if layer is None:
            raise KeyError(f"base update for {prefix!r}: no such adapted layer in the model")
        base: Any = getattr(layer, "base_layer", layer)
        fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        out_f, in_f = upd.B.shape[0], upd.A.shape[1]
        weight = base.weight
        expected = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
        if not quantized and tuple(weight.shape) != expected:
            raise ValueError(f"base update for {prefix!r}: factors give {expected}, weight is {tuple(weight.shape)}")
        if quantized:
            if not hasattr(base, "fedtune_residual"):
                base.fedtune_residual = FrozenResidual()
                base.register_forward_hook(_hook)
            base.fedtune_residual.extend(upd, weight.device)
            residual_bytes += base.fedtune_residual.A.numel() * 4 + base.fedtune_residual.B.numel() * 4
        else:
            with torch.no_grad():
                dense = upd.B.float().to(weight.device) @ upd.A.float().to(weight.device)
                if fan_in_fan_out:
                    dense = dense.T
                weight.add_(dense.to(weight.dtype))
    return residual_bytes


def apply_round_result(lm: Any, cfg: Config, global_state: State, result: Any, applied_log: list[Any]) -> State:
    """Take a strategy's ``RoundResult`` into the coordinator's model and return the new global state.

    An applied round replaces the state and folds its base updates into the model (logged in
    ``applied_log`` so a resumed run can replay them); the global adapter is then loaded, at the global rank.
    """
    from fedtune.adapters import set_state
    from fedtune.models.loader import activate_rank

    if result.applied:
        global_state = result.state
        if result.base_update:
            apply_base_update(lm.model, result.base_update, lm.quantized)
            applied_log.append(result.base_update)
    activate_rank(lm.model, cfg, None)
    set_state(lm.model, global_state)
    return global_state
