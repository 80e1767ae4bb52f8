"""Every benchmark's ``--quick`` mode runs, and its JSON backs the table it prints (issue 17, item 11).

The figures in the README come from these scripts; when one stops running (as ``local_step.py`` did when
``train_local`` took its steps from its ``TrainConfig``), nothing else would notice. Each script runs as a user
runs it, writing its JSON into a temporary folder (``FEDTUNE_BENCH_RESULTS``). Every row the table prints
must be in the JSON: its label as a string, and each number it shows as a number of the JSON (up to the
printed precision, in the printed unit).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.bench, pytest.mark.integration]
BENCH = Path(__file__).parents[2] / "benchmarks"
QUICK = {  # script -> the JSON its --quick run writes
    "local_step.py": "local_step_quick.json",
    "aggregate.py": "aggregate_quick.json",
    "agg_error_real.py": "agg_error_real.json",
    "quality.py": "quality_quick.json",
    "sim_scale.py": "sim_scale_quick.json",
    "sim_vs_flower.py": "sim_vs_flower_quick.json",
    "transport.py": "transport_quick.json",
    "federation.py": "federation_quick.json",
}
NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|\.\d+)")
SCALES = (1, 100, 1e-3, 1e3, 1e-6, 1e6, 2**-10, 2**-20, 2**-30, 1e-9)  # %, ms, k, MiB, GiB, GB ...


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of every rich table in ``stdout`` (cells stripped; header rows use another rule)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in stdout.splitlines()
            if line.strip().startswith("│")]


def json_leaves(data: object) -> tuple[list[float], set[str]]:
    nums: list[float] = []
    texts: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                texts.add(str(k))
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        elif isinstance(x, bool):
            return
        elif isinstance(x, int | float):
            if math.isfinite(x):
                nums.append(float(x))
        elif isinstance(x, str):
            texts.add(x)
    walk(data)
    return nums, texts


def backed(cell: str, nums: list[float]) -> bool:
    """Whether the number shown in ``cell`` is one of ``nums`` in some unit, to the shown precision."""
    m = NUMBER.match(cell.replace(" ", ""))
    if not m:
        return True  # not a number: labels are checked separately
    text = m.group(0).replace(",", "")
    shown = float(text)
    decimals = len(text.split(".")[1].split("e")[0]) if "." in text else 0
    tol = 0.5 * 10**-decimals * (10 ** int(text.split("e")[1]) if "e" in text else 1) * 1.01 + 1e-12
    return any(abs(v * s - shown) <= max(tol, 0.01 * abs(shown)) for v in nums for s in SCALES)


def test_the_checker_catches_an_unbacked_table():
    nums, texts = json_leaves({"rows": [{"label": "fedavg", "seconds": 1.234, "bytes": 3 * 2**20}]})
    assert backed("1.23", nums) and backed("3.0 MiB", nums) and backed("1,234 ms", nums)
    assert not backed("4.56", nums)
    assert "fedavg" in texts


def test_every_benchmark_has_a_quick_mode():
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(QUICK)
    for name in scripts:
        assert "--quick" in (BENCH / name).read_text(), name


@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_mode_runs_and_its_json_backs_its_table(script: str, tmp_path: Path):
    env = {**os.environ, "FEDTUNE_BENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                          env=env, cwd=BENCH.parent, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = tmp_path / QUICK[script]
    assert path.is_file(), f"{script} --quick wrote no {path.name}: {sorted(p.name for p in tmp_path.iterdir())}"
    nums, texts = json_leaves(json.loads(path.read_text()))
    rows = table_rows(proc.stdout)
    assert rows, f"{script} printed no table:\n{proc.stdout[-2000:]}"
    for row in rows:
        label = row[0]
        if label and not NUMBER.match(label):
            assert any(label in t or t in label for t in texts if len(t) > 1), f"row {label!r} not in {path.name}"
        for cell in row[1:]:
            assert backed(cell, nums), f"{script}: {cell!r} in row {row} is not a number of {path.name}"
