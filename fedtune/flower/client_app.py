"""The ClientApp every simulated Flower node runs: fedtune's ``fit`` on a base model cached per Ray actor.

An actor process loads the base model once per config fingerprint (model, quantization, adapter, labels)
and rebuilds any virtual client's data partition from the config the message carries, so thousands of
virtual clients share a handful of models and a Ray cluster needs nothing but the config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client.fit import client_seed, fit
from fedtune.config import Config, to_dict
from fedtune.flower.records import config_from_overrides, content_to_instructions, reply_to_content
from fedtune.models import LoadedModel, load_model
from fedtune.pipeline import Dataset, encode, load_dataset


@dataclass
class _Site:
    """One config's data in this actor: records, partitions and the examples encoded so far."""

    cfg: Config
    data: Dataset
    parts: list[list[int]]
    examples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


_MODELS: dict[str, LoadedModel] = {}  # model key -> the one base model (+ adapter) of this actor
_SITES: dict[str, _Site] = {}  # config hash -> data
LOADS = {"models": 0, "sites": 0}  # what this process loaded (tests and benchmarks read it)


def model_key(cfg: Config, num_labels: int | None) -> str:
    return json.dumps({"model": to_dict(cfg.model), "quant": to_dict(cfg.quant), "adapter": to_dict(cfg.adapter),
                       "labels": num_labels}, sort_keys=True)


def site_for(items: list[str]) -> tuple[_Site, LoadedModel]:
    """The cached data and model of the config given as overrides (loaded on first use in this process)."""
    from fedtune.simulation.engine import partition_clients

    key = hashlib.sha256("\n".join(items).encode()).hexdigest()
    site = _SITES.get(key)
    if site is None:
        cfg = config_from_overrides(items)
        data = load_dataset(cfg)
        everyone = [list(range(len(data.train_records)))]
        parts = everyone if cfg.sim.mode == "centralized" else partition_clients(cfg, data.train_records)
        site = _SITES[key] = _Site(cfg, data, parts)
        LOADS["sites"] += 1
    mkey = model_key(site.cfg, len(site.data.label_names) or None)
    lm = _MODELS.get(mkey)
    if lm is None:
        lm = _MODELS[mkey] = load_model(site.cfg, num_labels=len(site.data.label_names) or None)
        LOADS["models"] += 1
    return site, lm


def client_examples(site: _Site, lm: LoadedModel, index: int) -> list[dict[str, Any]]:
    if index not in site.examples:
        records = [site.data.train_records[j] for j in site.parts[index]]
        site.examples[index] = encode(records, lm.tokenizer, site.cfg)
    return site.examples[index]


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run ``fit`` for the virtual client named in the message; a failure comes back as a failed reply."""
    ins, index, items, threads = content_to_instructions(msg.content)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    site, lm = site_for(items)
    reply, _ = fit(lm, client_examples(site, lm, index), site.cfg, ins,
                   seed=client_seed(site.cfg.seed, ins.round, index))
    return Message(reply_to_content(reply), reply_to=msg)
