"""The ``fedtune`` console entry point: the first commands run as a user runs them (a subprocess of
``.venv/bin/fedtune``); the later ones call the same ``main`` in this process, which spares each a fresh import of
torch, transformers and peft (about 12 s of CPU each) and checks the same exit code and output."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

FEDTUNE = Path(sys.executable).parent / "fedtune"
SUBCOMMANDS = ("train", "eval", "export", "info", "config")
DATA_FIELDS = ["data.prompt_field=question", "data.response_field=answer", "data.category_field=topic"]

pytestmark = [pytest.mark.skipif(not FEDTUNE.is_file(), reason=f"console script {FEDTUNE} not installed"),
              pytest.mark.integration]  # subprocesses that load and train models


def fedtune(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FEDTUNE_DEBUG", None)
    return subprocess.run([str(FEDTUNE), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def fedtune_here(*args: str) -> subprocess.CompletedProcess[str]:
    """``fedtune ARGS`` through ``fedtune.cli.main`` in this process: its exit code and what it printed. The
    library log levels and warning filters a command sets are put back after it."""
    from fedtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    names = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "httpx")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return subprocess.CompletedProcess(["fedtune", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One ``fedtune train`` on tiny-llama with a JSONL of our own; returns the run folder and the overrides."""
    tmp = tmp_path_factory.mktemp("cli")
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.", "topic": "math" if i % 2 else "sums"}
            for i in range(40)]
    data = tmp / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    overrides = ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "train.max_steps=2",
                 "train.batch_size=2", "train.seq_len=48", "data.max_records=60", "eval.samples=1",
                 "eval.max_new_tokens=4", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj]",
                 f"data.path={data}", *DATA_FIELDS]
    run = tmp / "run1"
    proc = fedtune("train", *overrides, f"out={run}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return run, overrides


def test_help_lists_every_subcommand() -> None:
    proc = fedtune("--help")
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str) -> None:
    proc = fedtune(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fedtune " + name)


def test_broken_config_lists_every_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    proc = fedtune("train", "model.name=tiny-llama", "train.colour=red", "train.lr=fast", "adapter.r=0",
                   f"data.path={missing}", f"out={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 4, proc.stderr
    for key in ("train.colour", "train.lr", "adapter.r", "data.path"):
        assert sum(key in line for line in problems) == 1, (key, proc.stderr)
    assert not (tmp_path / "run").exists(), "a bad config must fail before anything is written"


def test_train_writes_a_run_folder(trained_run: tuple[Path, list[str]]) -> None:
    import tomllib

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.models import resolve

    run, _ = trained_run
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["model"]["name"] == "tiny-llama" and cfg["data"]["prompt_field"] == "question"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) >= 2 and all(isinstance(r["eval_loss"], float) for r in evals)
    assert records[-1]["step"] == 2
    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama").path)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_export_merge_gives_a_full_model(trained_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    run, overrides = trained_run
    dest = tmp_path / "merged"
    # --merge before the positionals: argparse cannot take overrides after an optional flag (see below)
    proc = fedtune_here("export", "--merge", str(run), str(dest), *overrides)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(str(dest))
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_export_merge_flag_after_positionals(trained_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    run, overrides = trained_run
    proc = fedtune_here("export", str(run), str(tmp_path / "merged"), "--merge", *overrides)
    assert proc.returncode == 0, proc.stderr


def test_export_adapter_copy(trained_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    run, _ = trained_run
    dest = tmp_path / "exported"
    proc = fedtune_here("export", str(run), str(dest))
    assert proc.returncode == 0, proc.stderr
    assert (dest / "adapter_config.json").is_file() and (dest / "adapter_model.safetensors").is_file()


def test_info_prints_trainable_parameters(tiny_overrides: list[str]) -> None:
    proc = fedtune_here("info", *tiny_overrides)
    assert proc.returncode == 0, proc.stderr
    assert "trainable parameters" in proc.stdout


def test_eval_of_an_adapter_prints_eval_loss(trained_run: tuple[Path, list[str]]) -> None:
    run, overrides = trained_run
    proc = fedtune_here("eval", "--adapter", str(run), *overrides)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("eval_loss:"))
    assert float(line.split(":")[1]) > 0


def test_nf4_adapter_trains_after_an_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedtune train evaluates and samples before training; the NF4 adapter must still learn (every B moves)."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"What is {i} times two?", "response": f"{i} times two is {2 * i}."} for i in range(20)]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user in that folder types them
    proc = fedtune_here("train", "data.path=mine.jsonl", "model.name=tiny-llama", "quant.mode=nf4",
                        "train.max_steps=2", "train.batch_size=2", "train.seq_len=48", "eval.max_new_tokens=2",
                        "out=run1")
    assert proc.returncode == 0, proc.stderr
    state = load_file(str(tmp_path / "run1" / "adapter" / "adapter_model.safetensors"))
    frozen = [k for k, v in state.items() if "lora_B" in k and not v.any()]
    assert not frozen, f"every LoRA B must train after an evaluation; still zero: {frozen}"


def test_eval_of_a_run_reads_its_config(trained_run: tuple[Path, list[str]]) -> None:
    """No overrides: the run's config.toml gives model, data fields and split, so the loss is the run's own."""
    run, _ = trained_run
    proc = fedtune_here("eval", "--adapter", str(run))
    assert proc.returncode == 0, proc.stderr
    got = float(next(line for line in proc.stdout.splitlines() if line.startswith("eval_loss:")).split(":")[1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert got == pytest.approx([r for r in records if "eval_loss" in r][-1]["eval_loss"], rel=1e-4)
    proc = fedtune_here("eval", "--adapter", str(run), "eval.batch_size=1", "eval.max_batches=1")  # overrides on top
    assert proc.returncode == 0, proc.stderr


def test_export_merge_of_a_run_reads_its_config_and_says_the_dtype(trained_run: tuple[Path, list[str]],
                                                                  tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.models import resolve

    run, _ = trained_run
    dest = tmp_path / "merged"
    proc = fedtune_here("export", str(run), str(dest), "--merge")
    assert proc.returncode == 0, proc.stderr
    assert f"merged model (tiny-llama) saved to {dest} in float32" in " ".join(proc.stdout.split())
    merged = AutoModelForCausalLM.from_pretrained(str(dest))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama").path),
                                     str(run / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, rtol=1e-4, atol=1e-5)


def test_eval_of_a_bare_adapter_folder_takes_its_base_model(trained_run: tuple[Path, list[str]],
                                                           tmp_path: Path) -> None:
    run, overrides = trained_run
    dest = tmp_path / "exported"
    assert fedtune_here("export", str(run), str(dest)).returncode == 0
    data_only = [o for o in overrides if o.startswith(("data.", "train.seq_len", "eval."))]
    proc = fedtune_here("eval", "--adapter", str(dest), "quant.mode=none", "quant.compute_dtype=fp32", *data_only)
    assert proc.returncode == 0, proc.stderr
    assert float(next(line for line in proc.stdout.splitlines() if line.startswith("eval_loss:")).split(":")[1]) > 0


def test_a_command_writing_to_a_log_does_not_wrap_at_80_columns(monkeypatch, capsys) -> None:
    from fedtune.cli_common import LOG_WIDTH, console

    monkeypatch.delenv("COLUMNS", raising=False)
    line = "node client-0: round 1 train train_loss=4.1234 -> update for round 1 received " + "x" * 80
    console().print(line, highlight=False)
    assert capsys.readouterr().out == line + "\n" and len(line) < LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "60")  # the user's choice wins
    console().print(line, highlight=False)
    assert capsys.readouterr().out.count("\n") > 1
