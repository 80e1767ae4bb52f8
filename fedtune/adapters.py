"""Adapter state: the one module that reads, writes, compares and saves adapter tensors.

Every load checks for missing, unexpected and mis-shaped tensors (as PEFT's ``set_peft_model_state_dict``
should, but does not always). Keys follow ``fedtune.types``: PEFT state-dict names without the adapter name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune.types import State

if TYPE_CHECKING:
    from peft import PeftModel

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


class AdapterStateError(ValueError):
    """Adapter tensors that do not fit the model: names every missing, unexpected and mis-shaped key."""


def lora_pairs(state: State | dict[str, object]) -> dict[str, tuple[str, str]]:
    """Group LoRA factor names by layer: ``{layer_prefix: (a_key, b_key)}``, in key order.

    Only layers that have both factors in ``state`` are returned (``ffa`` sends only B; its A comes from
    the shared seed and is looked up in the full state).
    """
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if key.endswith(A_SUFFIX):
            prefix = key[: -len(A_SUFFIX)]
            if prefix + B_SUFFIX in state:
                pairs[prefix] = (key, prefix + B_SUFFIX)
    return pairs


def _adapter_name(model: torch.nn.Module) -> str:
    return getattr(model, "active_adapter", "default") or "default"


def get_state(model: PeftModel, trainable_only: bool = True) -> State:
    """The adapter tensors of ``model`` (detached CPU copies), keyed without the adapter name.

    With ``trainable_only`` the frozen parts (a frozen-A LoRA's A, VeRA's shared projections) are left out:
    they are rebuilt from the shared seed on every site and never travel.
    """
    from peft import get_peft_model_state_dict

    name = _adapter_name(model)
    full = get_peft_model_state_dict(model, adapter_name=name)
    if not trainable_only:
        return {k: v.detach().to("cpu", copy=True) for k, v in full.items()}
    trainable = _trainable_keys(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in full.items() if k in trainable}


def _strip(param_name: str, adapter: str) -> str:
    """A live parameter's name as ``get_peft_model_state_dict`` keys it: without the adapter name, and a
    trained copy of a ``modules_to_save`` module (a classifier head) under that module's own name."""
    name = param_name.replace(f".modules_to_save.{adapter}.", ".")
    return name.replace(f".{adapter}.", ".").replace(f".{adapter}", "")


def param_by_key(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's live adapter parameters (and buffers unless ``trainable_only``) keyed as in ``get_state``."""
    name = _adapter_name(model)
    out: dict[str, torch.Tensor] = {}
    for param_name, param in model.named_parameters():
        if param.requires_grad or not trainable_only:
            out[_strip(param_name, name)] = param
    if not trainable_only:
        for buf_name, buf in model.named_buffers():
            out.setdefault(_strip(buf_name, name), buf)
    return out


def _trainable_keys(model: PeftModel) -> set[str]:
    return set(param_by_key(model, trainable_only=True))


def expected_shapes(model: PeftModel, trainable_only: bool = True) -> dict[str, tuple[int, ...]]:
    """Names and shapes ``set_state`` accepts for this model."""
    return {k: tuple(v.shape) for k, v in get_state(model, trainable_only).items()}


def check_state(state: State, expected: dict[str, tuple[int, ...]], *, partial: bool = False) -> None:
    """Raise ``AdapterStateError`` listing every missing, unexpected or mis-shaped tensor, and non-finite ones.

    With ``partial`` missing keys are allowed (a client may send a subset, e.g. only B).
    """
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing and not partial:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k]):
            problems.append(f"{k}: shape {tuple(v.shape)}, expected {tuple(expected[k])}")
        elif k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            problems.append(f"{k}: contains NaN or Inf")
    if problems:
        raise AdapterStateError("adapter state does not fit the model: " + "; ".join(problems))


def set_state(model: PeftModel, state: State, *, partial: bool = False) -> None:
    """Load ``state`` into the adapter of ``model`` in place, after checking names, shapes and finiteness.

    Raises:
        AdapterStateError: a tensor is missing (unless ``partial``), unexpected, mis-shaped or not finite.
    """
    trainable = _trainable_keys(model)
    trainable_only = all(k in trainable for k in state)
    check_state(state, expected_shapes(model, trainable_only=trainable_only), partial=partial)
    by_key = param_by_key(model, trainable_only=False)
    with torch.no_grad():
        for k, v in state.items():
            target = by_key[k]
            target.copy_(v.to(device=target.device, dtype=target.dtype))


def delta(new: State, old: State) -> State:
    """``new - old`` for every key of ``new`` (fp32)."""
    return {k: new[k].float() - old[k].float() for k in new}


def add(base: State, upd: State, scale: float = 1.0) -> State:
    """``base + scale * upd`` for every key of ``base`` (keys missing from ``upd`` are unchanged)."""
    return {k: (v.float() + scale * upd[k].float()) if k in upd else v.clone() for k, v in base.items()}


@dataclass(frozen=True)
class FlatSpec:
    """How a flat vector maps back to named tensors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]


def flatten(state: State) -> tuple[torch.Tensor, FlatSpec]:
    """One fp32 vector of every tensor in key order, and the spec to undo it."""
    names = tuple(state)
    vec = torch.cat([state[k].detach().float().reshape(-1) for k in names]) if names else torch.zeros(0)
    spec = FlatSpec(names, tuple(tuple(state[k].shape) for k in names), tuple(state[k].dtype for k in names))
    return vec, spec


def unflatten(vec: torch.Tensor, spec: FlatSpec) -> State:
    """Inverse of ``flatten``; raises ``AdapterStateError`` if the length does not match."""
    sizes = [math.prod(s) for s in spec.shapes]
    if vec.numel() != sum(sizes):
        raise AdapterStateError(f"flat vector has {vec.numel()} values, the spec needs {sum(sizes)}")
    out: State = {}
    for name, shape, dtype, chunk in zip(spec.names, spec.shapes, spec.dtypes, torch.split(vec, sizes), strict=True):
        out[name] = chunk.reshape(shape).to(dtype).clone()
    return out


def nbytes(state: State) -> int:
    """Size of the raw tensor data (what a dense encoding puts on the wire, before framing)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def num_params(state: State) -> int:
    return sum(v.numel() for v in state.values())


def save_adapter(model: PeftModel, folder: str | Path) -> Path:
    """Save the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Frozen parts (a frozen-A LoRA's A) are saved too, so ``PeftModel.from_pretrained`` reloads the exact
    adapter without fedtune.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    meta = {"saved_by": "fedtune"}
    (folder / "fedtune.json").write_text(json.dumps(meta))
    return folder


def merge_and_save(model: PeftModel, folder: str | Path) -> Path:
    """Merge the adapter into a copy of the base weights and save a full model folder.

    Raises:
        ValueError: the base is quantized (merging into 4/8-bit weights would lose the update); load the
            base with ``quant.mode=none`` to export a merged model.
    """
    if getattr(model.base_model.model, "is_quantized", False) or getattr(
        getattr(model.base_model.model, "config", None), "quantization_config", None
    ):
        raise ValueError("cannot merge into a quantized base: export with quant.mode=none, or export the adapter")
    folder = Path(folder)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(folder))
    return folder
