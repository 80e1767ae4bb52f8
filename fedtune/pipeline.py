"""From a config to what training needs: records, their train/eval split and tokenized examples.

Shared by ``fedtune train``, the simulator and every client, so that one site trains on exactly what the
same site would train on in a federation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from fedtune.config import Config
from fedtune.data.chatterbot import load_chatterbot, load_chatterbot_classification
from fedtune.data.classification import load_classification_jsonl
from fedtune.data.sources import load_jsonl, split_train_eval
from fedtune.data.tokenize import encode_chat, encode_classification, pack

Record = dict[str, Any]


@dataclass
class Dataset:
    """Records and tokenized examples of one site (or of the whole federation in a simulation)."""

    train_records: list[Record]
    eval_records: list[Record]
    label_names: list[str] = field(default_factory=list)


def load_records(cfg: Config) -> tuple[list[Record], list[str]]:
    """All records per ``cfg.data`` (JSONL file or built-in corpus) and, for classification, label names.

    Raises:
        ValueError: a bad file, field or category (the message names the key).
    """
    d = cfg.data
    cats = list(d.categories) or None
    if cfg.model.task == "seq_cls":
        if d.path:
            records, names = load_classification_jsonl(d.path, d.text_field, d.label_field)
        else:
            records, names = load_chatterbot_classification(categories=cats)
    else:
        names = []
        if d.path:
            records = load_jsonl(d.path, d.prompt_field, d.response_field, d.category_field, d.messages_field)
            if cats:
                records = [r for r in records if r.get("category") in set(cats)]
        else:
            records = load_chatterbot(categories=cats)
    if d.max_records is not None and len(records) > d.max_records:
        rng = random.Random(cfg.seed)
        keep = sorted(rng.sample(range(len(records)), d.max_records))
        records = [records[i] for i in keep]
    if not records:
        raise ValueError("data: no records left (check data.path, data.categories and data.max_records)")
    return records, names


def load_dataset(cfg: Config) -> Dataset:
    """Records split into train and eval (seeded; stratified by category when records have one)."""
    records, names = load_records(cfg)
    stratify = "category" if any(r.get("category") for r in records) else None
    train, ev = split_train_eval(records, cfg.data.eval_fraction, cfg.seed, stratify_by=stratify)
    return Dataset(train_records=train, eval_records=ev, label_names=names)


def encode(records: list[Record], tokenizer: Any, cfg: Config, *, for_training: bool = True) -> list[dict[str, Any]]:
    """Tokenize records for ``cfg.model.task`` (loss on answers only; optional packing for training)."""
    if cfg.model.task == "seq_cls":
        return encode_classification(records, tokenizer, cfg.train.seq_len)
    examples = encode_chat(records, tokenizer, cfg.train.seq_len, cfg.data.system_prompt)
    if for_training and cfg.data.packing:
        examples = pack(examples, cfg.train.seq_len)
    return examples
