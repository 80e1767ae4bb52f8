"""Small helpers shared by the benchmark scripts: a rich table on stdout, a JSON file under results/, peak RSS.

Benchmarks run as plain scripts (``.venv/bin/python benchmarks/NAME.py``), also from a checkout where
fedtune is not installed: ``ROOT`` is put on ``sys.path`` when this module is imported.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("FEDTUNE_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
"""Where ``write_json`` writes (``FEDTUNE_BENCH_RESULTS`` moves it, as the benchmark test does)."""
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine_info(device: str | None = None) -> dict[str, Any]:
    """Python, torch and CPU facts, and the accelerator's name when ``device`` is a CUDA device."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpus": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformers", "peft", "bitsandbytes"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    if device is not None and device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        info["device_name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as a rich table (first column left-aligned, the others right-aligned)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console(width=max(100, len(" | ".join(columns)) + 20)).print(table)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benchmarks/results/NAME`` (pretty, sorted keys); returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def tree_pss_bytes(pid: int | None = None) -> int:
    """Proportional set size of a process and all its descendants (``/proc/PID/smaps_rollup``): pages shared
    between them (a forked worker's copy-on-write model, shared libraries) count once in total, not once
    per process as in ``tree_rss_bytes``."""
    total, todo = 0, [os.getpid() if pid is None else pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
            todo.extend(_children(p))
        except (OSError, StopIteration):
            pass
    return total


def _proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.is_dir() else []:
        try:
            kids.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return kids


def tree_rss_bytes(pid: int | None = None) -> int:
    """Current resident memory of a process and all its descendants (psutil, else /proc)."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except ImportError:
        pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _proc_rss_bytes(p)
            todo.extend(_children(p))
        except OSError:
            pass
    return total


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so a later ``peak_rss_bytes`` covers one phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
