"""GossipRounds without a model: who mixes with whom, missing nodes, the average adapter; gossip config checks."""

from __future__ import annotations

import random

import pytest
import torch

from fedtune.config import ConfigError, load_config
from fedtune.gossip.config import GossipConfig
from fedtune.gossip.rounds import GossipRounds
from fedtune.strategies import StrategyConfig
from fedtune.types import ClientReply, failed_reply

KA, KB = "m.l0.q_proj.lora_A.weight", "m.l0.q_proj.lora_B.weight"
IDS = [f"client-{i}" for i in range(4)]


def trained(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {KA: torch.randn(2, 6, generator=gen), KB: torch.randn(5, 2, generator=gen)}


def rounds(mix: str = "factors", **kw) -> GossipRounds:
    initial = {KA: torch.zeros(2, 6), KB: torch.zeros(5, 2)}
    return GossipRounds(GossipConfig(topology="ring", mix=mix, **kw), StrategyConfig(r=2, lora_alpha=4.0), IDS,
                        initial, seed=0)


def test_each_node_trains_from_its_own_adapter_and_mixes_with_its_ring_neighbours():
    g = rounds()
    ins = g.configure(1, IDS, g.nodes[0], random.Random(0))
    assert list(ins) == IDS and all(torch.equal(ins[c].state[KB], torch.zeros(5, 2)) for c in IDS)
    states = [trained(i) for i in range(4)]
    result = g.aggregate(1, g.nodes[0], [ClientReply(c, 1, s, num_examples=3) for c, s in zip(IDS, states, strict=True)])
    third = 1 / 3  # ring of 4, Metropolis-Hastings: 1/3 to itself and each neighbour
    expect = third * (states[3][KB] + states[0][KB] + states[1][KB])
    assert torch.allclose(g.nodes[0][KB], expect, atol=1e-6)
    assert torch.allclose(result.state[KA], sum(s[KA] for s in g.nodes) / 4, atol=1e-6)  # factors: mean of A
    assert result.metrics["nodes_live"] == 4 and result.metrics["consensus_distance"] > 0
    assert result.metrics["mixing_error"] > 0 and result.metrics["spectral_gap"] == pytest.approx(2 / 3)


def test_a_missing_node_keeps_its_adapter_and_its_neighbours_renormalise():
    g = rounds()
    states = [trained(i) for i in range(4)]
    replies = [ClientReply(c, 1, s, num_examples=3) for c, s in zip(IDS, states, strict=True)]
    replies[1] = failed_reply("client-1", 1, "dropped out (sim.dropout)")
    bad = dict(states[2])
    bad[KB] = torch.full((5, 2), float("nan"))
    replies[2] = ClientReply("client-2", 1, bad, num_examples=3)
    result = g.aggregate(1, g.nodes[0], replies)
    assert set(result.failures) == {"client-1", "client-2"} and "NaN" in result.failures["client-2"]
    assert torch.equal(g.nodes[1][KB], torch.zeros(5, 2)) and torch.equal(g.nodes[2][KB], torch.zeros(5, 2))
    # node 0's neighbours are 3 (live) and 1 (missing): 1's third moves to node 0's own weight
    assert torch.allclose(g.nodes[0][KB], (2 * states[0][KB] + states[3][KB]) / 3, atol=1e-6)
    assert result.metrics["nodes_live"] == 2


def test_frozen_a_mixes_exactly_and_the_node_states_survive_a_checkpoint():
    g = rounds("frozen_a", exchanges_per_round=3)
    a = trained(9)[KA]
    g.frozen = {KA: a}
    g.nodes = [{KB: s[KB]} for s in (trained(i) for i in range(4))]
    replies = [ClientReply(c, 1, {KB: trained(10 + i)[KB]}, num_examples=1) for i, c in enumerate(IDS)]
    result = g.aggregate(1, {KB: torch.zeros(5, 2)}, replies)
    assert result.metrics["mixing_error"] < 1e-6
    restored = rounds("frozen_a")
    restored.load_state_dict(g.state_dict())
    assert all(torch.equal(x[KB], y[KB]) for x, y in zip(g.nodes, restored.nodes, strict=True))
    with pytest.raises(ValueError, match="no adapter for gossip node"):
        restored.load_state_dict({"nodes": {}})


def test_gossip_config_mistakes_are_named_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sim.mode=gossip", "gossip.mix=frozen_a", "gossip.topology=k_regular", "gossip.degree=3",
                           "sim.num_clients=5", "gossip.exchanges_per_round=0", "gossip.local_steps=0"])
    text = str(err.value)
    for key in ("gossip.degree", "adapter.method: gossip.mix=frozen_a needs adapter.method=lora_fa",
                "gossip.exchanges_per_round", "gossip.local_steps"):
        assert key in text, text
    with pytest.raises(ConfigError, match="gossip.p: .*raise p"):
        load_config(None, ["sim.mode=gossip", "gossip.topology=erdos_renyi", "gossip.p=0.01", "sim.num_clients=30"])
    with pytest.raises(ConfigError, match="use lora or rslora, not 'lora_fa' \\(or gossip.mix=frozen_a\\)"):
        load_config(None, ["sim.mode=gossip", "gossip.mix=product", "adapter.method=lora_fa"])
    assert load_config(None, ["gossip.mix=frozen_a"]).gossip.mix == "frozen_a"  # only checked in gossip mode


class _Pool:
    """A dispatcher whose nodes answer with their instructions' adapter."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def dispatch(self, round, phase, instructions):
        for cid, ins in instructions.items():
            self.asked.append(cid)
            yield ClientReply(cid, round, ins.state, 1, bytes_up=100, bytes_down=7)

    def metrics(self):
        return {}


def test_exchange_bytes_by_hand_on_one_peer_exp_with_a_node_gone():
    from fedtune.gossip.sim import GossipDispatcher
    from fedtune.transport.gossip import exchange_bytes

    g = GossipRounds(GossipConfig(topology="one_peer_exp", exchanges_per_round=2), StrategyConfig(r=2), IDS,
                     {KB: torch.zeros(5, 2)}, seed=0)
    pool = _Pool()
    dispatcher = GossipDispatcher(pool, g, {"client-3": 1})  # type: ignore[arg-type]
    replies = {r.client_id: r for r in dispatcher.dispatch(1, "train", g.configure(1, IDS, g.nodes[0], random.Random(0)))}
    assert pool.asked == IDS[:3] and "gossip.gone" in (replies["client-3"].error or "")
    # exchange 0 pairs 0-1 and 2-3, exchange 1 pairs 0-2 and 1-3; node 3 is gone, so: 0<->1, then 0<->2;
    # each fetch moves the frames a real peer serves (header and dense tensors), not the reply's upload size
    e0, e1 = (exchange_bytes("client-0", 1, t, {KB: torch.zeros(5, 2)}, 1) for t in (0, 1))
    assert e0 > 5 * 2 * 4
    assert [replies[c].bytes_up for c in IDS] == [e0 + e1, e0, e1, 0]
    assert [replies[c].bytes_down for c in IDS] == [e0 + e1, e0, e1, 0]
    assert dispatcher.metrics() == {"bytes_per_node": 2 * (e0 + e1) / 4, "bytes_total": 2 * (e0 + e1)}


def test_gone_entries_must_name_a_node_and_a_round():
    with pytest.raises(ConfigError, match="gossip.gone: 'client-9@2' is not NODE@ROUND"):
        load_config(None, ["sim.mode=gossip", "sim.num_clients=4", "gossip.gone=[client-1@2, client-9@2]"])
    cfg = load_config(None, ["sim.mode=gossip", "sim.num_clients=4", "gossip.gone=[client-1@2]"])
    assert cfg.gossip.departures() == {"client-1": 2}


def test_bounded_staleness_mixes_a_missing_neighbour_s_last_adapter_up_to_the_bound_then_leaves_it_out():
    g = rounds(max_staleness=1)
    sync = rounds()
    third = 1 / 3  # ring of 4: 1/3 to itself and each neighbour
    r1 = [trained(i) for i in range(4)]
    for h in (g, sync):
        h.aggregate(1, h.nodes[0], [ClientReply(c, 1, s, num_examples=3) for c, s in zip(IDS, r1, strict=True)])
    assert g.last_stale == {} and all(torch.equal(a[KB], b[KB]) for a, b in zip(g.nodes, sync.nodes, strict=True))
    # round 2: client-3 is slow; its neighbours 0 and 2 mix its round-1 adapter (what they fetched then)
    r2 = [trained(10 + i) for i in range(4)]
    replies = [ClientReply(c, 2, s, num_examples=3) for c, s in zip(IDS[:3], r2[:3], strict=True)]
    result = g.aggregate(2, g.nodes[0], [*replies, failed_reply("client-3", 2, "too slow")])
    assert g.last_stale == {"client-0": {"client-3": 1}, "client-2": {"client-3": 1}}
    assert result.metrics["stale_mixes"] == 2 and result.metrics["stale_age_max"] == 1
    assert torch.allclose(g.nodes[0][KB], third * (r2[0][KB] + r2[1][KB] + r1[3][KB]), atol=1e-6)
    assert torch.allclose(g.nodes[1][KB], third * (r2[0][KB] + r2[1][KB] + r2[2][KB]), atol=1e-6)
    assert torch.allclose(g.nodes[3][KB], third * (r1[2][KB] + r1[3][KB] + r1[0][KB]), atol=1e-6)  # kept its mix
    # round 3: still missing; its kept adapter is 2 rounds old > 1: left out, the row re-normalised
    r3 = [trained(20 + i) for i in range(4)]
    replies = [ClientReply(c, 3, s, num_examples=3) for c, s in zip(IDS[:3], r3[:3], strict=True)]
    result = g.aggregate(3, g.nodes[0], [*replies, failed_reply("client-3", 3, "too slow")])
    assert g.last_stale == {} and result.metrics["stale_mixes"] == 0
    assert torch.allclose(g.nodes[0][KB], 2 * third * r3[0][KB] + third * r3[1][KB], atol=1e-6)
    # the kept adapters are part of the checkpoint: a resumed run mixes the same
    again = rounds(max_staleness=1)
    again.load_state_dict(g.state_dict())
    assert again.seen[0][3][0] == 1 and torch.equal(again.seen[0][3][2][KB], r1[3][KB])


def test_max_staleness_must_not_be_negative():
    with pytest.raises(ConfigError, match="gossip.max_staleness: got -1, must be >= 0"):
        load_config(None, ["sim.mode=gossip", "gossip.max_staleness=-1"])
