"""``fedtune client`` as a new user misconfigures it (issue 17, item 1).

A configuration, TLS or key mistake ends the node at once, non-zero, with the whole reason and the real key to
change; only a refused or dropped connection is retried, for at most ``client.max_retry_s``; key files are
checked before the model loads. Each test runs the real command in-process against a real gRPC server on
loopback (a coordinator stand-in: the node never gets as far as a round).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from fedtune.cli_federation import main
from fedtune.transport import create_keys, start_server
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import Instructions

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three federations' keys: the right one, one whose certificate names another host, another CA."""
    root = tmp_path_factory.mktemp("keys")
    return {"good": create_keys(root / "good", ["site-a"]),
            "other_host": create_keys(root / "other_host", ["site-a"], ["coord.example.org"], loopback=False),
            "other_ca": create_keys(root / "other_ca", ["site-a"])}


@pytest.fixture
def run_client(tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``fedtune client`` with the tiny model and ``extra`` overrides -> (exit code, stderr, stdout, seconds)."""
    def run(*extra: str) -> tuple[int, str, str, float]:
        t = time.monotonic()
        rc = main(["client", *tiny_overrides, "client.name=site-a", "client.max_backoff_s=0.5",
                   f"out={tmp_path / 'node'}", *extra])
        took = time.monotonic() - t
        out = capsys.readouterr()
        return rc, " ".join(out.err.split()), " ".join(out.out.split()), took
    return run


def _serve(keys_dir: Path | None):
    coord = StaticCoordinator(Instructions(1, "", {"w": torch.ones(2)}))
    if keys_dir is None:
        return start_server(coord, "127.0.0.1:0", bulk_port=None)
    return start_server(coord, "127.0.0.1:0", cert_file=keys_dir / "server.pem", key_file=keys_dir / "server.key",
                        allowlist_file=keys_dir / "allowlist.txt", bulk_port=None)


@pytest.mark.parametrize("address, key", [("nonsense", "client.server"), ("127.0.0.1:7443:3", "client.server"),
                                          ("127.0.0.1:99999", "client.server")])
def test_an_address_that_is_not_host_port_is_a_config_error(run_client, address, key):
    rc, err, _, _ = run_client(f"client.server={address}")
    assert rc == 2
    assert f"{key}: got '{address}'" in err


def test_a_host_that_does_not_resolve_exits_at_once_naming_client_server(run_client, keys):
    rc, err, out, took = run_client("client.server=coord.invalid:7443", f"client.keys_dir={keys['good']}")
    assert rc == 2, out + err
    assert "client.server" in err and "does not resolve" in err
    assert "reconnecting" not in out  # not retried
    assert took < 120


HOSTNAME_ADVICE = ("not valid for '127.0.0.1': set client.server to a name the certificate lists, or have the "
                   "operator add this one with `fedtune keys DIR --server-host 127.0.0.1`")


@pytest.mark.parametrize("server_keys, client_keys, says", [
    ("other_host", "other_host", HOSTNAME_ADVICE),
    ("good", "other_ca", "not signed by"),
    ("good", None, "the server speaks TLS: set client.keys_dir"),
    (None, "good", "the server speaks plaintext, not TLS: set client.insecure = true"),
])
def test_tls_mistakes_exit_at_once_with_the_key_to_change(run_client, keys, server_keys, client_keys, says):
    server = _serve(keys[server_keys] if server_keys else None)
    try:
        extra = [f"client.server=127.0.0.1:{server.port}"]
        if client_keys:
            extra.append(f"client.keys_dir={keys[client_keys]}")
        rc, err, out, _ = run_client(*extra)
    finally:
        server.stop(0)
    assert rc == 2, out + err
    assert says in err
    assert "gRPC said:" in err and len(err) > 200  # the whole reason, not cut at 120 characters
    assert "reconnecting" not in out


def test_plaintext_off_loopback_names_client_insecure(run_client):
    rc, err, _, _ = run_client("client.server=10.255.255.1:7443")
    assert rc == 2
    assert "client.insecure" in err and "client.keys_dir" in err and "transport.insecure" not in err


def test_a_refused_connection_is_retried_then_given_up_after_max_retry_s(run_client):
    rc, err, out, took = run_client(f"client.server=127.0.0.1:{free_port()}", "client.max_retry_s=3")
    assert rc == 1
    assert "gave up on 127.0.0.1" in err and "client.max_retry_s" in err and "Connection refused" in err
    assert "reconnecting in" in out and "giving up in" in out
    assert took < 120


def test_key_files_are_checked_before_the_model_loads(run_client, keys, tmp_path, monkeypatch):
    from fedtune.client import node

    def no_load(*a, **k):
        raise AssertionError("loaded the data/model before checking the key files")
    monkeypatch.setattr(node, "load_dataset", no_load)
    rc, err, _, _ = run_client("client.server=127.0.0.1:7443", f"client.keys_dir={keys['good']}",
                               "client.name=site-zz")
    assert rc == 2
    assert "client.keys_dir" in err and "nodes/site-zz.key" in err
    broken = tmp_path / "broken"
    (broken / "nodes").mkdir(parents=True)
    (broken / "ca.pem").write_text("not a certificate")
    (broken / "nodes" / "site-a.key").write_bytes((keys["good"] / "nodes" / "site-a.key").read_bytes())
    rc, err, _, _ = run_client("client.server=127.0.0.1:7443", f"client.keys_dir={broken}")
    assert rc == 2
    assert "ca.pem" in err and "client.keys_dir" in err
