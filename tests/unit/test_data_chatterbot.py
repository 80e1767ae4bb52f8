"""The built-in ChatterBot corpus and the classification loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.data import (
    chatterbot_categories,
    load_chatterbot,
    load_chatterbot_classification,
    load_classification,
    load_classification_jsonl,
)
from fedtune.data.chatterbot import _read_conversations


def test_english_corpus_numbers() -> None:
    records = load_chatterbot()
    cats = chatterbot_categories()
    assert len(cats) == 21 and "tech_support" in cats and cats == sorted(cats)
    # 1,176 unique (prompt, answer) pairs in chatterbot-corpus 1.3.3; tech_support repeats 10 pairs 1,050 times.
    assert 1100 <= len(records) <= 1300
    assert {r["category"] for r in records} == set(cats)
    pairs = [(r["prompt"], r["response"]) for r in records]
    assert len(set(pairs)) == len(pairs)
    assert sum(r["category"] == "tech_support" for r in records) == 10
    assert all(r["prompt"].strip() and r["response"].strip() for r in records)


def test_order_is_stable_and_categories_filter() -> None:
    assert load_chatterbot() == load_chatterbot()
    some = load_chatterbot(categories=["health", "ai"])
    assert {r["category"] for r in some} == {"ai", "health"}
    assert some[0] == {
        "prompt": "What is AI?",
        "response": "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
        "category": "ai",
    }
    with pytest.raises(ValueError, match=r"data.categories \['cooking'\] not in .*valid: \['ai'"):
        load_chatterbot(categories=["cooking"])
    with pytest.raises(ValueError, match="language 'klingon' .* valid: .*'english'"):
        load_chatterbot(language="klingon")
    with pytest.raises(ValueError, match="turns 'all'"):
        load_chatterbot(turns="all")  # type: ignore[arg-type]


def test_multi_turn_readings() -> None:
    pairs = load_chatterbot(categories=["conversations"])
    consecutive = load_chatterbot(categories=["conversations"], turns="consecutive")
    chats = load_chatterbot(categories=["conversations"], turns="chat")
    # "Hello" / "Hi" / "How are you doing?" / ...: as pairs every line answers "Hello";
    # read consecutively, "How are you doing?" answers "Hi".
    assert {"prompt": "Hello", "response": "How are you doing?", "category": "conversations"} in pairs
    assert {"prompt": "Hi", "response": "How are you doing?", "category": "conversations"} in consecutive
    longest = max(chats, key=lambda r: len(r["messages"]))
    assert len(longest["messages"]) >= 10 and len(longest["messages"]) % 2 == 0
    roles = [m["role"] for m in longest["messages"]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_non_string_yaml_values_are_coerced_or_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.yml"
    path.write_text(
        "conversations:\n- - How many legs has a cat?\n  - 4\n- - Is it?\n  - yes\n  - ~\n- - lonely\n",
        encoding="utf-8",
    )
    # 4 -> "4"; `yes` is a YAML boolean and null is nothing: both dropped; a list of one line is no pair.
    assert _read_conversations(path) == [["How many legs has a cat?", "4"]]


def test_chatterbot_classification_has_a_stable_label_list() -> None:
    records, names = load_chatterbot_classification()
    assert names == chatterbot_categories()
    assert 700 <= len(records) <= 800  # 751 unique (question, category)
    assert all(names[r["label"]] == r["category"] for r in records)
    assert load_classification("chatterbot") == (records, names)
    sub, sub_names = load_chatterbot_classification(categories=["trivia", "ai"])
    assert sub_names == ["ai", "trivia"] and {r["label"] for r in sub} == {0, 1}


def test_classification_jsonl_string_and_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"t": "good", "y": "pos"}, {"t": "bad", "y": "neg"}]))
    records, names = load_classification_jsonl(path, text_field="t", label_field="y")
    assert names == ["neg", "pos"]
    assert [r["label"] for r in records] == [1, 0]
    path.write_text(json.dumps({"text": "x", "label": 2}) + "\n")
    records, names = load_classification("jsonl", path)
    assert names == ["0", "1", "2"] and records == [{"text": "x", "label": 2, "category": "2"}]
    with pytest.raises(ValueError, match=r"label 2 in line 1 .* not one of \['a', 'b'\]"):
        load_classification_jsonl(path, label_names=["a", "b"])


def test_classification_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="data.label_field 'label' missing in line 1"):
        load_classification_jsonl(path)
    with pytest.raises(ValueError, match="data.path is required"):
        load_classification("jsonl")
    with pytest.raises(ValueError, match=r"source 'csv' is not one of \('jsonl', 'chatterbot'\)"):
        load_classification("csv")  # type: ignore[arg-type]
