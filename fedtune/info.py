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
    shape: tuple[int, int, int, int] = (768, 12, 12, 0)
    """hidden size, layers, attention heads, vocabulary (what the activation estimate scales with)"""
    batch_refusal: str | None = None
    """why the adapter cannot train several clients in one pass (``sim.batch_clients``); None: it can"""

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
    from fedtune.simulation.multilora import unsupported

    base, hf_cfg = _meta_model(cfg, num_labels)
    dtype_bytes = DTYPE_BYTES[cfg.quant.compute_dtype]
    bits = BITS.get(cfg.quant.mode)
    weight_bytes = 0
    params = 0
    seen: set[int] = set()
    out_emb, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    if getattr(hf_cfg, "tie_word_embeddings", False) and out_emb is not None and in_emb is not None:
        seen.add(id(out_emb.weight))  # tied to the input embeddings (not tied on the meta device): counted once
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
    shape = (getattr(hf_cfg, "hidden_size", 768), getattr(hf_cfg, "num_hidden_layers", 12),
             getattr(hf_cfg, "num_attention_heads", 12), getattr(hf_cfg, "vocab_size", 0))
    activation = _activations(cfg, cfg.train.batch_size, cfg.train.seq_len, shape)
    optimizer_bytes = trainable * 8 if cfg.train.optimizer == "adamw" else trainable * 2 if "8bit" in cfg.train.optimizer else 0
    return ModelInfo(params=params, trainable=trainable, weight_bytes=weight_bytes, adapter_bytes=adapter_total * 4,
                     grads_bytes=trainable * 4, optimizer_bytes=optimizer_bytes, activation_bytes=activation,
                     shape=shape, batch_refusal=unsupported(model))


def _activations(cfg: Config, b: int, s: int, shape: tuple[int, int, int, int]) -> int:
    h, layers, heads, vocab = shape
    act_16 = 34 * s * b * h + 5 * heads * s * s * b
    activation = layers * 2 * s * b * h + act_16 if cfg.model.gradient_checkpointing else layers * act_16
    return activation + (b * s * vocab * 4 * 2 if cfg.model.task == "causal_lm" else 0)  # fp32 logits + grad


def estimate_activations(cfg: Config, train: Any, info: ModelInfo) -> int:
    """Activation bytes of ``info``'s model at ``train.batch_size`` x ``train.seq_len``."""
    return _activations(cfg, train.batch_size, train.seq_len, info.shape)


def available_bytes(device: str) -> tuple[int, str]:
    """Memory the site has for training: free memory of the CUDA device, else the RAM the kernel says is
    available (``MemAvailable``), and what it is."""
    if torch.cuda.is_available() and (device == "auto" or device.startswith("cuda")):
        free, _ = torch.cuda.mem_get_info(torch.device("cuda" if device == "auto" else device))
        return int(free), f"free memory of {torch.cuda.get_device_name()}"
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kb * 1024, "available RAM"


def largest(fits: Any, limit: int) -> int:
    """The largest n in [1, limit] with ``fits(n)`` (monotone: doubling, then bisection), 0 when 1 does not."""
    if not fits(1):
        return 0
    n = 1
    while n < limit and fits(min(limit, n * 2)):
        n = min(limit, n * 2)
    lo, hi = n, min(limit, n * 2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def verdict(cfg: Config, info: ModelInfo, available: int, what: str) -> list[str]:
    """Whether training as configured fits in ``available`` bytes (keeping 10% headroom), the largest
    train.batch_size and train.seq_len that fit, and what to change when it does not fit."""
    import dataclasses

    budget = int(available * 0.9)
    mib = 2**20

    def total(batch: int, seq: int) -> int:
        t = dataclasses.replace(cfg.train, batch_size=batch, seq_len=seq)
        return estimate_activations(cfg, t, info) + info.total_bytes - info.activation_bytes

    b, s = cfg.train.batch_size, cfg.train.seq_len
    fits = info.total_bytes <= budget
    head = (f"{'fits' if fits else 'does NOT fit'}: about {info.total_bytes / mib:,.0f} MiB needed, "
            f"{available / mib:,.0f} MiB {what} (90% usable)")
    lines = [head]
    max_b = largest(lambda n: total(n, s) <= budget, 1 << 16)
    max_s = largest(lambda n: total(b, n) <= budget, 1 << 20)
    lines.append(f"largest train.batch_size at train.seq_len={s}: {max_b}; largest train.seq_len at "
                 f"train.batch_size={b}: {max_s}")
    if not fits:
        tips = [f"train.batch_size={max_b}" if max_b else "", f"train.seq_len={max_s}" if max_s >= 8 else ""]
        if not cfg.model.gradient_checkpointing:
            tips.append("model.gradient_checkpointing=true")
        if cfg.quant.mode == "none":
            tips.append("quant.mode=nf4")
        lines.append("to fit, set one of: " + ", ".join(t for t in tips if t))
    return lines


def batch_clients_that_fit(info: ModelInfo, budget_bytes: int, workers: int = 1) -> int:
    """The largest ``sim.batch_clients`` whose estimate fits in ``budget_bytes``: the base weights once (forked
    workers share them), and per client in each worker's batch its adapter, gradients, optimizer state and
    activations (0: not even one)."""
    per_client = info.adapter_bytes + info.grads_bytes + info.optimizer_bytes + info.activation_bytes
    return max(0, (budget_bytes - info.weight_bytes) // max(1, per_client * workers))


def choose_batch_clients(cfg: Config, info: ModelInfo, available: int, what: str) -> tuple[int, str]:
    """What ``sim.batch_clients=auto`` becomes: the largest K that fits in 90% of ``available`` bytes
    (``batch_clients_that_fit`` with ``sim.workers``), at most each worker's share of a round's clients, and
    at least 1; with the reason, for the log and ``fedtune info``."""
    from fedtune.simulation.pools import clients_per_round

    if cfg.sim.backend != "inproc":
        return 1, f"sim.backend={cfg.sim.backend} trains one client per call"
    if info.batch_refusal is not None:
        return 1, info.batch_refusal
    workers = cfg.sim.workers
    per_round = 1 if cfg.sim.mode == "centralized" else min(clients_per_round(cfg), cfg.sim.num_clients)
    share = -(-per_round // workers)
    fit = batch_clients_that_fit(info, int(available * 0.9), workers)
    k = max(1, min(share, fit))
    why = (f"{fit:,} fit in 90% of {available / 2**30:,.1f} GiB {what}"
           + (f" with sim.workers={workers}" if workers > 1 else "")
           + f"; a round's {per_round} clients" + (f" over {workers} workers" if workers > 1 else "")
           + f" need at most {share}")
    return k, why
