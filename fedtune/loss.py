"""Causal-LM loss on answer tokens only, with the output projection applied only where there is a label.

Instruction tuning scores the answer tokens (labels elsewhere are -100: about 70% of ChatterBot's tokens).
A plain ``model(**batch).loss`` still projects every position onto the whole vocabulary (49,152 rows for
SmolLM2): on a CPU that projection and its log-softmax are a fifth of a training step. ``answer_loss`` runs
the decoder, keeps the hidden states whose next token has a label, and projects only those. The result is
the same mean cross-entropy as ``transformers``' causal-LM loss (shifted labels, ``ignore_index=-100``).

Models it cannot take apart safely (no ``.model`` decoder and ``lm_head``, a logit soft-cap, a
sequence classifier) go through their own forward unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def _causal_lm(model: torch.nn.Module) -> Any:
    """The ``*ForCausalLM`` module under a peft wrapper, or None when the model is not a plain decoder LM."""
    inner: Any = getattr(model, "get_base_model", lambda: model)()
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) is not None:
        return None
    if not (isinstance(getattr(inner, "model", None), torch.nn.Module)
            and isinstance(getattr(inner, "lm_head", None), torch.nn.Module)):
        return None
    if getattr(config, "logit_scale", None) is not None or getattr(config, "logits_scaling", None) is not None:
        return None  # Cohere / Granite scale their logits inside forward
    return inner


def split_loss_supported(model: torch.nn.Module) -> bool:
    """Whether ``answer_loss`` takes the decoder + selected-rows path for ``model``."""
    return _causal_lm(model) is not None


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the labelled next tokens of ``batch`` (mean or sum), as ``model(**batch).loss`` computes it.

    A batch without any label gives 0 (connected to the graph, so ``backward`` works) for both reductions.

    Raises:
        ValueError: an unknown ``reduction``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    lm = _causal_lm(model)
    labels = batch["labels"]
    if lm is None or labels.dim() != 2:
        if reduction == "mean":
            return model(**batch).loss
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = lm.model(**inputs).last_hidden_state  # (batch, seq, d)
    targets = labels[:, 1:]
    keep = targets != -100
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    logits = lm.lm_head(hidden[:, :-1][keep]).float()  # only the rows that are scored
    return F.cross_entropy(logits, targets[keep], reduction=reduction)


class _ProjectedCE(torch.autograd.Function):
    """Mean cross-entropy of ``lm_head(h)`` against ``targets``, its gradient with respect to ``h`` computed in
    the forward, so that the vocabulary-wide logits live only inside this call (one segment's at a time) and
    are neither kept nor recomputed for backward. ``weight`` (the output projection, frozen) is already in the
    compute dtype. The gradient is the one autograd gives ``F.cross_entropy(F.linear(h, W).float(), t)``:
    ``softmax / n - onehot / n`` in fp32, rounded to the compute dtype, times ``W``."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = max(1, targets.numel())
        logp = torch.log_softmax(F.linear(h.to(weight.dtype), weight).float(), dim=-1)
        picked = logp.gather(1, targets[:, None]).squeeze(1)
        loss = -picked.sum() / n
        # autograd's arithmetic, step for step: w = 1/n, then exp(logp) * w, minus w at the target
        w = torch.ones((), dtype=logp.dtype, device=logp.device) / n
        grad = logp.exp_().mul_(w)  # in place: the log-probabilities are no longer needed
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= w
        ctx.save_for_backward((grad.to(weight.dtype) @ weight).to(h.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None


def _frozen_projection(head: torch.nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """The output projection's weight in the dtype ``head(like)`` computes in (autocast's, if on), or None when
    ``head`` is not a plain frozen bias-free ``nn.Linear`` (then the logits go through it, checkpointed)."""
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    device = like.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    if not torch.is_autocast_enabled(device) and like.dtype != head.weight.dtype:
        return None
    return head.weight.detach().to(dtype)


def segment_answer_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
    """``answer_loss`` (mean) of each segment of ``batch``: the first ``rows[0]`` rows, the next ``rows[1]``...

    One decoder pass for the whole batch, and the output projection one segment at a time; what batched
    virtual clients need (each client's mean loss over its own micro-batch). A segment without any label gives
    0, connected to the graph.

    The vocabulary-wide logits of K clients at once would be most of a batch's memory (49,152 fp32 values a
    token for SmolLM2), so each segment's are made, used and dropped in turn: for a frozen output projection
    (the LoRA case) the loss and its gradient with respect to the hidden states are computed together in the
    forward (``_ProjectedCE``: the projection's weight is cast to the compute dtype once per batch, and the
    logits are never recomputed); otherwise the segment's projection is checkpointed (recomputed in backward).

    Raises:
        ValueError: the model is not a plain decoder LM (``split_loss_supported``), or ``rows`` does not add
            up to the batch.
    """
    lm = _causal_lm(model)
    labels = batch["labels"]
    if lm is None or labels.dim() != 2:
        raise ValueError("per-segment losses need a plain decoder LM with token labels")
    if sum(rows) != labels.shape[0]:
        raise ValueError(f"segments of {sum(rows)} rows for a batch of {labels.shape[0]}")
    hidden = lm.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    weight = _frozen_projection(lm.lm_head, hidden)

    def summed(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm.lm_head(h).float(), t, reduction="sum")

    means, start = [], 0
    for n in rows:
        scored = keep[start : start + n]
        h, t = hidden[start : start + n, :-1][scored], targets[start : start + n][scored]
        start += n
        if weight is not None and t.numel():
            means.append(_ProjectedCE.apply(h, weight, t))
        else:
            total = torch.utils.checkpoint.checkpoint(summed, h, t, use_reentrant=False)
            means.append(total / max(1, t.numel()))
    return torch.stack(means) + hidden.sum() * 0.0  # a segment without labels still reaches the graph
