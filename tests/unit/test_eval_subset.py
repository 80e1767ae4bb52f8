"""``eval.max_batches``: a bounded evaluation scores a sample spread over the whole held-out set.

The stratified split keeps the input order, so a held-out set drawn from a corpus stored category by category
(ChatterBot) is in category order; scoring its first batches scored its first category alone (the gossip
benchmark's 8 examples were all ``ai``).
"""

from __future__ import annotations

import torch

from fedtune.eval import evaluate


class AlwaysZero(torch.nn.Module):
    """A classifier that predicts label 0 whatever it reads."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        logits = torch.zeros(input_ids.shape[0], 2)
        logits[:, 0] = 5.0
        return type("Out", (), {"logits": logits})()


def _examples(labels: list[int]) -> list[dict[str, object]]:
    return [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": lab} for lab in labels]


def test_a_bounded_evaluation_of_a_set_in_category_order_scores_every_category() -> None:
    in_order = _examples([0] * 12 + [1] * 12)  # category 0 first, as a stratified split leaves it
    whole = evaluate(AlwaysZero(), in_order, device=torch.device("cpu"), pad_id=0, batch_size=4)
    bounded = evaluate(AlwaysZero(), in_order, device=torch.device("cpu"), pad_id=0, batch_size=4, max_batches=1)
    assert whole["accuracy"] == 0.5
    assert bounded["accuracy"] == 0.5  # the first batch alone would have been all category 0: 1.0
    assert bounded["eval_tokens"] == 4
    assert abs(bounded["eval_loss"] - whole["eval_loss"]) < 1e-6


def test_a_bound_larger_than_the_set_scores_the_whole_set() -> None:
    examples = _examples([0, 1, 1, 0, 1])
    whole = evaluate(AlwaysZero(), examples, device=torch.device("cpu"), pad_id=0, batch_size=2)
    bounded = evaluate(AlwaysZero(), examples, device=torch.device("cpu"), pad_id=0, batch_size=2, max_batches=9)
    assert bounded == whole
    assert whole["eval_tokens"] == 5
    assert whole["accuracy"] == 0.4
