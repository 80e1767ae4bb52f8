"""Multi-host on one machine: the server and two clients in separate Linux network namespaces, over TLS.

Namespaces ``ft-srv``, ``ft-c1``, ``ft-c2`` (suffixed with the test's pid) are joined by two veth pairs:
10.77.1.0/24 (server 10.77.1.1, client-0 10.77.1.2) and 10.77.2.0/24 (server 10.77.2.1, client-1
10.77.2.2). Nothing is routed anywhere else; the namespaces are deleted in a ``finally``. The server's
certificate is made for 10.77.1.1 and 10.77.2.1, and plaintext is refused off loopback, so this is TLS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.integration.test_federation import BASE, ROOT, SCENARIO, finish, metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _netns_available() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"ft-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _cleanup(procs: Iterable[subprocess.Popen], namespaces: list[str]) -> None:
    """Kill what still runs, then delete the namespaces."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_server_and_clients_in_separate_namespaces_over_tls(tmp_path: Path) -> None:
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    from fedtune.transport import create_keys

    tag = str(os.getpid())
    srv, c1, c2 = f"ft-srv-{tag}", f"ft-c1-{tag}", f"ft-c2-{tag}"
    keys = tmp_path / "keys"
    create_keys(keys, ["client-0", "client-1"], ["10.77.1.1", "10.77.2.1"])
    made: list[str] = []
    procs: dict[str, subprocess.Popen] = {}
    try:
        for ns in (srv, c1, c2):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, cli in ((1, c1), (2, c2)):
            a, b = f"fts{i}-{tag}"[:15], f"ftc{i}-{tag}"[:15]
            _ip("link", "add", a, "netns", srv, "type", "veth", "peer", "name", b, "netns", cli)
            _ip("-n", srv, "addr", "add", f"10.77.{i}.1/24", "dev", a)
            _ip("-n", cli, "addr", "add", f"10.77.{i}.2/24", "dev", b)
            _ip("-n", srv, "link", "set", a, "up")
            _ip("-n", cli, "link", "set", b, "up")
        common = [str(SCENARIO), *BASE, "federation.rounds=2", "federation.min_clients=2"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

        def run_in(ns: str, log: str, *args: str) -> subprocess.Popen:
            return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fedtune.cli_federation", *args],
                                    cwd=ROOT, env=env, stdout=open(tmp_path / log, "w"),
                                    stderr=subprocess.STDOUT)

        procs["server"] = run_in(srv, "server.log", "server", *common, f"out={tmp_path / 'run'}",
                                 "server.address=0.0.0.0:7443", f"server.keys_dir={keys}")
        procs["client-0"] = run_in(c1, "client-0.log", "client", *common, "client.name=client-0",
                                   "client.server=10.77.1.1:7443", f"client.keys_dir={keys}")
        procs["client-1"] = run_in(c2, "client-1.log", "client", *common, "client.name=client-1",
                                   "client.server=10.77.2.1:7443", f"client.keys_dir={keys}")
        finish(procs, tmp_path, timeout=600)
    finally:
        _cleanup(procs.values(), made)
    assert "(TLS, allow-list" in (tmp_path / "server.log").read_text()
    rows = [r for r in metrics(tmp_path / "run") if r["round"] >= 1]
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(2, 0), (2, 0)]
    leftover = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert tag not in leftover
