"""(text, label) records for encoder models (e.g. all-MiniLM-L6-v2 with a classification head and LoRA).

A classification record is ``{"text": str, "label": int, "category": str}`` where ``category`` is the label's
name, so that the partitioners group classification data the same way as chat data. Loaders return the
records and ``label_names`` (label ``i`` is ``label_names[i]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from fedtune.data.chatterbot import load_chatterbot_classification
from fedtune.data.sources import Record, as_text

SOURCES: tuple[str, ...] = ("jsonl", "chatterbot")


def load_classification_jsonl(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    label_names: list[str] | None = None,
) -> tuple[list[Record], list[str]]:
    """Read (text, label) records from a JSON-lines file.

    Labels may be names or integers. Names map to indices in ``label_names`` when given, else in the sorted
    set of names found (stable for a given file). Integer labels are kept; their names are ``label_names``
    when given, else ``"0".."max"``.

    Raises:
        ValueError: if the file is missing or empty, a line is not valid JSON, lacks a field, or has a
            label outside ``label_names`` (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.path: file not found: {path}")
    rows: list[tuple[int, str, str | int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.path: line {lineno} of {path} is not valid JSON ({e.msg})") from None
            where = f"line {lineno} of {path.name}"
            if not isinstance(obj, dict):
                raise ValueError(f"{where} is not a JSON object")  # noqa: TRY004 (one error type for bad data)
            for key, name in (("text", text_field), ("label", label_field)):
                if name not in obj:
                    raise ValueError(f"data.{key}_field {name!r} missing in {where} (keys: {sorted(obj)})")
            text = as_text(obj[text_field])
            if text is None or not text.strip():
                raise ValueError(f"data.text_field {text_field!r} in {where} is empty or not a string")
            label = obj[label_field]
            if isinstance(label, bool) or not isinstance(label, int | str):
                raise ValueError(  # noqa: TRY004 (one error type for bad data)
                    f"data.label_field {label_field!r} in {where} is not a string or integer"
                )
            rows.append((lineno, text, label))
    if not rows:
        raise ValueError(f"data.path: {path} holds no records (empty file)")

    if all(isinstance(lab, int) for _, _, lab in rows):
        top = max(int(lab) for _, _, lab in rows)
        names = list(label_names) if label_names is not None else [str(i) for i in range(top + 1)]
        index: dict[int | str, int] = {i: i for i in range(len(names))}
    else:
        found = sorted({str(lab) for _, _, lab in rows})
        names = list(label_names) if label_names is not None else found
        index = {n: i for i, n in enumerate(names)}
    records = []
    for lineno, text, lab in rows:
        label_key: int | str = lab if isinstance(lab, int) and lab in index else str(lab)
        if label_key not in index:
            raise ValueError(
                f"data.label_field: label {lab!r} in line {lineno} of {path.name} is not one of {names}"
            )
        records.append({"text": text, "label": index[label_key], "category": names[index[label_key]]})
    return records, names


def load_classification(
    source: Literal["jsonl", "chatterbot"],
    path: str | Path | None = None,
    text_field: str = "text",
    label_field: str = "label",
    label_names: list[str] | None = None,
    language: str = "english",
    categories: list[str] | None = None,
) -> tuple[list[Record], list[str]]:
    """Load classification records from a JSONL file or the ChatterBot corpus (question -> category).

    Raises:
        ValueError: if ``source`` is unknown (lists the valid ones), ``path`` is missing for ``"jsonl"``,
            or the chosen loader rejects its input.
    """
    if source == "jsonl":
        if path is None:
            raise ValueError("data.path is required for a JSONL source")
        return load_classification_jsonl(path, text_field, label_field, label_names)
    if source == "chatterbot":
        return load_chatterbot_classification(language, categories)
    raise ValueError(f"source {source!r} is not one of {SOURCES}")
