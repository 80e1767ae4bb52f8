"""Evaluation: held-out loss and perplexity on response tokens, accuracy for classifiers, sample answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from fedtune.data.tokenize import collate, prompt_text
from fedtune.loss import answer_loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    *,
    device: torch.device,
    pad_id: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Token-weighted mean loss over answer tokens (``eval_loss``, ``perplexity``); ``accuracy`` for classifiers.

    ``max_batches`` bounds the work to that many batches of examples spread evenly over ``examples`` (every
    ``len / (max_batches * batch_size)``-th), so that the score keeps the set's mix of categories.
    Returns an empty dict when there is nothing to evaluate.
    """
    if not examples:
        return {}
    if max_batches is not None and max_batches * batch_size < len(examples):
        # Evenly spaced over the set, not its first batches: a held-out set kept in category order (the
        # stratified split keeps the input order) would otherwise be scored on its first category alone.
        k = max_batches * batch_size
        examples = [examples[i * len(examples) // k] for i in range(k)]
    was_training = model.training
    model.eval()
    total_loss, total_tokens, correct, seen = 0.0, 0, 0, 0
    ctx = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else None
    for i, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        labels = batch["labels"]
        with ctx if ctx is not None else nullcontext():
            if labels.dim() == 2:  # causal LM: only the answer positions are projected and scored
                total_loss += float(answer_loss(model, batch, reduction="sum"))
                total_tokens += int((labels[:, 1:] != -100).sum())
                continue
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total_tokens += labels.numel()
        correct += int((logits.argmax(-1) == labels).sum())
        seen += labels.numel()
    if was_training:
        model.train()
    if total_tokens == 0:
        return {}
    loss = total_loss / total_tokens
    out = {"eval_loss": loss, "eval_tokens": float(total_tokens)}
    if seen:
        out["accuracy"] = correct / seen
    else:
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    device: torch.device,
    max_new_tokens: int = 32,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` through the chat template (deterministic, for before/after comparisons)."""
    answers = []
    model.eval()
    for prompt in prompts:
        ids = prompt_text(tokenizer, prompt, system_prompt, tokenize=True)
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
