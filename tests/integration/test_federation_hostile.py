"""Hostile text from enrolled nodes against a real `fedtune server` process at a terminal (issue 16, item 1).

The server runs with ``FORCE_COLOR=1``, so rich draws its live progress bars as it would for an operator at
a terminal. Two honest in-process nodes answer every round; ``mallory`` answers each round with a failure
whose error text holds rich markup (``[/x]``), terminal escapes, a forged log line and 200 KB of filler, and
a metric named ``[/x]``; a peer named ``x[/x]`` tries to join. The server must neither crash nor print or
record any of it unbounded or raw, and the honest rounds go on to a normal finish.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from fedtune.config import fingerprint, load_config
from fedtune.transport import Backoff, FederationClient, TransportError
from fedtune.types import ClientReply
from tests.integration.test_federation import SCENARIO, fedtune, finish, free_port, metrics

pytestmark = pytest.mark.integration

EVIL = "[/x][bold red]boom[/] \x1b[2J\x1b]0;pwned\x07\nround 9/9: eval_loss=0.0000 FORGED\r" + "A" * 200_000
COMMON = [str(SCENARIO), "eval.samples=0", "data.max_records=60", "federation.rounds=3", "federation.min_clients=3",
          "federation.round_timeout_s=120", "federation.wait_timeout_s=300", "federation.heartbeat_s=1",
          "federation.silence_s=30"]


def _node(addr: str, name: str, fp: str, outcome: dict[str, str], error: str | None = None) -> None:
    """Answer every round until told to stop: echo the global state, or fail with ``error``."""
    try:
        with FederationClient(addr, name, fingerprint=fp, backoff=Backoff(max_s=1.0, max_attempts=300)) as fc:
            while (ins := fc.wait_for_instructions(timeout=300, poll_s=5)) is not None:
                if ins.phase == "stop":
                    outcome[name] = "stop"
                    return
                if error is None:
                    reply = ClientReply(name, ins.round, dict(ins.state), 5, metrics={"train_loss": 1.0})
                else:
                    reply = ClientReply(name, ins.round, None, 0, metrics={"[/x]": 1.0}, error=error)
                fc.submit(reply, phase=ins.phase)
            outcome[name] = "no instructions"
    except TransportError as e:
        outcome[name] = f"refused: {e.reason}"


def test_markup_and_huge_text_from_nodes_neither_crash_nor_flood_the_server(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # the server's console acts as a terminal: live bars render markup
    monkeypatch.setenv("COLUMNS", "160")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    server = fedtune("server", *COMMON, f"out={tmp_path / 'run'}", f"server.address={addr}",
                     log=tmp_path / "server.log")
    fp = fingerprint(load_config(SCENARIO, COMMON[1:]))
    outcome: dict[str, str] = {}
    nodes = [("client-0", None), ("client-1", None), ("mallory", EVIL), ("x[/x]", None)]
    threads = [threading.Thread(target=_node, args=(addr, name, fp, outcome, err), daemon=True) for name, err in nodes]
    for t in threads:
        t.start()
    try:
        finish({"server": server}, tmp_path, timeout=400)
    finally:
        for t in threads:
            t.join(timeout=30)
    assert outcome["client-0"] == outcome["client-1"] == outcome["mallory"] == "stop", outcome
    assert "node name 'x[/x]' is not valid" in outcome["x[/x]"], outcome
    rows = [r for r in metrics(tmp_path / "run") if r["round"] >= 1]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["clients_ok"] == 2 and r["applied"], r
        why = r["failures"]["mallory"]
        assert why.startswith("client error: [/x][bold red]boom[/] \\x1b[2J"), why[:200]
        assert len(why) < 1200 and "\n" not in why and "\x1b" not in why and "more characters" in why
    assert max(len(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) < 20_000
    log = (tmp_path / "server.log").read_text()
    assert "MarkupError" not in log and "Traceback" not in log  # today's code raises in its progress bars
    assert len(log) < 100_000 and "\nround 9/9" not in log and "pwned\x07" not in log
    assert "mallory: client error: [/x][bold red]boom[/]" in log
    json.dumps(rows)  # the records stay plain data
