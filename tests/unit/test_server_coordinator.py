"""RoundCoordinator without a network: registration, round bookkeeping, deadlines, refusals."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from fedtune.server.coordinator import OBSERVER, RoundCoordinator, fingerprint_diff, natural_key
from fedtune.server.dispatch import BaseSync
from fedtune.strategies.exact import BaseUpdateLog
from fedtune.transport import ConfigMismatch, DecodedTensor, MessageRejected, UpdateHeader
from fedtune.types import Instructions, LowRankUpdate

FP = json.dumps({"model": "tiny-llama", "adapter": {"r": 4, "alpha": 8.0}}, sort_keys=True)
STATE = {"l.lora_A.weight": torch.zeros(4, 8), "l.lora_B.weight": torch.zeros(8, 4)}


def _coord(nodes=("a", "b")) -> RoundCoordinator:
    c = RoundCoordinator(FP, 3, silence_s=60)
    for n in nodes:
        c.register(n, FP)
    return c


def _tensors(state):
    return iter([DecodedTensor("state", k, v) for k, v in state.items()])


def _header(node, rnd=1):
    return UpdateHeader(round=rnd, phase="train", node=node, num_examples=4)


def test_natural_order_and_fingerprint_diff() -> None:
    assert sorted(["client-10", "client-2", "client-1"], key=natural_key) == ["client-1", "client-2", "client-10"]
    other = json.dumps({"model": "tiny-llama", "adapter": {"r": 8, "alpha": 8.0}})
    assert fingerprint_diff(FP, other) == ["adapter.r: server has 4, node has 8"]


def test_registration_refuses_another_config_and_keeps_observers_apart() -> None:
    c = _coord()
    with pytest.raises(ConfigMismatch, match="adapter.r: server has 4, node has 8"):
        c.register("x", json.dumps({"model": "tiny-llama", "adapter": {"r": 8, "alpha": 8.0}}))
    c.register("watch", OBSERVER)
    assert c.live_clients() == ["a", "b"]


def test_round_collects_replies_refuses_bad_ones_and_times_out_stragglers() -> None:
    c = _coord(("a", "b", "m"))
    ins = {n: Instructions(round=1, client_id=n, state=STATE) for n in ("a", "b", "m")}
    c.open_round(1, ins, deadline_s=1.0, buffer=2)
    assert c.next_instructions("a", 0.1) is ins["a"]
    c.submit("a", _header("a"), _tensors({k: v + 1 for k, v in STATE.items()}))
    with pytest.raises(MessageRejected, match="already answered"):
        c.submit("a", _header("a"), _tensors(STATE))
    with pytest.raises(MessageRejected, match="round 7"):
        c.submit("b", _header("b", 7), _tensors(STATE))
    with pytest.raises(MessageRejected, match="shape"):
        c.submit("m", _header("m"), _tensors({"l.lora_A.weight": torch.zeros(5, 8)}))
    t0 = time.monotonic()
    replies = {r.client_id: r for r in c.replies()}  # b never answers: left out at the deadline
    assert 0.8 < time.monotonic() - t0 < 3
    assert replies["a"].ok and replies["a"].bytes_up > 0
    assert "shape" in replies["m"].error and "deadline" in replies["b"].error
    assert c.rejected == 3
    with pytest.raises(MessageRejected, match="not collecting"):
        c.submit("b", _header("b"), _tensors(STATE))


def test_buffer_is_bounded_and_stop_reaches_every_node() -> None:
    c = _coord(("a", "b", "c"))
    c.open_round(1, {n: Instructions(round=1, client_id=n, state=STATE) for n in "abc"}, deadline_s=10, buffer=1)
    c.submit("a", _header("a"), _tensors(STATE))
    blocked = threading.Thread(target=c.submit, args=("b", _header("b"), _tensors(STATE)))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # waits for the aggregator to take "a"
    it = c.replies()
    assert next(it).client_id == "a"
    blocked.join(2)
    assert not blocked.is_alive()
    assert next(it).client_id == "b"
    c.submit("c", _header("c"), _tensors(STATE))
    assert [r.client_id for r in it] == ["c"]
    c.finish()
    assert c.next_instructions("a", 1).phase == "stop"


def _log_of_two_rounds() -> BaseUpdateLog:
    log = BaseUpdateLog()
    log.log = [{"l": LowRankUpdate(B=torch.full((8, 1), float(i)), A=torch.ones(1, 8))} for i in (1, 2)]
    return log


def test_a_restarted_node_gets_its_open_round_rebuilt_for_a_fresh_base() -> None:
    log = _log_of_two_rounds()
    sync = BaseSync(SimpleNamespace(base_log=log))
    c = _coord(("a", "b", "idle"))
    c.rebase = sync.rebase
    c.take_registrations()
    log.rewind("a", 1)
    log.rewind("b", 1)
    extra = {n: log.range(n) for n in ("a", "b")}  # both hold round 1's update; this round sends round 2's
    ins = {n: Instructions(round=3, client_id=n, state=STATE, base_update=log.pending(n), extra=extra[n])
           for n in ("a", "b")}
    c.open_round(3, ins, deadline_s=1.0, buffer=2)
    c.register("a", FP, base_updates=0)  # a restarted process: a fresh base model
    c.register("b", FP, base_updates=1)  # b registered again (e.g. a new session), its base is intact
    c.register("idle", FP, base_updates=0)  # not in this round: taken in before the next one
    assert c.next_instructions("a", 0.2) is None  # stale until the round loop rebuilds them
    assert c.next_instructions("b", 0.1) is ins["b"]
    collector = threading.Thread(target=lambda: list(c.replies()))
    collector.start()
    got = c.next_instructions("a", 2.0)
    collector.join()
    assert got is not None and (got.extra["base_from"], got.extra["base_to"]) == (0, 2)
    delta = got.base_update["l"].B @ got.base_update["l"].A
    assert torch.equal(delta, torch.full((8, 8), 3.0))  # rounds 1 and 2 together
    assert log.held_by("a") == log.held_by("b") == 2
    assert c.take_registrations() == {"idle": 0}


def test_a_heartbeat_costs_the_same_with_a_thousand_nodes_and_replies_do_not_wake_polls() -> None:
    """At 1,000 nodes every heartbeat sorted every live node under the coordinator's lock, and every reply
    woke every waiting poll: the round loop hardly got the lock."""
    c = _coord([f"n{i}" for i in range(1000)])
    c.last_seen = lambda: pytest.fail("a heartbeat's status must not look at every node")
    c.open_round(1, {"n0": Instructions(1, "n0", STATE), "n1": Instructions(1, "n1", STATE)}, 60, buffer=4)
    assert (c.status(detail=False).round, c.status(detail=False).phase) == (1, "train")
    woken = []
    real_wait = c._news.wait

    def counted(timeout=None):
        woken.append(timeout)
        return real_wait(timeout)
    c._news.wait = counted  # type: ignore[method-assign]
    poll = threading.Thread(target=c.next_instructions, args=("n999", 3.0))  # not sampled: waits
    poll.start()
    time.sleep(0.2)
    c.submit("n0", _header("n0"), _tensors(STATE))
    c.submit("n1", _header("n1"), _tensors(STATE))
    poll.join()
    assert len(woken) == 1  # one wait, to its timeout: the two replies did not wake it
