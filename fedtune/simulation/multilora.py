"""K clients' LoRA adapters on one shared base model, trained in one forward and backward pass.

``MultiLoRA`` gives each of K slots its own copy of every LoRA factor of the model's active adapter and, while
``active`` (a context manager), replaces the forward of each adapted linear layer by a batched one: the input
is the slots' micro-batches side by side (rows ``[0, n_0)`` belong to the first active slot, the next ``n_1``
rows to the second...); the frozen base projection runs once on all of it (so each base weight is read, and
for NF4 dequantized, once per K clients) and the LoRA path runs per slot with batched matmuls::

    y = base(x) + s_k * (x_k @ A_k^T) @ B_k^T        A: K x r x d_in, B: K x d_out x r (stacked), s: K

A slot's factors are leaf tensors of their own, stacked in each forward. Each slot therefore has its own
gradients, and a plain ``torch.optim`` optimizer, ``clip_grad_norm_`` and learning-rate scheduler over its
parameter list behave exactly as in ``fedtune.train.train_local`` for one client; the slot parameter list is in
the order of the model's trainable parameters, so its optimizer state dict is the one a sequential run keeps.
The stack copies ``K r (d_in + d_out)`` values per layer and step, small next to the activations.

Slot state is read and written with ``get_state`` / ``set_state`` semantics: the keys of
``fedtune.adapters.get_state`` (PEFT names without the adapter name), checked for missing, unexpected,
mis-shaped and non-finite tensors. The model's own adapter weights are never touched.

Only vanilla LoRA factors on linear layers can be batched (``lora``, ``rslora``, ``lora_fa``); DoRA and VeRA
change the layer's computation and other trainable tensors (a classifier head) are not per slot:
``unsupported`` says why, and the caller trains those clients one after another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedtune.adapters import _adapter_name, check_state, param_by_key
from fedtune.loss import split_loss_supported
from fedtune.types import State


@dataclass
class _Layer:
    module: Any  # a peft LoraLayer (lora.Linear, lora.bnb.Linear4bit / Linear8bitLt)
    a_key: str
    b_key: str
    scaling: float
    dropout: nn.Module


def _layers(model: nn.Module) -> tuple[list[_Layer], str | None]:
    """The model's batchable LoRA layers, or the reason why the adapter cannot be batched."""
    adapter = _adapter_name(model)
    config = getattr(model, "peft_config", {}).get(adapter)
    kind = type(config).__name__ if config is not None else "no peft adapter"
    if config is None or kind != "LoraConfig":
        return [], f"adapter type {kind} is not LoRA (VeRA and others change the layer's computation)"
    if getattr(config, "use_dora", False):
        return [], "DoRA rescales the base weight per adapter (a per-slot weight norm)"
    names = {id(p): k for k, p in param_by_key(model, trainable_only=False).items()}
    layers: list[_Layer] = []
    for _, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        a, b = lora_a[adapter], module.lora_B[adapter]
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or a.bias is not None or b.bias is not None:
            return [], f"{type(module).__name__} layers with {type(a).__name__} factors (only linear LoRA batches)"
        if adapter in getattr(module, "lora_variant", {}):
            return [], f"LoRA variant {type(module.lora_variant[adapter]).__name__} changes the layer's computation"
        layers.append(_Layer(module, names[id(a.weight)], names[id(b.weight)], float(module.scaling[adapter]),
                             module.lora_dropout[adapter]))
    if not layers:
        return [], "the model has no LoRA layers"
    covered = {key for layer in layers for key in (layer.a_key, layer.b_key)}
    other = [k for k in param_by_key(model) if k not in covered]
    if other:
        return [], f"trainable tensors outside LoRA factors ({', '.join(other[:3])}) are not per slot"
    return layers, None


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot train clients in slots: its active adapter is not plain LoRA, or the model is not a
    plain decoder LM (the per-client losses need one); None when it can."""
    reason = _layers(model)[1]
    if reason is None and not split_loss_supported(model):
        reason = "the model is not a plain decoder LM (per-client losses need one)"
    return reason


class MultiLoRA:
    """``k`` adapter slots over ``model`` (a PeftModel whose active adapter ``unsupported`` accepts).

    Raises:
        ValueError: the adapter cannot be batched (the message says why) or ``k`` < 1.
    """

    def __init__(self, model: nn.Module, k: int):
        layers, reason = _layers(model)
        if reason is not None:
            raise ValueError(f"cannot batch clients on this adapter: {reason}")
        if k < 1:
            raise ValueError(f"need at least one slot, got {k}")
        self.model, self.layers, self.k = model, layers, k
        live = param_by_key(model, trainable_only=False)
        trainable = param_by_key(model)
        self.trainable_keys = list(trainable)  # model order: the order of a sequential run's optimizer
        self.factor_keys = [key for layer in layers for key in (layer.a_key, layer.b_key)]
        self.shapes = {key: tuple(live[key].shape) for key in self.factor_keys}
        self.slots: list[dict[str, nn.Parameter]] = [
            {key: nn.Parameter(live[key].detach().clone(), requires_grad=key in trainable) for key in self.factor_keys}
            for _ in range(k)]
        self.active_slots: list[int] = []
        self.rows: list[int] = []

    # ------------------------------------------------------------------ slot state

    def set_slot_state(self, k: int, state: State) -> None:
        """Load ``state`` into slot ``k`` (as ``set_state`` loads a model: every trainable key, or a superset
        with frozen factors; checked before anything is written).

        Raises:
            AdapterStateError: a tensor is missing, unexpected, mis-shaped or not finite.
        """
        trainable_only = all(key in self.trainable_keys for key in state)
        expected = {key: self.shapes[key] for key in (self.trainable_keys if trainable_only else self.factor_keys)}
        check_state(state, expected)
        with torch.no_grad():
            for key, value in state.items():
                target = self.slots[k][key]
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def get_slot_state(self, k: int) -> State:
        """Slot ``k``'s trainable tensors as ``get_state`` returns a model's (detached CPU copies, model order)."""
        return {key: self.slots[k][key].detach().to("cpu", copy=True) for key in self.trainable_keys}

    def slot_parameters(self, k: int) -> list[nn.Parameter]:
        """Slot ``k``'s trainable tensors in the model's parameter order (what its optimizer gets)."""
        return [self.slots[k][key] for key in self.trainable_keys]

    def slot_tensor(self, k: int, key: str) -> torch.Tensor:
        return self.slots[k][key]

    # ------------------------------------------------------------------ batched forward

    def set_batch(self, slots: Sequence[int], rows: Sequence[int]) -> None:
        """The next forward's input holds ``rows[i]`` rows of slot ``slots[i]``, in this order."""
        if len(slots) != len(rows) or not slots:
            raise ValueError("set_batch needs one row count per slot, and at least one slot")
        self.active_slots, self.rows = list(slots), list(rows)

    def _lora(self, layer: _Layer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The LoRA path of one layer for the active slots' rows of ``x`` (batch x ... x d_in)."""
        slots, rows = self.active_slots, self.rows
        if x.shape[0] != sum(rows):
            raise RuntimeError(f"batched LoRA: the input has {x.shape[0]} rows, the slots {sum(rows)}")
        a = torch.stack([self.slots[k][layer.a_key] for k in slots])  # K x r x d_in
        b = torch.stack([self.slots[k][layer.b_key] for k in slots])  # K x d_out x r
        scale = torch.full((len(slots), 1, 1), layer.scaling, dtype=a.dtype, device=a.device)
        h = layer.dropout(x.to(dtype))
        if len(set(rows)) == 1:  # equal micro-batches: one bmm per factor
            h = h.reshape(len(slots), -1, h.shape[-1])
            out = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2) * scale)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        parts = torch.split(h, rows)  # a client with fewer examples than the batch size: ragged slots
        outs = [(p @ a[i].T) @ (b[i].T * layer.scaling) for i, p in enumerate(parts)]
        return torch.cat(outs)

    def _forward(self, layer: _Layer) -> Any:
        module = layer.module

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = module.base_layer(x, *args, **kwargs)
            a_dtype = self.slots[self.active_slots[0]][layer.a_key].dtype
            lora = self._lora(layer, x, a_dtype)
            return (result + lora.to(result.dtype)) if torch.is_autocast_enabled() else \
                (result + lora).to(result.dtype)

        return forward

    @contextmanager
    def active(self) -> Iterator[MultiLoRA]:
        """Within the block the model's adapted layers compute with the slots (see ``set_batch``)."""
        for layer in self.layers:
            layer.module.forward = self._forward(layer)
        try:
            yield self
        finally:
            for layer in self.layers:
                del layer.module.forward  # back to the class's forward
