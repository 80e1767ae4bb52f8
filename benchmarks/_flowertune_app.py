"""The anchor of ``sim_vs_flower``: a Flower ClientApp/ServerApp pair written the way FlowerTune LLM writes them.

Every ``train`` call builds the model from scratch (4-bit ``from_pretrained``, ``prepare_model_for_kbit_training``,
``get_peft_model``), loads the global LoRA arrays, trains, and returns the LoRA state; the server is flwr's own
``FedAvg`` over ``ArrayRecord``s. Only the local steps reuse fedtune's loop (``train_local``) so that both sides
do the same arithmetic per step and the comparison measures the architecture, not the optimizer code. The data
partition is cached per process, as FlowerTune caches its ``FederatedDataset``.

``cache-model`` in the train config (the benchmark's ``flowertune-cached`` arm) keeps the built model in the
actor's process from one call to the next, as a user who profiled FlowerTune might: every call still loads the
global LoRA arrays into it (all of them, so nothing of the last client's training survives) and trains with a
fresh optimizer, so the arithmetic is the per-call build's. Every call appends its seconds (partition, model
build, training) as one JSON line to the file named by ``FEDTUNE_ANCHOR_TIMES``, if set: where the anchor's
time goes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

_DATA: dict[str, Any] = {}
_MODEL: dict[str, Any] = {}


def get_model(cfg: Any) -> Any:
    """FlowerTune's ``get_model``: quantized base + LoRA, built for every call."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedtune.models.registry import resolve

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name, None).path, quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    lora = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                      target_modules=list(cfg.adapter.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def partition(overrides: list[str], pid: int) -> tuple[Any, list[dict[str, Any]], int]:
    """(config, examples of partition ``pid``, pad id), cached per process."""
    key = "\n".join(overrides)
    if key not in _DATA:
        from transformers import AutoTokenizer

        from fedtune.config import load_config
        from fedtune.data.partition import partition_clients
        from fedtune.models.registry import resolve
        from fedtune.pipeline import encode, load_dataset

        cfg = load_config(None, overrides)
        tok = AutoTokenizer.from_pretrained(resolve(cfg.model.name, None).path)
        tok.pad_token = tok.pad_token or tok.eos_token
        data = load_dataset(cfg)
        parts = partition_clients(cfg, data.train_records)
        _DATA[key] = (cfg, [encode([data.train_records[j] for j in p], tok, cfg) for p in parts], tok.pad_token_id)
    cfg, examples, pad_id = _DATA[key]
    return cfg, examples[pid], pad_id


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from fedtune.train import train_local

    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    overrides = list(config["overrides"])
    t0 = time.perf_counter()
    cfg, examples, pad_id = partition(overrides, pid)
    t1 = time.perf_counter()
    key = "\n".join(overrides)
    model = _MODEL.get(key) if bool(config.get("cache-model", False)) else None
    if model is None:
        model = get_model(cfg)
        if bool(config.get("cache-model", False)):
            _MODEL[key] = model
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    t2 = time.perf_counter()
    result = train_local(model, examples, cfg.train, device=torch.device("cpu"), compute_dtype=torch.bfloat16,
                         pad_id=pad_id, seed=cfg.seed * 1000 + pid)
    state = get_peft_model_state_dict(model)
    t3 = time.perf_counter()
    if os.environ.get("FEDTUNE_ANCHOR_TIMES"):
        with open(os.environ["FEDTUNE_ANCHOR_TIMES"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "partition": pid, "data_s": t1 - t0, "build_s": t2 - t1,
                                "train_s": t3 - t2, "threads": torch.get_num_threads(), "end": time.time()}) + "\n")
    reply = RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                        "metrics": MetricRecord({"num-examples": len(examples),
                                                 "train_loss": float(result.metrics.get("loss", 0.0))})})
    return Message(reply, reply_to=msg)


def server(overrides: list[str], rounds: int, num_clients: int, marks: list[float], *,
           cache_model: bool = False) -> ServerApp:
    """flwr's FedAvg over all clients; ``marks`` gets a timestamp before round 1 and after every round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from peft import get_peft_model_state_dict

        from fedtune.config import load_config

        cfg = load_config(None, overrides)
        initial = ArrayRecord.from_torch_state_dict(get_peft_model_state_dict(get_model(cfg)))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                          min_available_nodes=num_clients, min_evaluate_nodes=0)

        def tick(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            marks.append(time.perf_counter())
            return None

        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=tick,
                       train_config=ConfigRecord({"overrides": overrides, "cache-model": cache_model}))

    return app
