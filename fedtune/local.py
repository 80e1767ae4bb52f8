"""The single-site recipe behind ``fedtune train``: setup -> evaluate -> train -> evaluate -> save.

It runs exactly the code a federated client runs for one round (load, encode, ``train_local``), so a site
can check its data and hardware alone before joining a federation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.adapters import get_state, nbytes, num_params, set_state
from fedtune.config import Config
from fedtune.eval import evaluate, generate_answers
from fedtune.models import load_model
from fedtune.pipeline import encode, load_dataset
from fedtune.runs import RunDir
from fedtune.train import train_local


@dataclass
class TrainSummary:
    before: dict[str, float]
    after: dict[str, float]
    train: dict[str, float]
    samples_before: list[str]
    samples_after: list[str]
    prompts: list[str]


def step_progress(console: Console, description: str) -> tuple[Progress, Any]:
    """A rich progress bar over training steps and the callback ``train_local`` drives it with."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console,
                        transient=False, disable=not console.is_terminal)
    task = progress.add_task(description, total=None, loss=float("nan"))

    def update(step: int, total: int, loss: float) -> None:
        progress.update(task, completed=step, total=total, loss=loss)

    return progress, update


def run_train(cfg: Config, console: Console) -> TrainSummary:
    """Finetune an adapter on this site's data and write the run folder ``cfg.out``."""
    run = RunDir(cfg.out)
    run.write_config(cfg)
    data = load_dataset(cfg)
    num_labels = len(data.label_names) or None
    console.print(f"[bold]fedtune train[/] model={cfg.model.name} quant={cfg.quant.mode} "
                  f"adapter={cfg.adapter.method} r={cfg.adapter.r} records={len(data.train_records)} train / "
                  f"{len(data.eval_records)} eval")
    lm = load_model(cfg, num_labels=num_labels)
    tok = lm.tokenizer
    train_ex = encode(data.train_records, tok, cfg)
    eval_ex = encode(data.eval_records, tok, cfg, for_training=False)
    eval_kw = {"device": lm.device, "pad_id": tok.pad_token_id, "batch_size": cfg.eval.batch_size,
               "max_batches": cfg.eval.max_batches, "compute_dtype": lm.compute_dtype}
    prompts = [r["prompt"] for r in data.eval_records if "prompt" in r][: cfg.eval.samples]
    gen = cfg.model.task == "causal_lm" and cfg.eval.samples > 0
    before = evaluate(lm.model, eval_ex, **eval_kw)
    samples_before = generate_answers(lm.model, tok, prompts, device=lm.device,
                                      max_new_tokens=cfg.eval.max_new_tokens,
                                      system_prompt=cfg.data.system_prompt) if gen else []
    run.log({"step": 0, **{k: v for k, v in before.items()}})
    progress, update = step_progress(console, "training")
    last: dict[str, Any] = {"step": 0, "state": None}

    def after_step(step: int, total: int, loss: float) -> None:
        last.update(step=step, state={k: v.detach().to("cpu", copy=True) for k, v in get_state(lm.model).items()})
        update(step, total, loss)

    try:
        with progress:
            result = train_local(lm.model, train_ex, cfg.train, device=lm.device, compute_dtype=lm.compute_dtype,
                                 pad_id=tok.pad_token_id, seed=cfg.seed, on_step=run.log, progress=after_step)
    except KeyboardInterrupt:
        if last["state"] is not None:  # the adapter of the last completed step, not a half-applied one
            set_state(lm.model, last["state"])
            run.save_adapter(lm.model)
            console.print(f"interrupted: the adapter after step {last['step']} is in {run.adapter_path}",
                          highlight=False)
        raise
    after = evaluate(lm.model, eval_ex, **eval_kw)
    samples_after = generate_answers(lm.model, tok, prompts, device=lm.device, max_new_tokens=cfg.eval.max_new_tokens,
                                     system_prompt=cfg.data.system_prompt) if gen else []
    state = get_state(lm.model)
    run.log({"step": int(result.metrics["steps"]), **after, **{f"train_{k}": v for k, v in result.metrics.items()},
             "adapter_params": num_params(state), "adapter_bytes": nbytes(state)})
    run.save_adapter(lm.model)
    summary = TrainSummary(before, after, result.metrics, samples_before, samples_after, prompts)
    print_summary(console, cfg, summary, nbytes(state))
    return summary


def print_summary(console: Console, cfg: Config, s: TrainSummary, adapter_bytes: int) -> None:
    table = Table(title="fedtune train: summary")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("eval_loss", "perplexity", "accuracy"):
        if key in s.before or key in s.after:
            table.add_row(key, f"{s.before.get(key, float('nan')):.4f}", f"{s.after.get(key, float('nan')):.4f}")
    console.print(table)
    console.print(f"train loss {s.train['loss']:.4f} over {int(s.train['steps'])} steps, "
                  f"{int(s.train['tokens'])} tokens in {s.train['seconds']:.1f} s "
                  f"({s.train['tokens_per_s']:.0f} tokens/s); adapter {adapter_bytes / 2**20:.2f} MiB")
    for prompt, b, a in zip(s.prompts, s.samples_before, s.samples_after, strict=False):
        console.print(f"[bold]Q:[/] {escape(prompt)}\n  [dim]before:[/] {escape(b)}\n  [green]after:[/]  {escape(a)}")
    console.print(f"run folder: {cfg.out} (config.toml, metrics.jsonl, adapter/)")
