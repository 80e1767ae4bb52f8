"""Ten thousand mutated messages of every RPC and the bulk lane against a real `fedtune server` with honest
nodes training (issue 16): the server neither crashes, hangs nor answers INTERNAL, its memory stays put, and
the honest rounds go on. ``benchmarks/fuzz.py`` runs the same for 10^5 messages and more."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.transport.fuzzing import fuzz_federation
from tests.integration.test_federation import SCENARIO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ten_thousand_mutated_messages_leave_the_federation_running(tmp_path: Path) -> None:
    out = fuzz_federation(tmp_path, SCENARIO, messages=10_000, seed=1616, baseline_s=10.0)
    assert out["server_alive"], out["examples"]
    assert out["internal"] == out["unknown"] == out["hangs"] == out["unavailable"] == 0, out["examples"]
    assert out["rss_after_mib"] - out["rss_before_mib"] < 150, out
    assert out["rounds_fuzzing"] >= 5 and out["honest_errors"] == [], out
    sent = {rpc: sum(c.values()) for rpc, c in out["outcomes"].items()}
    assert set(sent) == {"Challenge", "Register", "Heartbeat", "Status", "GetInstructions", "SubmitUpdate", "bulk"}
    assert sum(sent.values()) == 10_000
