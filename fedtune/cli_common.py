"""What every ``fedtune`` subcommand shares: reading its config and turning errors into exit codes.

``fedtune.cli`` (the entry point) and ``fedtune.cli_federation`` (server, client, status, keys) both use it,
so neither imports the other's internals: ``cli`` registers the federation commands, and
``python -m fedtune.cli_federation`` runs them alone with the same error handling.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
LOG_WIDTH = 200
"""Columns of a command's output when it goes to a file or a pipe (a log): rich's 80 would wrap its lines."""


def console() -> Any:
    """A rich ``Console`` for a command's output: a terminal's own width; ``LOG_WIDTH`` columns when the output
    is a file or a pipe and ``COLUMNS`` does not say otherwise."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = LOG_WIDTH
    return out


def quiet_libraries() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A subcommand's config file (or None) and ``key=value`` overrides: without a file, the first
    positional (``fedtune train key=value``) is an override, not a path."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():
        return None, [path, *overrides]
    return path, overrides


def config_from_args(args: argparse.Namespace) -> Any:
    """The config of a subcommand: its optional file (``args.config``) and ``key=value`` overrides."""
    from fedtune.config import load_config

    return load_config(*config_args(args))


def overwrite_flag(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--overwrite``: a fresh run may replace the run already in its ``out`` folder (refused otherwise)."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the out= folder (without it such a folder is refused)")
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; overrides may follow flags (``export RUN DEST --merge model.name=x``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run_command(commands: dict[str, Callable[[argparse.Namespace], int]], args: argparse.Namespace) -> int:
    """Run ``args.command``: a config problem exits 2 with every problem listed, a failed run 1, never a
    traceback (``FEDTUNE_DEBUG=1`` shows it)."""
    quiet_libraries()
    from fedtune.config import ConfigError

    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"fedtune {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"fedtune {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        if os.environ.get("FEDTUNE_DEBUG"):
            raise
        print(f"fedtune {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        if os.environ.get("FEDTUNE_DEBUG"):
            raise
        print(f"fedtune {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
