"""The server loop's transport: liveness settings from the config, base updates kept in step over gRPC."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedtune.config import ConfigError, fingerprint, load_config
from fedtune.server import BaseSync, open_transport
from fedtune.strategies.exact import BaseUpdateLog
from fedtune.transport import FederationClient
from fedtune.types import ClientReply, Instructions, LowRankUpdate
from tests.integration.test_federation import SCENARIO, free_port

pytestmark = pytest.mark.integration  # sockets on loopback

STATE = {"l.lora_A.weight": torch.zeros(1, 8), "l.lora_B.weight": torch.zeros(8, 1)}


def test_heartbeat_and_silence_are_validated() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.heartbeat_s=0", "federation.silence_s=-1"])
    assert sorted(err.value.problems) == ["federation.heartbeat_s: got 0.0, must be > 0",
                                          "federation.silence_s: got -1.0, must be > 0"]
    with pytest.raises(ConfigError, match="federation.silence_s: got 2.0, must exceed federation.heartbeat_s"):
        load_config(None, ["federation.heartbeat_s=2", "federation.silence_s=2"])


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, ["server.address=127.0.0.1:0", f"out={tmp_path}", *overrides])


def test_nodes_beat_at_the_configured_interval_and_silent_ones_drop_out(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "federation.heartbeat_s=0.2", "federation.silence_s=1")
    coord, server = open_transport(cfg, {})
    addr, fp = f"127.0.0.1:{server.port}", fingerprint(cfg)
    try:
        with FederationClient(addr, "beating", fingerprint=fp) as fc, \
                FederationClient(addr, "quiet", fingerprint=fp, heartbeat=False):
            assert fc.heartbeat_interval_s == pytest.approx(0.2)  # the server's value, sent at registration
            assert coord.live_clients() == ["beating", "quiet"]
            time.sleep(1.5)
            assert coord.live_clients() == ["beating"]
    finally:
        server.stop(0)


def test_a_node_reporting_its_base_gets_the_missing_updates(tmp_path: Path) -> None:
    log = BaseUpdateLog()
    log.log = [{"l": LowRankUpdate(B=torch.full((8, 1), float(i)), A=torch.ones(1, 8))} for i in (1, 2)]
    sync = BaseSync(SimpleNamespace(base_log=log))
    cfg = _cfg(tmp_path)
    coord, server = open_transport(cfg, {})
    coord.rebase = sync.rebase
    try:
        with FederationClient(f"127.0.0.1:{server.port}", "a", fingerprint=fingerprint(cfg), heartbeat=False,
                              base_updates=1) as fc:
            sync.rewind(coord.take_registrations())
            extra = log.range("a")
            assert extra == {"base_from": 1, "base_to": 2}
            coord.open_round(3, {"a": Instructions(3, "a", STATE, base_update=log.pending("a"), extra=extra)},
                             deadline_s=20, buffer=2)
            collector = threading.Thread(target=lambda: list(coord.replies()))
            collector.start()
            fc.report_base(0)  # the model lost its base (what a restarted process reports when it registers)
            ins = fc.poll(wait_s=5)
            assert ins is not None and (ins.extra["base_from"], ins.extra["base_to"]) == (0, 2)
            assert ins.base_update is not None
            assert torch.equal(ins.base_update["l"].B @ ins.base_update["l"].A, torch.full((8, 8), 3.0))
            assert fc.submit(ClientReply("a", 3, STATE, num_examples=1)).accepted
            collector.join(5)
    finally:
        server.stop(0)


def test_a_failing_server_never_tells_its_nodes_the_federation_is_done(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the round loop stops serving without a ``stop``: nodes keep reconnecting for a restart."""
    from rich.console import Console

    from fedtune.server import loop
    from fedtune.transport import Backoff, TransportError

    def crash(plan, run, model, strategy, dispatcher, console, resume=None):
        dispatcher.available(1)
        raise RuntimeError("a bug in the round loop")

    monkeypatch.setattr(loop, "run_rounds", crash)
    port = free_port()
    cfg = load_config(SCENARIO, [f"out={tmp_path}", f"server.address=127.0.0.1:{port}", "federation.min_clients=1",
                                 "federation.wait_timeout_s=120", "eval.samples=0", "data.max_records=30"])
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_server(cfg, Console(file=io.StringIO()))
        except BaseException as e:  # noqa: BLE001 - the test inspects what the server raised
            failed.append(e)

    server = threading.Thread(target=serve)
    server.start()
    told: list[str] = []
    with FederationClient(f"127.0.0.1:{port}", "site-a", fingerprint=fingerprint(cfg), heartbeat=False,
                          backoff=Backoff(initial_s=0.2, max_s=1.0, max_attempts=200)) as fc:
        fc.backoff = Backoff(initial_s=0.1, max_s=0.2, max_attempts=2)  # connected: give up fast from here on
        with pytest.raises(TransportError):
            for _ in range(40):
                ins = fc.poll(wait_s=1.0)
                if ins is not None:
                    told.append(ins.phase)
    server.join(60)
    assert [type(e) for e in failed] == [RuntimeError] and told == []
