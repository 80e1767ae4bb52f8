"""The run folder every command writes: ``config.toml``, ``metrics.jsonl``, ``adapter/`` (PEFT format).

Writes are atomic (write to a temporary name, fsync, rename), so a run killed at any moment leaves either
the previous or the new file, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fedtune.config import Config, save_config


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder ``tmp`` into place as ``final`` (old one removed after the swap)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


RUN_FILES = ("config.toml", "metrics.jsonl", "adapter", "checkpoint.pt", "plot.png")
"""What a run writes into its folder (``checkpoint.pt`` is ``fedtune.checkpoint.CHECKPOINT``)."""


class RunExists(ValueError):
    """A fresh run was asked to write into a folder that holds another run."""


def claim_run_folder(path: str | Path, *, overwrite: bool, resume_hint: str = "") -> None:
    """Make sure a fresh run may write into ``path``: refuse when it holds a run's files, unless
    ``overwrite``, which removes them first (only those: anything else in the folder stays).

    Raises:
        RunExists: ``path`` holds a run and ``overwrite`` is off; the message says what to do instead.
    """
    p = Path(path)
    found = [name for name in RUN_FILES if (p / name).exists()]
    if not found:
        return
    if not overwrite:
        raise RunExists(f"out={p} already holds a run ({', '.join(found)}): choose another out=..., "
                        f"{resume_hint}or pass --overwrite to replace it")
    for name in found:
        if (p / name).is_dir():
            shutil.rmtree(p / name)
        else:
            (p / name).unlink()


class RunDir:
    """One output folder; ``metrics.jsonl`` gets one JSON object per step or round."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def write_config(self, cfg: Config) -> None:
        tmp = self.path / "config.toml.tmp"
        save_config(cfg, tmp)
        os.replace(tmp, self.path / "config.toml")

    def log(self, record: dict[str, Any], durable: bool = False) -> None:
        """Append one JSON line in one ``write``; ``durable`` fsyncs it (round records). A kill mid-write can
        still cut the line short: ``read_metrics`` leaves such a last line out."""
        line = (json.dumps(_clean(record)) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Keep only ``records`` (a resumed run drops the lines of rounds after its checkpoint)."""
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(_clean(r)) + "\n" for r in records).encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl``, in order.

        A last line without its newline that is not a whole record was cut short by a kill mid-write: it is
        left out (a resumed run rewrites the file without it; its round had not been checkpointed).

        Raises:
            ValueError: any other line is not a JSON object (naming the file and line).
        """
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_bytes().split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        records = [self._record(line, n) for n, line in enumerate(lines, 1) if line.strip()]
        if torn.strip():
            try:
                records.append(self._record(torn, len(lines) + 1))
            except ValueError:
                pass  # cut short by a kill mid-write
        return records

    def _record(self, line: bytes, n: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else "not a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"not a JSON record ({exc})"
        if problem is not None:
            raise ValueError(f"{self.metrics_path}:{n}: {problem}; remove that line (or the folder, to start over)")
        return record

    def save_adapter(self, model: Any) -> Path:
        """Save the PEFT adapter atomically to ``adapter/``."""
        from fedtune.adapters import save_adapter

        tmp = self.path / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp)
        replace_dir(tmp, self.adapter_path)
        return self.adapter_path
