"""``sim.mode = gossip`` on the tiny random Llama: the CLI scenario, node folders, bytes, dropouts, frozen A."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.gossip.mixing import consensus_distance
from fedtune.simulation.engine import run_simulation

pytestmark = pytest.mark.integration  # trains simulated nodes

ROOT = Path(__file__).parents[2]
TINY = ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "train.max_steps=1",
        "train.batch_size=2", "train.seq_len=48", "data.max_records=60", "eval.samples=0", "eval.max_batches=1",
        "adapter.r=4", "adapter.alpha=8", "sim.rounds=2", "sim.categories_per_client=1"]
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"round"' in x]


def test_the_ring_scenario_runs_from_the_cli_and_writes_the_average_and_every_node(tmp_path: Path) -> None:
    run = tmp_path / "ring"
    out = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "simulations" / "gossip_ring.toml"),
                          *TINY, "sim.num_clients=4", "gossip.mix=factors", f"out={run}"],
                         check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gossip ring/factors" in out.stdout
    nodes = [_load(run / "nodes" / f"client-{i}") for i in range(4)]
    average = _load(run / "adapter")
    for k in average:  # factors: the average adapter is the mean of A and of B
        assert torch.allclose(average[k], sum(n[k] for n in nodes) / 4, atol=1e-6), k
    gap = max(float((nodes[0][k] - nodes[2][k]).abs().max()) for k in average)
    assert gap > 1e-6, "nodes 0 and 2 are not neighbours on a ring of 4: their adapters must still differ"
    last = _rounds(run)[-1]
    assert last["round"] == 2
    assert last["consensus_distance"] == pytest.approx(consensus_distance(nodes, scale=8 / 4), rel=1e-4)
    for key in ("eval_loss", "node_eval_loss_mean", "node_eval_loss_std", "mixing_error", "spectral_gap"):
        assert last[key] is not None, key
    assert last["node_eval_loss_min"] < last["node_eval_loss_max"] and last["node_eval_loss_std"] > 0
    # a ring: each node sends its adapter to its 2 neighbours and receives theirs
    sizes = {c["bytes_up"] for c in last["clients"].values()}
    assert len(sizes) == 1 and sizes.pop() > 2 * sum(t.numel() * 4 for t in average.values())
    assert last["bytes_total"] == last["bytes_up"] == last["bytes_down"] == 4 * last["bytes_per_node"]


def test_dropped_nodes_send_nothing_and_their_neighbours_mix_without_them(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "simulations" / "gossip_ring.toml",
                      [*TINY, "sim.num_clients=4", "sim.dropout=0.4", "seed=3", f"out={tmp_path / 'run'}"])
    result = run_simulation(cfg, QUIET)
    rounds = [r for r in result.rounds if r["round"] >= 1]
    assert sum(r["clients_failed"] for r in rounds) > 0, "seed 3 must drop someone; pick another seed"
    for r in rounds:
        assert r["nodes_live"] == r["clients_ok"]
        live = [c for c in r["clients"] if c not in r["failures"]]
        index = {c: int(c.split("-")[1]) for c in r["clients"]}
        for cid, seen in r["clients"].items():
            if cid in r["failures"]:
                assert (seen["bytes_up"], seen["bytes_down"]) == (0, 0)
                continue
            neighbours = [c for c in live if (index[c] - index[cid]) % 4 in (1, 3)]
            size = seen["bytes_up"] // max(1, len(neighbours))
            assert seen["bytes_up"] == size * len(neighbours)
    assert (tmp_path / "run" / "nodes" / "client-3" / "adapter_model.safetensors").is_file()


def test_frozen_a_keeps_one_a_everywhere_and_mixes_exactly(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "simulations" / "gossip_ring.toml",
                      [*TINY, "sim.num_clients=3", "gossip.mix=frozen_a", "adapter.method=lora_fa",
                       "gossip.topology=full", f"out={tmp_path / 'run'}"])
    result = run_simulation(cfg, QUIET)
    assert all(r["mixing_error"] < 1e-5 for r in result.rounds if r["round"] >= 1)
    nodes = [_load(tmp_path / "run" / "nodes" / f"client-{i}") for i in range(3)]
    for k in nodes[0]:
        if "lora_A" in k:
            assert torch.equal(nodes[0][k], nodes[1][k]) and torch.equal(nodes[0][k], nodes[2][k])
        else:  # full graph: one exchange is the exact average, so every node ends equal
            assert torch.allclose(nodes[0][k], nodes[2][k], atol=1e-6)
    assert result.rounds[-1]["consensus_distance"] < 1e-10


def test_a_resumed_run_ends_with_the_nodes_of_an_uninterrupted_one_and_gone_nodes_stay_gone(tmp_path: Path) -> None:
    scenario = ROOT / "simulations" / "gossip_ring.toml"
    opts = [*TINY, "sim.num_clients=4", "gossip.gone=[client-2@2]"]
    straight = run_simulation(load_config(scenario, [*opts, f"out={tmp_path / 'straight'}"]), QUIET)
    run_simulation(load_config(scenario, [*opts, "sim.rounds=1", f"out={tmp_path / 'split'}"]), QUIET)
    resumed = run_simulation(load_config(scenario, [*opts, f"out={tmp_path / 'split'}"]), QUIET,
                             resume=tmp_path / "split")
    for name in ("adapter", *(f"nodes/client-{i}" for i in range(4))):
        a, b = _load(tmp_path / "straight" / name), _load(tmp_path / "split" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    last = straight.rounds[-1]
    assert "gossip.gone" in last["failures"]["client-2"] and last["clients"]["client-2"]["bytes_up"] == 0
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]


@pytest.mark.slow  # two simulations (about 10 s)
@pytest.mark.parametrize("topology", ["one_peer_exp", "ring"])
def test_after_one_round_the_gossip_average_is_a_server_s_fedavg_with_equal_weights(tmp_path: Path,
                                                                                     topology: str) -> None:
    """Nodes train as a server's clients do (same seeds, same start) and a doubly stochastic mix keeps the mean
    of the factors, so the benchmark's fedavg and gossip arms differ after round 1 only by fedavg's weights."""
    common = [*TINY, "sim.num_clients=4", "sim.rounds=1", "train.lr=5e-2", "data.max_records=120"]
    gossip = run_simulation(load_config(None, [*common, "sim.mode=gossip", "gossip.mix=factors",
                                               f"gossip.topology={topology}", f"out={tmp_path / 'gossip'}"]), QUIET)
    server = run_simulation(load_config(None, [*common, "strategy.name=fedavg", "federation.weighting=equal",
                                               f"out={tmp_path / 'server'}"]), QUIET)
    average, fedavg = _load(tmp_path / "gossip" / "adapter"), _load(tmp_path / "server" / "adapter")
    assert average.keys() == fedavg.keys()
    moved = max(float(v.abs().max()) for k, v in fedavg.items() if "lora_B" in k)
    assert moved > 1e-3, "one round must move B away from zero"
    for k in fedavg:
        assert torch.allclose(average[k], fedavg[k], atol=1e-6), k
    assert gossip.rounds[-1]["eval_loss"] == pytest.approx(server.rounds[-1]["eval_loss"], abs=1e-5)
    assert gossip.rounds[-1]["consensus_distance"] > 0  # the nodes themselves still differ
