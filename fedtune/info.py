"""``fedtune info``: will this site fit? Parameters, quantized weight memory, adapter size, training memory.

The model is built on the meta device (no weights are read), the adapter is attached there, and memory is
estimated from shapes: quantized linear weights (4 bits + one fp32 absmax per 64 values, or 8 bits), the
rest at the compute dtype, gradients and AdamW state for the adapter, and activations per layer
(Korthikanti et al. 2022: about 34 * s * b * h + 5 * a * s^2 * b bytes per layer at 16 bits without
recomputation; about 2 * s * b * h per layer plus one layer's worth with gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.config import Config

BITS = {"nf4": 4, "fp4": 4, "int8": 8}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class ModelInfo:
    params: int
    trainable: int
    weight_bytes: int
    adapter_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.adapter_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes


def _meta_model(cfg: Config, num_labels: int | None) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.models.registry import resolve

    source = resolve(cfg.model.name, cfg.model.gguf_file)
    hf_cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights():
        if cfg.model.task == "seq_cls":
            hf_cfg.num_labels = num_labels or cfg.model.num_labels or 2
            return AutoModelForSequenceClassification.from_config(hf_cfg), hf_cfg
        return AutoModelForCausalLM.from_config(hf_cfg), hf_cfg


def estimate(cfg: Config, num_labels: int | None = None) -> ModelInfo:
    """Memory and size estimates for ``cfg`` without loading any weights."""
    from peft import get_peft_model

    from fedtune.models.loader import peft_config

    base, hf_cfg = _meta_model(cfg, num_labels)
    dtype_bytes = DTYPE_BYTES[cfg.quant.compute_dtype]
    bits = BITS.get(cfg.quant.mode)
    weight_bytes = 0
    params = 0
    seen: set[int] = set()
    for name, module in base.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (embeddings and lm_head) are stored once
                continue
            seen.add(id(p))
            n = p.numel()
            params += n
            quantizable = isinstance(module, torch.nn.Linear) and pname == "weight" and "lm_head" not in name \
                and "classifier" not in name and "score" not in name
            if bits and quantizable:
                weight_bytes += n * bits // 8 + (n // 64) * 4 if bits == 4 else n + (p.shape[0] * 4)
            else:
                weight_bytes += n * dtype_bytes
    model = get_peft_model(base, peft_config(cfg, cfg.model.task))
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad
                    and not (cfg.adapter.method == "lora_fa" and ".lora_A." in n))
    adapter_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "vera_" in n)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    h = getattr(hf_cfg, "hidden_size", 768)
    layers = getattr(hf_cfg, "num_hidden_layers", 12)
    heads = getattr(hf_cfg, "num_attention_heads", 12)
    act_16 = 34 * s * b * h + 5 * heads * s * s * b
    if cfg.model.gradient_checkpointing:
        activation = layers * 2 * s * b * h + act_16
    else:
        activation = layers * act_16
    vocab = getattr(hf_cfg, "vocab_size", 0)
    activation += b * s * vocab * 4 * 2 if cfg.model.task == "causal_lm" else 0  # fp32 logits and their grad
    optimizer_bytes = trainable * 8 if cfg.train.optimizer == "adamw" else trainable * 2 if "8bit" in cfg.train.optimizer else 0
    return ModelInfo(params=params, trainable=trainable, weight_bytes=weight_bytes, adapter_bytes=adapter_total * 4,
                     grads_bytes=trainable * 4, optimizer_bytes=optimizer_bytes, activation_bytes=activation)


def batch_clients_that_fit(info: ModelInfo, budget_bytes: int) -> int:
    """The largest ``sim.batch_clients`` whose estimate fits in ``budget_bytes``: the base weights once, and
    per client in the batch its adapter, gradients, optimizer state and activations (0: not even one)."""
    per_client = info.adapter_bytes + info.grads_bytes + info.optimizer_bytes + info.activation_bytes
    return max(0, (budget_bytes - info.weight_bytes) // max(1, per_client))


def available_bytes(device: str) -> tuple[int, str]:
    """Memory free for training on ``model.device`` now, and where it was read (CUDA free memory, or the
    system's MemAvailable)."""
    if (device.startswith("cuda") or device == "auto") and torch.cuda.is_available():
        index = torch.device(device if device != "auto" else "cuda").index or 0
        return int(torch.cuda.mem_get_info(index)[0]), f"free on cuda:{index}"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024, "available system memory"
    except (OSError, StopIteration):
        return 0, "unknown (no /proc/meminfo)"
