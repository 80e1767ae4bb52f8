"""Training records from JSONL files and Hugging Face datasets, and a seeded train/eval split.

A record is a plain dict in one of two shapes:

- a single turn: ``{"prompt": str, "response": str, "category": str | None}``
- a chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
  "category": str | None}`` with at least one assistant message.

``category`` is what the non-IID partitioners and the stratified split group by; it is ``None`` when the
source has none. Built-in corpora live in :mod:`fedtune.data.chatterbot`; tokenization in
:mod:`fedtune.data.tokenize`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

ROLES = ("system", "user", "assistant")


def as_text(value: Any) -> str | None:
    """Coerce a scalar read from JSON/YAML to text: strings stay, numbers become strings, others give None.

    Booleans and nulls give None on purpose: YAML 1.1 reads ``yes``/``no``/``on`` as booleans, and
    ``str(True)`` would silently turn an answer "yes" into "True".
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    return None


def to_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages of a record of either shape (a single turn becomes user + assistant).

    Raises:
        ValueError: if the record has neither ``messages`` nor ``prompt`` and ``response``.
    """
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "prompt" in record and "response" in record:
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    raise ValueError(f"record has neither 'messages' nor 'prompt'/'response' keys: {sorted(record)}")


def parse_record(
    obj: Any,
    where: str,
    prompt_field: str = "prompt",
    response_field: str = "response",
    category_field: str | None = None,
    messages_field: str = "messages",
) -> Record:
    """Turn one raw row (a JSON object or a dataset row) into a record; ``where`` names it in errors.

    A row with ``messages_field`` is a chat; otherwise it needs ``prompt_field`` and ``response_field``.

    Raises:
        ValueError: naming the field and ``where`` when a field is missing, empty or of the wrong type.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} is not a JSON object (got {type(obj).__name__})")  # noqa: TRY004
    category: str | None = None
    if category_field is not None:
        # A category is optional metadata (non-IID splits): a record without one simply has none.
        category = as_text(obj[category_field]) if category_field in obj else None
        if category is None and category_field in obj and obj[category_field] is not None:
            raise ValueError(f"data.category_field {category_field!r} in {where} is not a string or number")
    if messages_field in obj and obj[messages_field] is not None:
        return {"messages": _parse_messages(obj[messages_field], where, messages_field), "category": category}
    for key, value in (("prompt", prompt_field), ("response", response_field)):
        if value not in obj:
            raise ValueError(
                f"data.{key}_field {value!r} missing in {where} (keys: {sorted(obj)}; "
                f"a chat row needs data.messages_field {messages_field!r})"
            )
    prompt, response = as_text(obj[prompt_field]), as_text(obj[response_field])
    if prompt is None or not prompt.strip():
        raise ValueError(f"data.prompt_field {prompt_field!r} in {where} is empty or not a string")
    if response is None or not response.strip():
        raise ValueError(f"data.response_field {response_field!r} in {where} is empty or not a string")
    return {"prompt": prompt, "response": response, "category": category}


def _parse_messages(raw: Any, where: str, messages_field: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"data.messages_field {messages_field!r} in {where} is not a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{messages_field}[{i}] in {where} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{messages_field}[{i}] in {where}: role {m['role']!r} is not one of {ROLES}")
        content = as_text(m["content"])
        if content is None:
            raise ValueError(f"{messages_field}[{i}] in {where}: content is not a string")
        messages.append({"role": str(m["role"]), "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"data.messages_field {messages_field!r} in {where} has no assistant message to learn"
        )
    return messages


def load_jsonl(
    path: str | Path,
    prompt_field: str = "prompt",
    response_field: str = "response",
    category_field: str | None = None,
    messages_field: str = "messages",
) -> list[Record]:
    """Read records from a JSON-lines file: one object a line, single-turn or chat (see the module doc).

    Blank lines are skipped. Field names are those of the file; the records use the canonical keys.

    Raises:
        ValueError: if the file is missing or holds no records, or a line is not valid JSON or lacks a
            field (the message names the line number and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.path: file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.path: line {lineno} of {path} is not valid JSON ({e.msg})") from None
            records.append(
                parse_record(
                    obj,
                    f"line {lineno} of {path.name}",
                    prompt_field,
                    response_field,
                    category_field,
                    messages_field,
                )
            )
    if not records:
        raise ValueError(f"data.path: {path} holds no records (empty file)")
    return records


def from_hf_dataset(
    ds: Any,
    prompt_field: str = "prompt",
    response_field: str = "response",
    category_field: str | None = None,
    messages_field: str = "messages",
) -> list[Record]:
    """Records from a ``datasets.Dataset`` (or anything iterable of row dicts) or a dict of columns.

    Raises:
        ValueError: if the dataset is empty, the columns of a dict differ in length, or a row lacks a
            field (the message names the row index).
    """
    rows: Iterable[Any]
    if type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise ValueError(f"pass one split of the dataset, e.g. ds['train'] (splits: {sorted(ds)})")
    if isinstance(ds, Mapping):
        lengths = {k: len(v) for k, v in ds.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"dataset columns differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
        rows = ({k: v[i] for k, v in ds.items()} for i in range(n))
    else:
        rows = ds
    records = [
        parse_record(
            row, f"row {i} of the dataset", prompt_field, response_field, category_field, messages_field
        )
        for i, row in enumerate(rows)
    ]
    if not records:
        raise ValueError("dataset holds no rows")
    return records


def split_train_eval(
    records: Sequence[Record],
    eval_fraction: float,
    seed: int,
    stratify_by: str | None = None,
) -> tuple[list[Record], list[Record]]:
    """Split records into (train, eval) in a seeded, deterministic way.

    ``eval_fraction`` of the records (rounded half up, at least one when the fraction is positive) go to
    eval. With ``stratify_by`` (e.g. ``"category"``), each group gives the same fraction, rounded per
    group; a group of one record stays in train. Both lists keep the input order.

    Raises:
        ValueError: if ``eval_fraction`` is outside [0, 1), or it would leave the train part empty.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0 or not records:
        return list(records), []
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(records):
        key = r.get(stratify_by) if stratify_by is not None else None
        groups.setdefault(key, []).append(i)
    eval_idx: set[int] = set()
    for key in sorted(groups, key=str):
        idx = groups[key]
        k = int(len(idx) * eval_fraction + 0.5)  # half up, not Python's round-half-even
        if stratify_by is not None and len(idx) < 2:
            k = 0  # a lone record of a category is better spent on training
        elif stratify_by is None:
            k = max(1, k)
        eval_idx.update(rng.sample(idx, k))
    if not eval_idx:  # every group too small to give one: take one record from the largest
        largest = max(groups.values(), key=len)
        eval_idx.add(rng.choice(largest))
    if len(eval_idx) >= len(records):
        raise ValueError(
            f"data.eval_fraction {eval_fraction} leaves no training records out of {len(records)}"
        )
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    evals = [r for i, r in enumerate(records) if i in eval_idx]
    return train, evals
