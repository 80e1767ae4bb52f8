"""JSONL / HF dataset loading, the errors a user sees for bad files, and the train/eval split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.data import from_hf_dataset, load_jsonl, split_train_eval
from fedtune.data.sources import as_text, to_messages


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_single_turn_and_chat_lines_in_one_file(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "What is 2+2?", "response": "4"}, "", {"messages": chat}, {"prompt": "n", "response": 7}],
    )
    records = load_jsonl(path)
    assert records == [
        {"prompt": "What is 2+2?", "response": "4", "category": None},
        {"messages": chat, "category": None},
        {"prompt": "n", "response": "7", "category": None},  # numbers become text
    ]
    assert to_messages(records[0]) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_custom_field_names_and_category(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A", "topic": "math"}])
    records = load_jsonl(path, prompt_field="question", response_field="answer", category_field="topic")
    assert records == [{"prompt": "Q", "response": "A", "category": "math"}]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "a", "response": "b"}, "{not json"], "line 2 of .* is not valid JSON"),
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "a"}],
            "data.response_field 'response' missing in line 2",
        ),
        ([{"prompt": "", "response": "b"}], "data.prompt_field 'prompt' .* line 1 .* empty"),
        ([[1, 2]], "line 1 .* is not a JSON object"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "line 1 .* has no assistant message"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "role 'bot' is not one of"),
        ([{"messages": [{"role": "user"}]}], r"messages\[0\] in line 1 .* needs 'role' and 'content'"),
    ],
)
def test_bad_lines_name_the_line_and_field(tmp_path: Path, rows: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))


def test_missing_category_is_none_but_a_bad_one_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d",
                                                                              "topic": "x"}])
    assert [r["category"] for r in load_jsonl(path, category_field="topic")] == [None, "x"]
    bad = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": "b", "topic": ["list"]}])
    with pytest.raises(ValueError, match="data.category_field 'topic' in line 1"):
        load_jsonl(bad, category_field="topic")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.path: file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_hf_dataset_and_dict_of_columns() -> None:
    from datasets import Dataset

    cols = {"q": ["a", "b"], "a": ["1", "2"], "c": ["x", "y"]}
    expected = [
        {"prompt": "a", "response": "1", "category": "x"},
        {"prompt": "b", "response": "2", "category": "y"},
    ]
    kwargs = {"prompt_field": "q", "response_field": "a", "category_field": "c"}
    assert from_hf_dataset(Dataset.from_dict(cols), **kwargs) == expected
    assert from_hf_dataset(cols, **kwargs) == expected
    with pytest.raises(ValueError, match="differ in length"):
        from_hf_dataset({"prompt": ["a"], "response": []})
    with pytest.raises(ValueError, match="data.prompt_field 'prompt' missing in row 0"):
        from_hf_dataset({"x": ["a"]})


def test_as_text_refuses_yaml_booleans() -> None:
    assert as_text(42) == "42"
    assert as_text(1.5) == "1.5"
    assert as_text(True) is None  # YAML's `yes` would otherwise become "True"
    assert as_text(None) is None
    assert as_text(["a"]) is None


def records(n: int = 100) -> list[dict[str, Any]]:
    cats = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    return [{"prompt": f"q{i}", "response": f"r{i}", "category": cats[i]} for i in range(n)]


def test_split_is_seeded_disjoint_and_complete() -> None:
    data = records()
    train, evals = split_train_eval(data, 0.2, seed=3)
    assert len(evals) == 20 and len(train) == 80
    assert sorted(r["prompt"] for r in train + evals) == sorted(r["prompt"] for r in data)
    assert split_train_eval(data, 0.2, seed=3) == (train, evals)
    assert split_train_eval(data, 0.2, seed=4)[1] != evals
    assert split_train_eval(data, 0.0, seed=3) == (data, [])


def test_stratified_split_keeps_category_proportions() -> None:
    _, evals = split_train_eval(records(), 0.2, seed=0, stratify_by="category")
    counts = {c: sum(r["category"] == c for r in evals) for c in "abc"}
    assert counts == {"a": 12, "b": 6, "c": 2}


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="data.eval_fraction must be in"):
        split_train_eval(records(), 1.0, seed=0)
    with pytest.raises(ValueError, match="leaves no training records"):
        split_train_eval(records(1), 0.5, seed=0)


def test_dataset_dict_asks_for_one_split() -> None:
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({"train": Dataset.from_dict({"prompt": ["a"], "response": ["b"]})})
    with pytest.raises(ValueError, match=r"pass one split of the dataset, e.g. ds\['train'\]"):
        from_hf_dataset(dd)


def test_stratified_split_of_tiny_groups_still_gives_an_eval_record() -> None:
    data = [{"prompt": str(i), "response": "r", "category": f"c{i // 2}"} for i in range(10)]
    train, evals = split_train_eval(data, 0.1, seed=0, stratify_by="category")
    assert len(evals) == 1 and len(train) == 9
