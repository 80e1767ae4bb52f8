"""Plaintext or unauthenticated service off loopback is an explicit, loudly logged choice (issue 16, item 9)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.transport import FederationClient, InsecureTransportError, create_keys, start_server
from fedtune.transport.security import check_exposure
from fedtune.transport.testing import StaticCoordinator

ROOT = Path(__file__).parents[2]


def test_loopback_needs_no_choice() -> None:
    assert check_exposure("127.0.0.1:1", tls=False, authenticated=False) == []


def test_plaintext_off_loopback_needs_insecure_and_says_so() -> None:
    with pytest.raises(InsecureTransportError, match=r"server\.keys_dir .* server\.insecure = true"):
        check_exposure("10.0.0.2:7070", tls=False, authenticated=True)
    [warning] = check_exposure("10.0.0.2:7070", tls=False, authenticated=True, insecure=True)
    assert warning.startswith("WARNING: plaintext gRPC on 10.0.0.2:7070")


def test_no_allowlist_off_loopback_needs_its_own_flag_even_with_insecure() -> None:
    with pytest.raises(InsecureTransportError, match="server.no_node_auth=true"):
        check_exposure("10.0.0.2:7070", tls=False, authenticated=False, insecure=True)
    warnings = check_exposure("10.0.0.2:7070", tls=False, authenticated=False, insecure=True, allow_anyone=True)
    assert [w.split(" on ")[0] for w in warnings] == ["WARNING: plaintext gRPC", "WARNING: no node authentication"]


@pytest.mark.integration
def test_start_server_refuses_an_open_public_port_and_logs_the_chosen_risks(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """0.0.0.0 serves every interface: not loopback."""
    with pytest.raises(InsecureTransportError, match="without node authentication"):
        start_server(StaticCoordinator(), "0.0.0.0:0", insecure=True, bulk_port=None)
    keys = create_keys(tmp_path / "keys", ["site-a"])
    with caplog.at_level(logging.WARNING, logger="fedtune.transport.server"):
        server = start_server(StaticCoordinator(), "0.0.0.0:0", insecure=True, bulk_port=None,
                              allowlist_file=keys / "allowlist.txt")  # plaintext, but node auth stays on
        server.stop(0)
        server = start_server(StaticCoordinator(), "0.0.0.0:0", insecure=True, allow_anyone=True, bulk_port=None)
        server.stop(0)
    text = [r.getMessage() for r in caplog.records]
    assert sum("plaintext gRPC on 0.0.0.0:0" in t for t in text) == 2
    assert sum("no node authentication on 0.0.0.0:0" in t for t in text) == 1


def test_an_insecure_client_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtune.transport.client"):
        FederationClient("10.0.0.2:7070", "site-a", insecure=True).close()
        FederationClient("127.0.0.1:7070", "site-a").close()
    [record] = caplog.records
    assert "node site-a talks to 10.0.0.2:7070 in plaintext" in record.getMessage()


def test_fedtune_server_insecure_on_a_public_address_exits_before_loading_anything(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "fedtune.cli_federation", "server", "--insecure",
                          "--address", f"0.0.0.0:{port}", f"out={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stderr
    assert "server.no_node_auth=true (--no-node-auth)" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder or the model
