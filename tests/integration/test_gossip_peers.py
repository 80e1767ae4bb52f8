"""``fedtune gossip`` peers as real processes on loopback with the tiny random Llama: they end with the very
adapters ``fedtune simulate`` gives its nodes, and a peer killed mid-run re-joins after a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.transport import create_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 3-4 processes loading a model each

ROOT = Path(__file__).parents[2]
SCENARIO = str(ROOT / "simulations" / "gossip_ring.toml")
TINY = ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "train.max_steps=1",
        "train.batch_size=2", "train.seq_len=48", "data.max_records=60", "eval.samples=0", "eval.max_batches=1",
        "adapter.r=4", "adapter.alpha=8", "sim.categories_per_client=1"]


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def peer_list(n: int) -> str:
    return "gossip.peers=[" + ",".join(f'"client-{i}@127.0.0.1:{p}"' for i, p in enumerate(free_ports(n))) + "]"


def start(tmp: Path, i: int, *args: str) -> subprocess.Popen:
    log = open(tmp / f"peer-{i}.log", "a")  # noqa: SIM115 (the process writes it)
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", "gossip", SCENARIO, *TINY, *args,
                             f"gossip.name=client-{i}", f"out={tmp / f'run-{i}'}"], stdout=log, stderr=log,
                            env={**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"})


def finish(tmp: Path, procs: dict[int, subprocess.Popen], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    for i, p in procs.items():
        try:
            code = p.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"peer {i} did not finish:\n{(tmp / f'peer-{i}.log').read_text()[-3000:]}") from None
        assert code == 0, (tmp / f"peer-{i}.log").read_text()[-3000:]


def stop(procs: dict[int, subprocess.Popen]) -> None:
    """Kill the peers still running (a failed test leaves none behind)."""
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"round"' in x]


def test_four_peers_with_mutual_tls_end_with_the_simulator_s_node_adapters(tmp_path: Path) -> None:
    common = ["sim.rounds=2", "gossip.topology=ring", "gossip.mix=factors", "gossip.exchanges_per_round=2"]
    keys = create_keys(tmp_path / "keys", [f"client-{i}" for i in range(4)], peers=True)
    peers = peer_list(4)
    procs = {i: start(tmp_path, i, *common, peers, "gossip.partition=true", "gossip.join_timeout_s=300",
                      f"gossip.keys_dir={keys / 'sites' / f'client-{i}'}") for i in range(4)}
    try:
        sim = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", SCENARIO, *TINY, *common,
                              "sim.num_clients=4", f"out={tmp_path / 'sim'}"], capture_output=True, text=True,
                             timeout=600, check=False)
        assert sim.returncode == 0, sim.stderr[-2000:]
        finish(tmp_path, procs)
    finally:
        stop(procs)
    assert "with mutual TLS" in (tmp_path / "peer-0.log").read_text()
    gap = 0.0
    for i in range(4):
        mine, theirs = load_file(str(tmp_path / f"run-{i}" / "adapter" / "adapter_model.safetensors")), \
            load_file(str(tmp_path / "sim" / "nodes" / f"client-{i}" / "adapter_model.safetensors"))
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.allclose(mine[k], theirs[k], atol=1e-6, rtol=0), (i, k)
        last = rounds(tmp_path / f"run-{i}")[-1]
        assert last["round"] == 2 and last["failures"] == {} and last["neighbours_live"] == 2
        # the bytes the peer served and fetched are what the simulator counts for its node, every round
        for mine_r, sim_r in zip(rounds(tmp_path / f"run-{i}")[1:], rounds(tmp_path / "sim")[1:], strict=True):
            node = sim_r["clients"][f"client-{i}"]
            assert (mine_r["bytes_up"], mine_r["bytes_down"]) == (node["bytes_up"], node["bytes_down"]), mine_r["round"]
            assert node["bytes_up"] > 2 * 2 * sum(t.numel() * 4 for t in mine.values())  # 2 neighbours x 2 exchanges
        log = (tmp_path / f"peer-{i}.log").read_text()
        assert f"fedtune gossip: peer client-{i} of 4, ring/factors, 2 rounds" in log and "eval_loss:" in log
        gap = max(gap, *(float((mine[k] - theirs[k]).abs().max()) for k in mine))
    nodes = [load_file(str(tmp_path / f"run-{i}" / "adapter" / "adapter_model.safetensors")) for i in (0, 2)]
    assert any(not torch.equal(nodes[0][k], nodes[1][k]) for k in nodes[0]), "a ring of 4: nodes 0 and 2 differ"
    print(f"largest difference between a peer's adapter and the simulator's node: {gap:.2e}")


def test_a_peer_killed_mid_run_is_missed_by_the_others_and_re_joins_after_a_restart(tmp_path: Path) -> None:
    common = ["sim.rounds=12", "gossip.topology=ring", "gossip.mix=product", "gossip.round_timeout_s=6",
              "gossip.join_timeout_s=300", "gossip.partition=true", peer_list(3)]
    procs = {i: start(tmp_path, i, *common) for i in range(3)}
    run2 = tmp_path / "run-2"
    deadline = time.monotonic() + 600
    try:
        while not ((run2 / "metrics.jsonl").is_file() and any(r["round"] >= 2 for r in rounds(run2))):
            assert time.monotonic() < deadline and procs[2].poll() is None, \
                (tmp_path / "peer-2.log").read_text()[-2000:]
            time.sleep(0.2)
        os.kill(procs[2].pid, signal.SIGKILL)
        procs[2].wait()
        killed_after = max(r["round"] for r in rounds(run2))
        while not any("client-2" in r.get("failures", {}) for r in rounds(tmp_path / "run-0")):
            assert time.monotonic() < deadline, (tmp_path / "peer-0.log").read_text()[-2000:]
            time.sleep(0.2)
        procs[2] = start(tmp_path, 2, *common)  # the same command: it resumes from its checkpoint
        finish(tmp_path, procs)
    finally:
        stop(procs)
    log2 = (tmp_path / "peer-2.log").read_text()
    found = re.search(r"re-joining at round (\d+): its checkpoint is of round (\d+)", log2)
    assert found and f"resuming {run2}" in log2, log2[-2000:]
    back_at, checkpoint = int(found[1]), int(found[2])
    assert checkpoint <= killed_after < back_at
    mine = [r["round"] for r in rounds(run2)]  # what it trained: up to its checkpoint, then from the re-join on
    assert mine == [*range(checkpoint + 1), *range(back_at, 13)], mine
    for i in (0, 1):
        theirs = rounds(tmp_path / f"run-{i}")
        missed = [r["round"] for r in theirs if "client-2" in r.get("failures", {})]
        back = [r["round"] for r in theirs if r["round"] > max(missed) and r["clients_ok"] == 3]
        assert missed and back, [(r["round"], r["failures"]) for r in theirs]
        first = next(r for r in theirs if r["round"] == missed[0])
        assert "did not answer in time" in first["failures"]["client-2"]
        assert theirs[-1]["round"] == 12


@pytest.mark.long
def test_four_peers_in_separate_network_namespaces_gossip_over_mutual_tls(tmp_path: Path) -> None:
    """Peers ``ft-g0..3-<pid>`` on one bridge (in namespace ``ft-gbr-<pid>``), 10.78.0.1-4/24, nothing routed
    elsewhere; the namespaces are deleted in a ``finally``. Plaintext is refused off loopback: this is TLS."""
    from tests.integration.test_netns import _cleanup, _ip, _netns_available

    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    tag = str(os.getpid())
    hub, spaces = f"ft-gbr-{tag}", [f"ft-g{i}-{tag}" for i in range(4)]
    keys = create_keys(tmp_path / "keys", [f"client-{i}" for i in range(4)], peers=True)
    peers = "gossip.peers=[" + ",".join(f'"client-{i}@10.78.0.{i + 1}:7700"' for i in range(4)) + "]"
    made: list[str] = []
    procs: dict[int, subprocess.Popen] = {}
    try:
        for ns in (hub, *spaces):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(spaces):
            a, b = f"ftgh{i}-{tag}"[:15], f"ftgp{i}-{tag}"[:15]
            _ip("link", "add", a, "netns", hub, "type", "veth", "peer", "name", b, "netns", ns)
            _ip("-n", hub, "link", "set", a, "master", "br0")
            _ip("-n", hub, "link", "set", a, "up")
            _ip("-n", ns, "addr", "add", f"10.78.0.{i + 1}/24", "dev", b)
            _ip("-n", ns, "link", "set", b, "up")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
        for i, ns in enumerate(spaces):
            log = open(tmp_path / f"peer-{i}.log", "w")  # noqa: SIM115 (the process writes it)
            procs[i] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "fedtune.cli", "gossip", SCENARIO, *TINY,
                 "sim.rounds=2", "gossip.partition=true", peers, f"gossip.name=client-{i}",
                 f"gossip.keys_dir={keys / 'sites' / f'client-{i}'}", f"out={tmp_path / f'run-{i}'}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        finish(tmp_path, procs, timeout=600)
    finally:
        _cleanup(procs.values(), made)
    for i in range(4):
        assert "with mutual TLS" in (tmp_path / f"peer-{i}.log").read_text()
        rows = [r for r in rounds(tmp_path / f"run-{i}") if r["round"] >= 1]
        assert [(r["round"], r["failures"], r["neighbours_live"]) for r in rows] == [(1, {}, 2), (2, {}, 2)]
    leftover = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert tag not in leftover
