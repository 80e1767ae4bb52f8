"""The coordinator's copy of the model: what the round driver applies each round's result to and evaluates.

The simulator and the gRPC server hold one base model with the global adapter. ``GlobalModel`` keeps it in
step with the strategy: each applied ``RoundResult`` replaces the adapter and folds its base-weight update
(flora, fedex) into the base, logging it so that a resumed run replays the log; evaluation runs on the
held-out examples it was given (none: no evaluation, e.g. ``server.eval_data = false``).
"""

from __future__ import annotations

from typing import Any

from fedtune.adapters import get_state, set_state
from fedtune.config import Config
from fedtune.eval import evaluate
from fedtune.models import LoadedModel, apply_base_update
from fedtune.models.base_update import apply_round_result
from fedtune.runs import RunDir
from fedtune.types import LowRankUpdate, State


class GlobalModel:
    """``lm`` as the federation's global model; ``frozen_in_state``: the global state includes the adapter's
    frozen tensors (a strategy's ``spec.frozen_in_state``, ffa's shared A)."""

    def __init__(self, cfg: Config, lm: LoadedModel, eval_examples: list[dict[str, Any]], *,
                 frozen_in_state: bool = False) -> None:
        self.cfg, self.lm, self.eval_examples = cfg, lm, eval_examples
        self.frozen_in_state = frozen_in_state
        self.base_updates: list[dict[str, LowRankUpdate]] = []
        """Every base update folded into the model so far, in order (the simulator's pools sync from it)."""

    def initial_state(self) -> State:
        """The global adapter state before round 1."""
        return get_state(self.lm.model, trainable_only=not self.frozen_in_state)

    def restore(self, state: State, base_updates: list[dict[str, LowRankUpdate]]) -> None:
        """Continue from a checkpoint: fold its base updates in, in order, and load its adapter state."""
        for update in base_updates:
            apply_base_update(self.lm.model, update, self.lm.quantized)
        self.base_updates.extend(base_updates)
        set_state(self.lm.model, state)

    def apply(self, global_state: State, result: Any) -> State:
        """Take a strategy's ``RoundResult`` in; returns the new global state (the old one if not applied)."""
        return apply_round_result(self.lm, self.cfg, global_state, result, self.base_updates)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the global adapter (``eval_loss``, ``perplexity``; ``accuracy``), or {}."""
        c, lm = self.cfg.eval, self.lm
        return evaluate(lm.model, self.eval_examples, device=lm.device, pad_id=lm.tokenizer.pad_token_id,
                        batch_size=c.batch_size, max_batches=c.max_batches, compute_dtype=lm.compute_dtype)

    def full_model_bytes(self) -> int:
        """What full-model FedAvg would send per client per direction (every base weight, fp32)."""
        seen: set[int] = set()
        total = 0
        for p in self.lm.model.base_model.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * 4 if not hasattr(p, "quant_state") else p.numel() * 2 * 4
        return total

    def save(self, run: RunDir, global_state: State) -> None:
        """Load the final global state and save the adapter (PEFT format) into the run folder."""
        set_state(self.lm.model, global_state)
        run.save_adapter(self.lm.model)
