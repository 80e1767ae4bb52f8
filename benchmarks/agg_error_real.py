"""What exact aggregation buys on real client adapters: ``agg_error`` per strategy on the same replies.

K clients (default 4) each train a few steps on different ChatterBot categories from the same global LoRA
state on SmolLM2-135M (the quickstart's setup); their replies are then aggregated by every strategy, so
the strategies are compared on identical updates. ``agg_error`` is
||dW_agg - sum_k p_k s B_k A_k||_F / ||sum_k p_k s B_k A_k||_F averaged over adapted layers.

    .venv/bin/python benchmarks/agg_error_real.py [--clients 4] [--steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_table, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny-llama instead of SmolLM2 (seconds)")
    args = parser.parse_args()

    from fedtune.adapters import get_state
    from fedtune.client.fit import client_seed, fit
    from fedtune.config import load_config
    from fedtune.data.partition import partition_clients
    from fedtune.models import load_model
    from fedtune.pipeline import encode, load_dataset
    from fedtune.strategies import make_strategy, strategy_config

    model = "tiny-llama" if args.quick else "smollm2-135m"
    cfg = load_config(Path(__file__).parents[1] / "simulations" / "quickstart.toml",
                      [f"model.name={model}", f"sim.num_clients={args.clients}", f"train.max_steps={args.steps}",
                       "adapter.method=lora_fa"])
    started = time.perf_counter()
    lm = load_model(cfg)
    data = load_dataset(cfg)
    parts = partition_clients(cfg, data.train_records)
    full = get_state(lm.model, trainable_only=False)
    trainable = get_state(lm.model)
    replies = {}
    # FFA needs a frozen A; the other strategies see the same replies with that (shared) A included, so every
    # strategy aggregates identical client updates. A second set trains A too, as plain LoRA clients do.
    for variant, frozen_a in (("frozen A", True), ("trained A", False)):
        replies[variant] = []
        for i, part in enumerate(parts):
            for name, p in lm.model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(not frozen_a)
            from fedtune.types import Instructions

            global_state = trainable if frozen_a else full
            ins = Instructions(round=1, client_id=f"client-{i}", state=global_state)
            examples = encode([data.train_records[j] for j in part], lm.tokenizer, cfg)
            site_cfg = cfg if frozen_a else dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter,
                                                                                                method="lora"))
            reply, _ = fit(lm, examples, site_cfg, ins, seed=client_seed(cfg.seed, 1, i))
            assert reply.state is not None
            if frozen_a:
                reply.state = {**{k: v for k, v in full.items() if ".lora_A." in k}, **reply.state}
            replies[variant].append(reply)
    rows = []
    results = []
    for variant, reps in replies.items():
        names = ["fedavg", "svd", "flora", "fedex"] + (["ffa"] if variant == "frozen A" else [])
        for name in names:
            scfg = dataclasses.replace(strategy_config(cfg, False, cfg.sim.clients_per_round), name=name)
            strategy = make_strategy(name, scfg)
            state = full
            if name == "ffa":
                reps_b = [dataclasses.replace(r, state={k: v for k, v in r.state.items() if ".lora_B." in k})
                          for r in reps]
                result = strategy.aggregate(1, full, reps_b)
            else:
                result = strategy.aggregate(1, state, [dataclasses.replace(r) for r in reps])
            err = result.metrics.get("agg_error")
            worst = max(result.agg_error_layers.values()) if result.agg_error_layers else None
            rows.append([variant, name, f"{err:.3e}" if err is not None else "-",
                         f"{worst:.3e}" if worst is not None else "-", "yes" if result.applied else "no"])
            results.append({"clients_train_A": variant, "strategy": name, "agg_error_mean": err,
                            "agg_error_max_layer": worst})
    random.seed(0)
    print_table(f"agg_error on real client adapters: {model}, {args.clients} clients on different ChatterBot "
                f"categories, {args.steps} steps each from the same global state",
                ["clients", "strategy", "agg_error (mean over layers)", "worst layer", "applied"], rows)
    path = write_json("agg_error_real.json", {"machine": machine_info(), "model": model, "clients": args.clients,
                                         "steps": args.steps, "results": results,
                                         "seconds": time.perf_counter() - started})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
