"""Load a base model (quantized through one dispatch point) and put a PEFT adapter on it.

Two sites given the same config and ``adapter.seed`` get identical adapter layouts and identical frozen
parts: LoRA A factors are drawn on the CPU from a generator seeded by (seed, layer name), whatever the device.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from fedtune.adapters import get_state
from fedtune.config import Config
from fedtune.models.registry import ModelSource, resolve

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    """A PEFT model ready to train, with what the rest of fedtune needs to know about it."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    device: torch.device
    quantized: bool
    compute_dtype: torch.dtype
    task: str
    source: ModelSource
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """The trainable adapter tensors as built at load time (every site builds the same from the seed), kept with
    ``compress.downlink``: the reference a client holds before round 1, so round 1 needs no full state."""


def pick_device(spec: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU.

    Raises:
        ValueError: ``model.device`` names CUDA on a machine without it.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device: {spec!r} asked for, but no CUDA device is available; use auto or cpu")
    return dev


def quantization_config(mode: str, double_quant: bool, compute_dtype: torch.dtype) -> Any | None:
    """The one dispatch point for weight quantization (bitsandbytes is imported only when used)."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=torch.uint8)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quant.mode: {mode!r} is not one of nf4, fp4, int8, none")


def effective_compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """``quant.compute_dtype``, except fp16 on a CPU, which becomes bf16 (CPU kernels lack fp16 matmuls)."""
    dtype = DTYPES[cfg.quant.compute_dtype]
    return torch.bfloat16 if dtype == torch.float16 and device.type == "cpu" else dtype


def load_base(cfg: Config, num_labels: int | None = None) -> tuple[Any, Any, ModelSource, torch.device, bool]:
    """Load tokenizer and base model per ``cfg.model`` and ``cfg.quant`` (frozen, not yet adapted)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    mcfg, qcfg = cfg.model, cfg.quant
    device = pick_device(mcfg.device)
    source = resolve(mcfg.name, mcfg.gguf_file)
    compute_dtype = effective_compute_dtype(cfg, device)
    quant = quantization_config(qcfg.mode, qcfg.double_quant, compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=mcfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"trust_remote_code": mcfg.trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None
                                else str(device)}
        kwargs["dtype"] = compute_dtype
    else:
        # Frozen weights in the compute dtype (bf16 halves memory); the adapter itself stays fp32.
        kwargs["dtype"] = compute_dtype
    if mcfg.task == "seq_cls":
        kwargs["num_labels"] = num_labels or mcfg.num_labels or 2
        with torch.random.fork_rng(devices=[]):  # the new head's initial weights: the same on every site and run
            torch.manual_seed(cfg.adapter.seed)
            model = AutoModelForSequenceClassification.from_pretrained(source.path, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if quant is None:
        model.to(device)
    else:
        _keep_4bit_trainable_on_cpu(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer, source, device, quant is not None


def _keep_4bit_trainable_on_cpu(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight to a CPU-only packed format
    on the first forward pass without gradients (an evaluation); no gradient flows through the layer after
    that, so every LoRA B on top of it stays at zero. Evaluation before training is part of every round,
    so the conversion is turned off (CUDA is not affected).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def peft_config(cfg: Config, task: str, rank: int | None = None) -> Any:
    """The peft config for ``cfg.adapter`` (LoRA, rsLoRA, DoRA, VeRA, or LoRA with frozen A)."""
    from peft import LoraConfig, TaskType, VeraConfig

    a = cfg.adapter
    r = rank or a.r
    targets: Any = "all-linear" if a.target_modules == ["all-linear"] else list(a.target_modules)
    task_type = TaskType.SEQ_CLS if task == "seq_cls" else TaskType.CAUSAL_LM
    if a.method == "vera":
        return VeraConfig(r=r, target_modules=targets, vera_dropout=a.dropout, projection_prng_key=a.seed,
                          save_projection=True, task_type=task_type)
    # peft annotates lora_alpha as int, but it only scales (alpha / r): a float alpha is kept as it is
    return LoraConfig(r=r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,  # type: ignore[arg-type]
                      use_rslora=a.method == "rslora", use_dora=a.method == "dora", task_type=task_type)


def seeded_lora_init(model: nn.Module, seed: int, only: str | None = None) -> None:
    """Draw every LoRA A from a CPU generator seeded by (seed, layer name), B = 0: same on every site and device.

    Matches peft's default init in distribution (kaiming-uniform with a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))).
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            lora_b = getattr(module, "lora_B", None)
            if not isinstance(lora_a, nn.ModuleDict):
                continue
            for adapter_name, layer in lora_a.items():
                if only is not None and adapter_name != only:
                    continue
                w = cast(torch.Tensor, layer.weight)
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                bound = 1.0 / (w.shape[1] ** 0.5)
                w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1).mul_(bound).to(w.dtype))
                if isinstance(lora_b, nn.ModuleDict):
                    cast(torch.Tensor, lora_b[adapter_name].weight).zero_()


def attach_adapter(base: Any, cfg: Config, task: str, rank: int | None = None) -> Any:
    """Wrap ``base`` in a PeftModel per ``cfg.adapter``; with ``lora_fa`` only B is trainable."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.adapter.seed)
        model = get_peft_model(base, peft_config(cfg, task, rank))
    if cfg.adapter.method != "vera":
        seeded_lora_init(model, cfg.adapter.seed)
    if cfg.adapter.method == "lora_fa":
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def activate_rank(model: Any, cfg: Config, rank: int | None) -> str:
    """Make the adapter of ``rank`` active (heterogeneous-rank federations), creating it on first use.

    Every rank lives as its own named adapter on the same base (``default`` is ``adapter.r``), so one
    process can play clients of different ranks without another copy of the base model.
    """
    name = "default" if rank is None or rank == cfg.adapter.r else f"rank{rank}"
    if name not in model.peft_config:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.adapter.seed)
            model.add_adapter(name, peft_config(cfg, cfg.model.task, rank))
        if cfg.adapter.method != "vera":
            seeded_lora_init(model, cfg.adapter.seed, only=name)
    if model.active_adapter != name:
        model.set_adapter(name)
    if cfg.adapter.method == "lora_fa":
        for pname, p in model.named_parameters():
            if ".lora_A." in pname:
                p.requires_grad_(False)
    return name


def load_model(cfg: Config, num_labels: int | None = None) -> LoadedModel:
    """Base model + adapter per the config: what ``fedtune train`` and every client use.

    Raises:
        ModelNotFoundError: ``model.name`` cannot be found offline.
        ValueError: a bad device or quantization choice.
    """
    base, tokenizer, source, device, quantized = load_base(cfg, num_labels)
    model = attach_adapter(base, cfg, cfg.model.task)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, quantized=quantized,
                       compute_dtype=effective_compute_dtype(cfg, device), task=cfg.model.task, source=source,
                       initial=get_state(model) if cfg.compress.downlink else {})
