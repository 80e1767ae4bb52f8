"""``fedtune``: one entry point, subcommands are plain functions.

Every subcommand takes an optional config file (TOML or YAML) and ``key=value`` overrides, and runs on
defaults without a file. Errors are one clear line on stderr and a non-zero exit code (2 for bad input,
1 for a failed run), never a traceback; ``FEDTUNE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.cli_common import EXIT_BAD_INPUT, EXIT_FAILED, config_args, overwrite_flag, parse, run_command
from fedtune.cli_common import config_from_args as _config
from fedtune.cli_common import quiet_libraries as _quiet_libraries

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_FAILED", "_quiet_libraries", "build_parser", "main"]


def cmd_train(args: argparse.Namespace) -> int:
    """Finetune an adapter on this site's data alone (the single-site baseline)."""
    from rich.console import Console

    from fedtune.local import run_train
    from fedtune.runs import claim_run_folder

    cfg = _config(args)
    claim_run_folder(cfg.out, overwrite=args.overwrite)
    run_train(cfg, Console())
    return 0


def _run_config(args: argparse.Namespace, run: str | None) -> Any:
    """The config of a command that reads run ``run`` (eval, export): the run's ``config.toml`` (or, for a
    bare adapter folder, its base model from ``adapter_config.json``), then ``args.config`` and overrides.
    An explicit config file replaces the run's."""
    path, overrides = config_args(args)
    if run is None or path:
        return _config(args)
    from fedtune.config import load_config
    from fedtune.models.registry import HF_IDS

    folder = Path(_adapter_folder(run))
    for saved in (Path(run) / "config.toml", folder.parent / "config.toml"):
        if saved.is_file():
            return load_config(saved, overrides)
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    name = {v: k for k, v in HF_IDS.items()}.get(base, base)  # a built-in's id, or the base's folder
    return load_config(None, [*([f"model.name={name}"] if name else []), *overrides])


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an adapter or run folder (or the base model alone) on the held-out split of the data. With a
    run folder, its config.toml gives the model, quantization and data (key=value overrides on top)."""
    from peft import PeftModel
    from rich.console import Console
    from rich.markup import escape

    from fedtune.eval import evaluate, generate_answers
    from fedtune.models import load_base
    from fedtune.pipeline import encode, load_dataset

    cfg = _run_config(args, args.adapter)
    console = Console()
    data = load_dataset(cfg)
    base, tok, _, device, _ = load_base(cfg, num_labels=len(data.label_names) or None)
    model = PeftModel.from_pretrained(base, _adapter_folder(args.adapter)) if args.adapter else base
    ev = encode(data.eval_records, tok, cfg, for_training=False)
    from fedtune.models.loader import effective_compute_dtype

    metrics = evaluate(model, ev, device=device, pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size,
                       max_batches=cfg.eval.max_batches, compute_dtype=effective_compute_dtype(cfg, device))
    for k, v in metrics.items():
        console.print(f"{k}: {v:.4f}")
    prompts = [r["prompt"] for r in data.eval_records if "prompt" in r][: cfg.eval.samples]
    if cfg.model.task == "causal_lm" and prompts:
        for p, a in zip(prompts, generate_answers(model, tok, prompts, device=device,
                                                  max_new_tokens=cfg.eval.max_new_tokens), strict=True):
            console.print(f"[bold]Q:[/] {escape(p)}\n[green]A:[/] {escape(a)}")  # data and model text: no markup
    return 0


def _adapter_folder(path: str) -> str:
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return str(p / "adapter")
    if not (p / "adapter_config.json").is_file():
        raise ValueError(f"{path}: no adapter_config.json (give an adapter folder or a run folder)")
    return str(p)


def cmd_export(args: argparse.Namespace) -> int:
    """Copy a run's adapter as a PEFT folder, or merge it into the base model (--merge: the run's config.toml
    gives the base model, key=value overrides on top)."""
    import shutil

    from peft import PeftModel

    from fedtune.adapters import merge_and_save

    src = _adapter_folder(args.run)
    dest = Path(args.dest)
    if not args.merge:
        shutil.copytree(src, dest, dirs_exist_ok=True)
        print(f"adapter exported to {dest} (load with peft.PeftModel.from_pretrained(base, {str(dest)!r}))")
        return 0
    cfg = _run_config(args, args.run)
    if cfg.quant.mode != "none":  # merging into 4/8-bit weights would lose the update
        import dataclasses

        print(f"the run's base is quantized ({cfg.quant.mode}): merging into the unquantized weights of "
              f"{cfg.model.name}")
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, mode="none"))
    from fedtune.models import load_base

    base, tok, _, _, _ = load_base(cfg)
    model = PeftModel.from_pretrained(base, src)
    merge_and_save(model, dest)
    tok.save_pretrained(str(dest))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"merged model ({cfg.model.name}) saved to {dest} in {dtype} (load with "
          f"AutoModelForCausalLM.from_pretrained({str(dest)!r}, torch_dtype='auto'))")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Parameters, quantized weight memory, adapter bytes on the wire and a training-memory estimate."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fedtune.info import available_bytes, choose_batch_clients, estimate, verdict

    cfg = _config(args)
    info = estimate(cfg)
    mib = 2**20
    t = Table(title=f"fedtune info: {cfg.model.name}, quant={cfg.quant.mode}, {cfg.adapter.method} r={cfg.adapter.r}")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("base parameters", f"{info.params:,}")
    t.add_row("base weights in memory", f"{info.weight_bytes / mib:,.1f} MiB")
    t.add_row("trainable parameters", f"{info.trainable:,} ({100 * info.trainable / max(1, info.params):.3f}%)")
    t.add_row("adapter bytes on the wire (fp32, per update)", f"{info.trainable * 4 / mib:,.2f} MiB")
    t.add_row("gradients", f"{info.grads_bytes / mib:,.1f} MiB")
    t.add_row(f"optimizer state ({cfg.train.optimizer})", f"{info.optimizer_bytes / mib:,.1f} MiB")
    t.add_row(f"activations (batch {cfg.train.batch_size} x seq {cfg.train.seq_len}"
              f"{', checkpointed' if cfg.model.gradient_checkpointing else ''})", f"{info.activation_bytes / mib:,.1f} MiB")
    t.add_row("[bold]estimated training memory[/]", f"[bold]{info.total_bytes / mib:,.1f} MiB[/]")
    free, where = available_bytes(cfg.model.device)
    k, why = choose_batch_clients(cfg, info, free, where)
    t.add_row(f"sim.batch_clients=auto would choose ({escape(why)})", f"{k}")
    Console().print(t)
    for line in verdict(cfg, info, free, where):
        print(line)
    from fedtune.strategies import make_strategy

    strategy = make_strategy(cfg.strategy.name, cfg.strategy)
    if getattr(strategy, "needs_all_replies", False):
        note = "holds every reply of a round at once (server memory grows with clients x adapter size)"
    else:
        note = "consumes replies one at a time (server memory stays at about one adapter)"
    Console().print(f"strategy {cfg.strategy.name}: {note}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate a federation on this machine: many virtual clients sharing one base model."""
    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.simulation.engine import run_simulation

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise ValueError(f"--resume {run_dir}: not a run folder (no config.toml)")
        cfg = load_config(run_dir / "config.toml", [*([args.config] if args.config else []), *args.overrides])
        if Path(cfg.out) != run_dir:
            import dataclasses

            cfg = dataclasses.replace(cfg, out=str(run_dir))
        run_simulation(cfg, Console(), resume=run_dir)
    else:
        from fedtune.runs import claim_run_folder

        cfg = _config(args)
        claim_run_folder(cfg.out, overwrite=args.overwrite,
                         resume_hint=f"continue it with `fedtune simulate --resume {cfg.out}`, ")
        run_simulation(cfg, Console())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print every config key with its type, default and help (the config reference)."""
    from fedtune.config import describe

    for key, tp, default, help_text in describe():
        print(f"{key:32s} {default:22s} {help_text}  [{tp}]")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
    "info": cmd_info,
    "config": cmd_config,
    "simulate": cmd_simulate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated finetuning of LLMs with LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", nargs="?", help="TOML or YAML config file (optional)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 adapter.r=8")
        return p

    with_config(overwrite_flag(sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)))
    with_config(sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__))
    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    p.add_argument("--adapter", help="adapter folder or run folder (default: the base model alone)")
    with_config(p)
    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("run", help="run folder or adapter folder")
    p.add_argument("dest", help="destination folder")
    p.add_argument("--merge", action="store_true", help="merge into the base model and save a full model")
    with_config(p)
    p = sub.add_parser("simulate", help=cmd_simulate.__doc__, description=cmd_simulate.__doc__)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last completed round")
    overwrite_flag(p)
    with_config(p)
    sub.add_parser("config", help=cmd_config.__doc__, description=cmd_config.__doc__)
    from fedtune.cli_federation import register as register_federation

    register_federation(sub, COMMANDS)
    from fedtune.cli_privacy import register as register_privacy

    register_privacy(sub, COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS, parse(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
