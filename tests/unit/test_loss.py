"""answer_loss: the same loss and gradients as the model's own causal-LM loss, from fewer projected rows."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import load_config
from fedtune.data.tokenize import collate
from fedtune.loss import answer_loss, segment_answer_losses, split_loss_supported
from fedtune.models import load_model
from fedtune.pipeline import encode

RECORDS = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}, of course."} for i in range(6)]


def _model_and_batch(tiny_overrides: list[str], *extra: str):
    cfg = load_config(None, [*tiny_overrides, *extra])
    lm = load_model(cfg)
    batch = collate(encode(RECORDS, lm.tokenizer, cfg)[:4], lm.tokenizer.pad_token_id)
    return lm, batch


def _grads(lm, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in lm.model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


def test_matches_the_models_own_loss_and_gradients(tiny_overrides: list[str]) -> None:
    lm, batch = _model_and_batch(tiny_overrides)
    with torch.no_grad():  # a non-zero B, so that A gets gradients too
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    assert split_loss_supported(lm.model)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel()  # prompts are masked: fewer rows are projected
    ref = lm.model(**batch).loss.detach()
    ours = answer_loss(lm.model, batch)
    assert torch.allclose(ours, ref, rtol=1e-5), (float(ours), float(ref))
    total = answer_loss(lm.model, batch, reduction="sum")
    assert float(total) == pytest.approx(float(ref) * labelled, rel=1e-5)
    ref_grads = _grads(lm, lm.model(**batch).loss)
    assert all(float(g.abs().sum()) > 0 for g in ref_grads)
    for g_ref, g_ours in zip(ref_grads, _grads(lm, answer_loss(lm.model, batch)), strict=True):
        assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_a_batch_without_answers_gives_zero_and_backpropagates(tiny_overrides: list[str]) -> None:
    lm, batch = _model_and_batch(tiny_overrides)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = answer_loss(lm.model, batch)
    assert float(loss) == 0.0
    loss.backward()  # connected to the graph: no error


def test_rejects_an_unknown_reduction(tiny_overrides: list[str]) -> None:
    lm, batch = _model_and_batch(tiny_overrides)
    with pytest.raises(ValueError, match="reduction"):
        answer_loss(lm.model, batch, reduction="max")


def test_models_with_soft_capped_logits_use_their_own_forward(tiny_overrides: list[str]) -> None:
    lm, batch = _model_and_batch(tiny_overrides)
    lm.model.get_base_model().config.final_logit_softcapping = 30.0
    assert not split_loss_supported(lm.model)
    assert torch.allclose(answer_loss(lm.model, batch), lm.model(**batch).loss)


@pytest.mark.parametrize("head_trainable", [False, True])
def test_segment_losses_match_each_segments_own_loss_and_gradients(tiny_overrides: list[str],
                                                                   head_trainable: bool) -> None:
    """A frozen head takes the fused projection + cross-entropy path, a trainable one the checkpointed path:
    both give each segment's ``answer_loss`` and the gradients of their sum, including the head's own."""
    lm, batch = _model_and_batch(tiny_overrides)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    lm.model.get_base_model().lm_head.weight.requires_grad_(head_trainable)
    rows = [1, 3]
    parts = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    ref = torch.stack([answer_loss(lm.model, part) for part in parts])
    ours = segment_answer_losses(lm.model, batch, rows)
    assert torch.allclose(ours, ref, rtol=1e-5), (ours, ref)
    weights = torch.tensor([0.7, 1.3])  # unequal, as grad_accum or a finished client would give
    ref_grads = _grads(lm, (ref * weights).sum())
    assert all(float(g.abs().sum()) > 0 for g in ref_grads)
    assert len(ref_grads) == len([p for p in lm.model.parameters() if p.requires_grad])
    for g_ref, g_ours in zip(ref_grads, _grads(lm, (segment_answer_losses(lm.model, batch, rows) * weights).sum()),
                             strict=True):
        assert float((g_ours - g_ref).abs().max()) <= 1e-5 * float(g_ref.abs().max()), (g_ours - g_ref).abs().max()
