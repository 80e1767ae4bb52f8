"""The ClientApp every simulated Flower node runs: fedtune's ``fit`` on a base model cached per Ray actor.

An actor process loads the base model once per config fingerprint (model, quantization, adapter, labels)
and rebuilds any virtual client's data partition from the config the message carries, so thousands of
virtual clients share a handful of models and a Ray cluster needs nothing but the config.

A virtual client lands on any actor, so what the engine's one model accumulates must reach each actor's
copy: the base-weight updates of ``flora`` / ``fedex`` are folded in by ``sync_base`` before training, and a
client's state (kept optimizer state, update-pipeline state) travels in the message and back. The work
itself is ``run_phase``: any phase a handler is registered for, as on a gRPC node.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client.phases import ClientContext, run_phase
from fedtune.config import Config, to_dict
from fedtune.data.partition import partition_clients
from fedtune.flower.records import Task, config_from_overrides, content_to_task, reply_to_content, split_state
from fedtune.models import LoadedModel, apply_base_update, load_model
from fedtune.pipeline import Dataset, encode, load_dataset
from fedtune.types import failed_reply


@dataclass
class _Site:
    """One config's data in this actor: records, partitions and the examples encoded so far."""

    cfg: Config
    data: Dataset
    parts: list[list[int]]
    examples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class _Model:
    """A cached base model (+ adapter) and the base updates folded into it: the first ``applied`` of ``run``.

    ``applied`` is -1 while updates are being folded in: a failure halfway leaves weights no count describes.
    """

    lm: LoadedModel
    run: str = ""
    applied: int = 0


_MODELS: dict[str, _Model] = {}  # model key -> the one base model (+ adapter) of this actor
_SITES: dict[str, _Site] = {}  # config hash -> data
LOADS = {"models": 0, "sites": 0}  # what this process loaded (tests and benchmarks read it)


def model_key(cfg: Config, num_labels: int | None) -> str:
    return json.dumps({"model": to_dict(cfg.model), "quant": to_dict(cfg.quant), "adapter": to_dict(cfg.adapter),
                       "labels": num_labels}, sort_keys=True)


def _load(cfg: Config, num_labels: int | None) -> LoadedModel:
    LOADS["models"] += 1
    return load_model(cfg, num_labels=num_labels)


def site_for(items: list[str]) -> tuple[_Site, _Model]:
    """The cached data and model of the config given as overrides (loaded on first use in this process)."""
    key = hashlib.sha256("\n".join(items).encode()).hexdigest()
    site = _SITES.get(key)
    if site is None:
        cfg = config_from_overrides(items)
        data = load_dataset(cfg)
        everyone = [list(range(len(data.train_records)))]
        parts = everyone if cfg.sim.mode == "centralized" else partition_clients(cfg, data.train_records)
        site = _SITES[key] = _Site(cfg, data, parts)
        LOADS["sites"] += 1
    labels = len(site.data.label_names) or None
    mkey = model_key(site.cfg, labels)
    if mkey not in _MODELS:
        _MODELS[mkey] = _Model(_load(site.cfg, labels))
    return site, _MODELS[mkey]


def sync_base(site: _Site, cached: _Model, task: Task) -> bool:
    """Fold into ``cached`` the task's base updates it lacks; False if it lacks older ones than the task carries.

    Updates are applied one by one in log order, as the engine applies them to its own model, so every copy
    has the same weights bit for bit. A model holding another run's updates (a resumed or new federation in
    the same actor) is reloaded first.
    """
    upto = task.base_from + len(task.base_updates)
    if cached.run != task.run or not 0 <= cached.applied <= upto:
        if cached.applied != 0:
            cached.lm = _load(site.cfg, len(site.data.label_names) or None)
        cached.run, cached.applied = task.run, 0
    if cached.applied < task.base_from:
        return False
    todo = task.base_updates[cached.applied - task.base_from:]
    cached.applied = -1
    for update in todo:
        apply_base_update(cached.lm.model, update, cached.lm.quantized)
    cached.applied = upto
    return True


def client_examples(site: _Site, lm: LoadedModel, index: int) -> list[dict[str, Any]]:
    if index not in site.examples:
        records = [site.data.train_records[j] for j in site.parts[index]]
        site.examples[index] = encode(records, lm.tokenizer, site.cfg)
    return site.examples[index]


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Answer the message's instructions for the virtual client it names (``run_phase``: ``fit`` and the
    update pipeline for ``train``); a failure comes back as a failed reply."""
    task = content_to_task(msg.content)
    ins = task.ins
    if task.threads > 0 and torch.get_num_threads() != task.threads:
        torch.set_num_threads(task.threads)
    site, cached = site_for(task.cfg_items)
    if not sync_base(site, cached, task):
        reason = (f"this actor's model has {cached.applied} base updates, the message starts at {task.base_from}; "
                  "resend with the whole log")
        return Message(reply_to_content(failed_reply(ins.client_id, ins.round, reason), lacks_base=True), reply_to=msg)
    ctx = ClientContext(site.cfg, cached.lm, client_examples(site, cached.lm, task.index), task.state(),
                        keep_optimizer_state=site.cfg.sim.keep_optimizer_state)
    reply = run_phase(ctx, ins)
    optimizer_state, client_state = split_state(ctx.state)
    return Message(reply_to_content(reply, optimizer_state, client_state=client_state), reply_to=msg)
