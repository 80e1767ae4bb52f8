"""A port in use (issue 17, item 3): gRPC's SO_REUSEPORT let two servers share one and split the nodes."""

from __future__ import annotations

import socket

import pytest
import torch

from fedtune.cli_federation import main
from fedtune.transport import start_server
from fedtune.transport.testing import StaticCoordinator
from fedtune.types import Instructions

pytestmark = pytest.mark.integration


def _coord() -> StaticCoordinator:
    return StaticCoordinator(Instructions(1, "", {"w": torch.ones(2)}))


def test_a_second_server_on_the_same_port_is_refused():
    first = start_server(_coord(), "127.0.0.1:0", bulk_port=None)
    try:
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+: the port is in use.*server\.address"):
            start_server(_coord(), f"127.0.0.1:{first.port}", bulk_port=None)
    finally:
        first.stop(0)


def test_a_socket_held_without_reuseport_is_reported_too():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="the port is in use"):
            start_server(_coord(), f"127.0.0.1:{s.getsockname()[1]}", bulk_port=None)


def test_fedtune_server_says_so_before_loading_the_model(tiny_overrides, tmp_path, capsys, monkeypatch):
    from fedtune.server import loop

    def no_load(*a, **k):
        raise AssertionError("loaded the data/model before binding the port")
    monkeypatch.setattr(loop, "load_dataset", no_load)
    first = start_server(_coord(), "127.0.0.1:0", bulk_port=None)
    try:
        rc = main(["server", *tiny_overrides, f"server.address=127.0.0.1:{first.port}", f"out={tmp_path / 'run'}"])
    finally:
        first.stop(0)
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert f"cannot listen on 127.0.0.1:{first.port}: the port is in use" in err and "server.address" in err


def test_server_address_that_is_not_host_port_is_a_config_error(tiny_overrides, tmp_path, capsys):
    rc = main(["server", *tiny_overrides, "--address", "7070", f"out={tmp_path / 'run'}"])
    assert rc == 2
    assert "--address: got '7070', expected host:port" in capsys.readouterr().err
