"""The built-in ChatterBot corpus (``chatterbot-corpus`` 1.3.3, BSD): question/answer pairs in category files.

The package is installed without its dependencies, so it is never imported: its YAML files are found with
``importlib.util.find_spec``. Each ``<language>/<category>.yml`` holds ``conversations``, lists of strings.
In most files a list is a question followed by *alternative* answers (``["What is AI?", "AI is ...",
"It is ..."]``); a few (mostly ``conversations.yml``) are dialogues where each line answers the one before.
``turns`` picks the reading:

- ``"pairs"`` (default): the first line is the prompt and every later line is one answer to it, giving one
  single-turn record per answer. This is right for the alternatives that make up most of the corpus.
- ``"consecutive"``: every line answers the one before (ChatterBot's own trainer reads them this way).
- ``"chat"``: one multi-turn chat record per list, user and assistant alternating; a trailing unanswered
  user line is dropped.

Records are deduplicated on their text (the corpus repeats some pairs hundreds of times, e.g. in
``tech_support.yml``); the first occurrence wins, files are read in name order, so the order is stable.
The category of a record is the file stem (``"tech_support"``), not the YAML ``categories`` list.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml

from fedtune.data.sources import Record, as_text

Turns = Literal["pairs", "consecutive", "chat"]
TURNS: tuple[str, ...] = ("pairs", "consecutive", "chat")


def corpus_dir(language: str = "english") -> Path:
    """The folder holding the YAML files of one language of the installed ChatterBot corpus.

    Raises:
        ValueError: if ``chatterbot-corpus`` is not installed or has no such language (lists the valid ones).
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "data.builtin 'chatterbot' needs the chatterbot-corpus package: "
            "pip install --no-deps chatterbot-corpus==1.3.3"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    folder = root / language
    if not folder.is_dir():
        valid = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ValueError(f"language {language!r} is not in the ChatterBot corpus; valid: {valid}")
    return folder


def chatterbot_categories(language: str = "english") -> list[str]:
    """The category names (file stems) of one language, sorted: the stable label list of the corpus."""
    return sorted(p.stem for p in corpus_dir(language).glob("*.yml"))


def _read_conversations(path: Path) -> list[list[str]]:
    """The conversations of one YAML file as lists of non-empty strings (other scalars skipped)."""
    return [list(c) for c in _parse_yaml(str(path), path.stat().st_mtime_ns)]


@functools.lru_cache(maxsize=64)
def _parse_yaml(path: str, mtime_ns: int) -> tuple[tuple[str, ...], ...]:
    """Parsed once per file version: simulations load the corpus again for every client and scenario."""
    del mtime_ns  # part of the cache key only
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
    conversations: list[tuple[str, ...]] = []
    raw = doc.get("conversations", []) if isinstance(doc, dict) else []
    for conv in raw or []:
        if not isinstance(conv, list):
            continue
        # Numbers become text; booleans/nulls/nested values are dropped (see sources.as_text).
        lines = tuple(t.strip() for t in (as_text(x) for x in conv) if t is not None and t.strip())
        if len(lines) >= 2:
            conversations.append(lines)
    return tuple(conversations)


def _select(language: str, categories: list[str] | None) -> list[Path]:
    folder = corpus_dir(language)
    valid = chatterbot_categories(language)
    if categories is None:
        return [folder / f"{c}.yml" for c in valid]
    unknown = [c for c in categories if c not in valid]
    if unknown:
        raise ValueError(f"data.categories {unknown} not in the ChatterBot corpus; valid: {valid}")
    return [folder / f"{c}.yml" for c in valid if c in set(categories)]


def load_chatterbot(
    language: str = "english",
    categories: list[str] | None = None,
    turns: Turns = "pairs",
) -> list[Record]:
    """Deduplicated records from the ChatterBot corpus, in a stable order, with the file stem as category.

    See the module docstring for the three readings of ``turns``. With the default, English (1.3.3) gives
    1,176 single-turn records (748 distinct prompts) over 21 categories.

    Raises:
        ValueError: if the corpus is missing, or ``language``, ``categories`` or ``turns`` is unknown.
    """
    if turns not in TURNS:
        raise ValueError(f"turns {turns!r} is not one of {TURNS}")
    records: list[Record] = []
    seen: set[tuple[str, ...]] = set()
    for path in _select(language, categories):
        for lines in _read_conversations(path):
            if turns == "chat":
                n = len(lines) - len(lines) % 2  # drop a trailing unanswered user line
                key = tuple(lines[:n])
                if key not in seen:
                    seen.add(key)
                    messages = [
                        {"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(lines[:n])
                    ]
                    records.append({"messages": messages, "category": path.stem})
                continue
            if turns == "pairs":
                pairs = [(lines[0], r) for r in lines[1:]]
            else:
                pairs = list(itertools.pairwise(lines))
            for prompt, response in pairs:
                if (prompt, response) not in seen:
                    seen.add((prompt, response))
                    records.append({"prompt": prompt, "response": response, "category": path.stem})
    return records


def load_chatterbot_classification(
    language: str = "english",
    categories: list[str] | None = None,
) -> tuple[list[Record], list[str]]:
    """(text, label) records for encoder classifiers: text is a question, label the index of its category.

    Returns the records ``{"text", "label", "category"}`` and the label names; label ``i`` is
    ``label_names[i]``, the sorted category stems (only the selected ones), so the list is stable across
    runs and machines. A question listed under one category more than once appears once.

    Raises:
        ValueError: as :func:`load_chatterbot`.
    """
    paths = _select(language, categories)
    label_names = [p.stem for p in paths]
    records: list[Record] = []
    seen: set[tuple[str, int]] = set()
    for label, path in enumerate(paths):
        for lines in _read_conversations(path):
            if (lines[0], label) not in seen:
                seen.add((lines[0], label))
                records.append({"text": lines[0], "label": label, "category": path.stem})
    return records, label_names


def corpus_stats(records: list[Record]) -> dict[str, Any]:
    """Counts a user checks before training: records, categories and records per category."""
    per: dict[str, int] = {}
    for r in records:
        per[str(r.get("category"))] = per.get(str(r.get("category")), 0) + 1
    return {"records": len(records), "categories": len(per), "per_category": dict(sorted(per.items()))}
