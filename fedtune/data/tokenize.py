"""Chat templating with prompt masking, packing and collation.

``encode_chat`` renders each record with the tokenizer's chat template and computes the loss only on what the
assistant says: system, user and template tokens get label ``-100``. It finds the assistant spans by rendering
growing prefixes of the conversation (``messages[:i]`` with ``add_generation_prompt=True`` versus
``messages[:i+1]``), which works for any template whose renderings of prefixes are string prefixes of the
whole (ChatML, Llama 3, Zephyr...). The end-of-turn tokens such a template adds after an answer
(``<|im_end|>``) are learned too, so the model learns to stop. For templates that are not prefix-stable
(e.g. ones that render earlier assistant turns differently from the last), the assistant's content is
located in the rendered text instead and only the content is learned.

The text is tokenized piece by piece at the borders of the assistant spans, so the mask is exact. With
byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen) the ids equal those of the whole text, since the
borders fall after a newline or special token; SentencePiece tokenizers may differ at a border by a
leading-space marker.

Tokenizers without a chat template (base models) get a plain template::

    [system prompt\\n\\n]### Question:\\n{user}\\n\\n### Answer:\\n{assistant}{eos}

Examples are lists of ints, unpadded; ``collate`` pads a batch on the right.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import torch

from fedtune.data.sources import Record, to_messages

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Example = dict[str, Any]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (instruct models do, base models usually not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_template(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> str:
    """The fallback template for tokenizers without one (see the module docstring)."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append("### Question:\n" + m["content"] + "\n\n")
        else:
            parts.append("### Answer:\n" + m["content"] + eos + "\n\n")
    if add_generation_prompt:
        parts.append("### Answer:\n")
    return "".join(parts)


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The text of a conversation through the tokenizer's chat template, or the plain fallback."""
    if not has_chat_template(tokenizer):
        return _plain_template(tokenizer, messages, add_generation_prompt)
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text)


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], full: str
) -> list[tuple[int, int]]:
    """Character spans of ``full`` that belong to assistant turns (content and end-of-turn text)."""
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        # i == 0 (an assistant speaking first) has no prefix to render: the content search below handles it.
        if i > 0 and upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            # Template not prefix-stable: fall back to the content itself, searched after the last span.
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ValueError(f"assistant turn {i} not found in the rendered chat template output")
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    return spans


def _bos_ids(tokenizer: Any, text: str) -> list[int]:
    """A BOS token for the plain template, when the tokenizer has one and the text does not start with it."""
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if has_chat_template(tokenizer) or bos is None or bos_id is None or text.startswith(bos):
        return []
    return [int(bos_id)]


def encode_messages(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], seq_len: int | None = None
) -> Example:
    """One conversation as ``input_ids``, ``labels`` (-100 outside assistant turns) and ``attention_mask``.

    The text is tokenized piece by piece at the span borders (with ``add_special_tokens=False``: the
    template writes its own special tokens), so the mask is exact; then truncated to ``seq_len``.
    """
    full = render(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, full)
    ids: list[int] = _bos_ids(tokenizer, full)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    cursor = 0
    for start, end in [*spans, (len(full), len(full))]:
        for text, learn in ((full[cursor:start], False), (full[start:end], True)):
            if not text:
                continue
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))
        cursor = end
    if seq_len is not None:
        ids, labels = ids[:seq_len], labels[:seq_len]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def encode_chat(
    records: Sequence[Record],
    tokenizer: Any,
    seq_len: int,
    system_prompt: str | None = None,
) -> list[Example]:
    """Tokenize records (single-turn or chat) for causal-LM finetuning with loss on the answers only.

    ``system_prompt`` is put first in conversations that have no system message (without one, the
    template's default applies, e.g. SmolLM2's). Sequences longer than ``seq_len`` are cut at the end;
    an example whose answer is cut away entirely is dropped (logged), since it would teach nothing.

    Raises:
        ValueError: if ``seq_len`` is not positive, a record has no known shape, or every example is dropped.
    """
    if seq_len <= 0:
        raise ValueError(f"train.seq_len must be positive, got {seq_len}")
    examples = []
    dropped = 0
    for r in records:
        ex = encode_messages(tokenizer, _with_system(to_messages(r), system_prompt), seq_len)
        if all(lab == IGNORE_INDEX for lab in ex["labels"]):
            dropped += 1
            continue
        examples.append(ex)
    if dropped:
        log.warning(
            "%d of %d examples dropped: no answer token fits in seq_len=%d", dropped, len(records), seq_len
        )
    if records and not examples:
        raise ValueError(f"train.seq_len={seq_len} is too short: no answer token fits in any example")
    return examples


@overload
def prompt_text(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, tokenize: Literal[False] = False
) -> str: ...


@overload
def prompt_text(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, *, tokenize: Literal[True]
) -> list[int]: ...


@overload
def prompt_text(
    tokenizer: Any, prompt: str, system_prompt: str | None, tokenize: Literal[True]
) -> list[int]: ...


def prompt_text(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, tokenize: bool = False
) -> str | list[int]:
    """The generation prompt for one question (the template with ``add_generation_prompt=True``), to
    sample an answer from, exactly as training rendered the questions; its token ids with ``tokenize=True``
    (special tokens as the template writes them, ready for ``generate``)."""
    messages = _with_system([{"role": "user", "content": prompt}], system_prompt)
    text = render(tokenizer, messages, add_generation_prompt=True)
    if not tokenize:
        return text
    return _bos_ids(tokenizer, text) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """The token ids of :func:`prompt_text`, for ``generate``."""
    return prompt_text(tokenizer, prompt, system_prompt, tokenize=True)


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Greedily pack whole examples, in order, into sequences of at most ``seq_len`` tokens.

    Fewer, fuller rows make small-batch CPU training cheaper. Packed examples attend to each other (no
    block-diagonal mask), the usual simplification of ``group_texts``-style packing; their labels stay
    masked as before. An example longer than ``seq_len`` is truncated.

    Raises:
        ValueError: if ``seq_len`` is not positive.
    """
    if seq_len <= 0:
        raise ValueError(f"train.seq_len must be positive, got {seq_len}")
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        n = min(len(ex["input_ids"]), seq_len)
        if ids and len(ids) + n > seq_len:
            packed.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
            ids, labels = [], []
        ids.extend(ex["input_ids"][:n])
        labels.extend(ex["labels"][:n])
    if ids:
        packed.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return packed


def collate(batch: Sequence[Example], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack examples into right-padded tensors: ``input_ids`` padded with ``pad_id``, ``attention_mask``
    with 0 and ``labels`` with -100. A scalar ``labels`` (classification) becomes a 1-D tensor.

    ``pad_to`` pads to a fixed length (at least the longest example) instead of the batch maximum.

    Raises:
        ValueError: if the batch is empty or an example is longer than ``pad_to``.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    if pad_to is not None:
        if width > pad_to:
            raise ValueError(f"an example has {width} tokens, more than pad_to={pad_to}")
        width = pad_to
    out: dict[str, torch.Tensor] = {}
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, "token_type_ids": 0}
    for key, fill in fills.items():
        if key not in batch[0]:
            continue
        if key == "labels" and isinstance(batch[0]["labels"], int):
            out[key] = torch.tensor([int(ex["labels"]) for ex in batch], dtype=torch.long)
            continue
        rows = [list(ex[key]) + [fill] * (width - len(ex[key])) for ex in batch]
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out


def encode_classification(records: Sequence[Record], tokenizer: Any, seq_len: int) -> list[Example]:
    """Tokenize ``{"text", "label"}`` records for a sequence classifier: ``input_ids``, ``attention_mask``
    (plus ``token_type_ids`` when the tokenizer gives them) and a scalar ``labels``, truncated to ``seq_len``
    with the tokenizer's own special tokens ([CLS] ... [SEP] for BERT).

    Raises:
        ValueError: if ``seq_len`` is not positive or a record lacks ``text`` or ``label``.
    """
    if seq_len <= 0:
        raise ValueError(f"train.seq_len must be positive, got {seq_len}")
    examples = []
    for i, r in enumerate(records):
        if "text" not in r or "label" not in r:
            raise ValueError(f"classification record {i} needs 'text' and 'label' keys, has {sorted(r)}")
        enc = tokenizer(r["text"], truncation=True, max_length=seq_len)
        ex: Example = {
            "input_ids": list(enc["input_ids"]),
            "attention_mask": list(enc["attention_mask"]),
            "labels": int(r["label"]),
        }
        if "token_type_ids" in enc:
            ex["token_type_ids"] = list(enc["token_type_ids"])
        examples.append(ex)
    return examples
