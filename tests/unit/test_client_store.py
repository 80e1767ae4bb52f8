"""Per-client state on disk survives a kill between a round's client writes and its checkpoint: a resumed
run reads each client's state as of the checkpoint, never an older or a newer one."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.simulation.store import OPTIMIZER, ClientStore


def _state(rnd: int, cid: str) -> dict:
    return {"optimizer": {"step": torch.tensor(rnd), "who": cid}, "pipeline": {"residual": torch.full((2,), rnd)}}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _same(a[k], b[k]) if isinstance(a[k], dict) else
        (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]) for k in a)


def test_a_kill_before_the_checkpoint_resumes_from_the_previous_rounds_state(tmp_path: Path) -> None:
    store = ClientStore("disk", tmp_path)
    for cid in ("a", "b"):
        store.put(cid, 1, _state(1, cid))
    # checkpoint of round 1 written; round 2 writes both clients' state, then the run is killed
    for cid in ("a", "b"):
        store.put(cid, 2, _state(2, cid))
    resumed = ClientStore("disk", tmp_path)
    resumed.load_state_dict({}, 1)
    # the resumed round 2: each client reads its round-1 state, including b after a has been written again
    for cid in ("a", "b"):
        assert _same(resumed.get(cid), _state(1, cid)), cid
        resumed.put(cid, 2, _state(2, cid))
    assert _same(resumed.get("b"), _state(2, "b"))


def test_only_the_state_no_checkpoint_can_need_is_removed(tmp_path: Path) -> None:
    store = ClientStore("disk", tmp_path)
    store.put("a", 1, _state(1, "a"))
    store.put("b", 1, _state(1, "b"))
    store.put("a", 3, _state(3, "a"))  # b was not sampled in rounds 2 and 3
    store.put("a", 4, _state(4, "a"))
    names = sorted(p.name for p in (tmp_path / OPTIMIZER).iterdir())
    assert names == ["a.r3.pt", "a.r4.pt", "b.r1.pt"]  # a.r3 is what the round-3 checkpoint needs
    store.load_state_dict({}, 3)
    assert _same(store.get("a"), _state(3, "a")) and _same(store.get("b"), _state(1, "b"))
