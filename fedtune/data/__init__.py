"""Data for fedtune: records from JSONL / HF datasets / the ChatterBot corpus, chat templating with prompt
masking, and partitioners that split records among simulated clients.

Record shapes (plain dicts):

- single turn: ``{"prompt": str, "response": str, "category": str | None}``
- chat: ``{"messages": [{"role", "content"}, ...], "category": str | None}``
- classification: ``{"text": str, "label": int, "category": str}``
"""

from fedtune.data.chatterbot import (
    chatterbot_categories,
    corpus_stats,
    load_chatterbot,
    load_chatterbot_classification,
)
from fedtune.data.classification import load_classification, load_classification_jsonl
from fedtune.data.partition import (
    PARTITIONERS,
    by_category,
    dirichlet,
    iid,
    label_entropy,
    make_partition,
    partition_table,
    render_partition_table,
    size_skew,
)
from fedtune.data.sources import Record, from_hf_dataset, load_jsonl, split_train_eval, to_messages
from fedtune.data.tokenize import (
    IGNORE_INDEX,
    collate,
    encode_chat,
    encode_classification,
    pack,
    prompt_ids,
    prompt_text,
)

__all__ = [
    "IGNORE_INDEX",
    "PARTITIONERS",
    "Record",
    "by_category",
    "chatterbot_categories",
    "collate",
    "corpus_stats",
    "dirichlet",
    "encode_chat",
    "encode_classification",
    "from_hf_dataset",
    "iid",
    "label_entropy",
    "load_chatterbot",
    "load_chatterbot_classification",
    "load_classification",
    "load_classification_jsonl",
    "load_jsonl",
    "make_partition",
    "pack",
    "partition_table",
    "prompt_ids",
    "prompt_text",
    "render_partition_table",
    "size_skew",
    "split_train_eval",
    "to_messages",
]
