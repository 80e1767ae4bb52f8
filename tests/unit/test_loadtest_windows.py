"""The interleaved attack measurement of ``benchmarks/exhaustion.py`` (``fedtune.transport.loadtest``): the
window plan, each attack window's ratio to its attack-off neighbours, and the incremental metrics reader
(pure parts; the real run is in tests/integration/test_exhaustion.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.transport.loadtest import MetricsTail, Window, neighbour_ratios, window_plan


def _window(attack: str | None, seconds: float, n: int = 4) -> Window:
    rows = [{"round": i, "seconds": seconds, "clients_ok": 2, "clients_failed": 0} for i in range(n)]
    return Window(attack, rows, acked=2 * n, server_cpu_s=0.05 * n, attack_cpu_s=0.0, rounds_between_marks=n,
                  wall_s=seconds * n)


def test_every_attack_window_has_an_off_window_on_each_side() -> None:
    plan = window_plan(["a", "b"], 2)
    assert plan == [None, "a", None, "b", None, "a", None, "b", None]


def test_each_attack_window_is_compared_with_its_own_neighbours() -> None:
    # the machine slows down over the run (off windows 60, 30, 15 rounds/min); the attack costs nothing
    # in the first window and halves the rate in the second: a ratio against the first off window only
    # would say 0.5 and 0.125
    windows = [_window(None, 1.0), _window("a", 1.5), _window(None, 2.0), _window("a", 8.0), _window(None, 4.0)]
    ratios = neighbour_ratios(windows)
    assert ratios[0] is None and ratios[2] is None and ratios[4] is None
    assert ratios[1] == pytest.approx(40.0 / 45.0)
    assert ratios[3] == pytest.approx(7.5 / 22.5)


def test_a_window_at_the_end_uses_its_one_neighbour() -> None:
    ratios = neighbour_ratios([_window(None, 1.0), _window("a", 2.0)])
    assert ratios == [None, pytest.approx(0.5)]


def test_window_counts_failed_and_lost_updates() -> None:
    w = _window("a", 1.0)
    w.rounds[1]["clients_failed"], w.rounds[2]["clients_ok"] = 1, 1
    assert (w.failed, w.lost) == (1, 1)
    assert w.server_cpu_ms_per_round == pytest.approx(50.0)


def test_metrics_tail_reads_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.poll() == [] and tail.last == 0  # no file yet
    line = json.dumps({"round": 1, "seconds": 0.1})
    path.write_text(json.dumps({"round": 0, "eval_loss": 1.0}) + "\n" + line[:7])  # round 1 half written
    assert tail.poll() == [] and tail.last == 0
    with path.open("a") as f:
        f.write(line[7:] + "\n" + json.dumps({"round": 2, "seconds": 0.2}) + "\n")
    assert [r["round"] for r in tail.poll()] == [1, 2] and tail.last == 2
