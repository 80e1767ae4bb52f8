"""``[gossip]``: decentralized rounds (``sim.mode = "gossip"``). Imports no torch, like the rest of the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedtune.gossip.topology import make_topology


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GossipConfig:
    topology: Literal["ring", "torus", "k_regular", "erdos_renyi", "exponential", "one_peer_exp", "full"] = opt(
        "ring", "graph of who exchanges with whom: ring, torus, k_regular (gossip.degree), erdos_renyi (gossip.p), "
        "exponential (i +- 2^j), one_peer_exp (one peer a round, time-varying), full")
    weights: Literal["metropolis_hastings", "uniform"] = opt(
        "metropolis_hastings", "mixing weights: metropolis_hastings (symmetric, doubly stochastic on any graph) or "
        "uniform (1/(1+degree); doubly stochastic only on regular graphs)")
    mix: Literal["factors", "frozen_a", "product"] = opt(
        "factors", "factors (Dec-LoRA: average A and B separately), frozen_a (A frozen at adapter.seed, average B: "
        "exact; needs adapter.method=lora_fa) or product (average B A in factored form, keep the best rank-r "
        "factors: DeCAF)")
    local_steps: int | None = opt(None, "local optimizer steps per node per round (unset: train.max_steps)")
    exchanges_per_round: int = opt(1, "mixing exchanges with the neighbours after each round's local steps")
    max_staleness: int = opt(0, "bounded staleness: a neighbour that does not answer in an exchange is mixed with "
                             "the latest adapter this node received from it if that is at most this many rounds "
                             "old (else left out, the row re-normalised); 0: synchronous, never a stale adapter")
    degree: int = opt(4, "neighbours per node for topology=k_regular (nodes x degree must be even)")
    p: float = opt(0.3, "edge probability for topology=erdos_renyi (redrawn with the run seed until connected)")
    gone: list[str] = field(default_factory=list, metadata={"help": (
        "simulated nodes that leave for good: \"client-2@3\" is gone from round 3 on (it answers no more, its "
        "neighbours mix without it); sim.dropout takes nodes offline for one round")})

    peers: list[str] = field(default_factory=list, metadata={"help": (
        "real peers (`fedtune gossip`): every peer as \"name@host:port\", the same list on every peer; the sorted "
        "names number the nodes (node i trains with the seed and data share of the simulator's client-i) and "
        "fix the topology")})
    name: str = opt("", "this peer's name in gossip.peers (`fedtune gossip`)")
    listen: str = opt("", "address this peer serves on (default: the host:port of its gossip.peers entry)")
    keys_dir: str | None = opt(None, "`fedtune keys DIR --nodes ... --peers` folder of this peer (ca.pem, "
                               "peers/<name>.pem and .key, allowlist.txt): mutual TLS with the federation CA")
    insecure: bool = opt(False, "peers talk plaintext without gossip.keys_dir, even off loopback (names unchecked)")
    round_timeout_s: float = opt(60.0, "how long a peer waits for a neighbour's adapter in one exchange; a "
                                 "neighbour that does not answer in time is left out of it")
    join_timeout_s: float = opt(300.0, "how long a peer waits for its neighbours to start (round 1)")
    partition: bool = opt(False, "train on this peer's share of data.* (the simulator's partition for its "
                          "node number: trials on one machine, and runs to compare with `fedtune simulate`); "
                          "false: all of data.* (a site's own data)")

    def departures(self) -> dict[str, int]:
        """``gone`` as {node: first round it is gone} (entries that do not parse are left out: see validate)."""
        out = {}
        for item in self.gone:
            node, _, rnd = item.rpartition("@")
            if node and rnd.isdigit():
                out[node] = int(rnd)
        return out

    def validate(self, nodes: int, seed: int) -> list[str]:
        """Problems with this section for ``nodes`` nodes (each naming its key)."""
        p = []
        if self.local_steps is not None and self.local_steps < 1:
            p.append(f"gossip.local_steps: got {self.local_steps}, must be >= 1 (or unset for train.max_steps)")
        if self.max_staleness < 0:
            p.append(f"gossip.max_staleness: got {self.max_staleness}, must be >= 0 (0: synchronous rounds)")
        if self.exchanges_per_round < 1:
            p.append(f"gossip.exchanges_per_round: got {self.exchanges_per_round}, must be >= 1")
        if self.topology == "k_regular" and not (1 <= self.degree < nodes and nodes * self.degree % 2 == 0):
            p.append(f"gossip.degree: got {self.degree} for {nodes} nodes (sim.num_clients); k_regular needs "
                     "1 <= degree < nodes and nodes x degree even")
        elif self.topology == "erdos_renyi" and not 0 < self.p <= 1:
            p.append(f"gossip.p: got {self.p}, must be in (0, 1]")
        elif self.topology == "erdos_renyi":
            try:
                make_topology(self.topology, nodes, seed=seed, p=self.p)
            except ValueError as exc:
                p.append(f"gossip.p: {exc}")
        names = {f"client-{i}" for i in range(nodes)}
        for item in self.gone:
            node, _, rnd = item.rpartition("@")
            if node not in names or not rnd.isdigit() or int(rnd) < 1:
                p.append(f"gossip.gone: {item!r} is not NODE@ROUND with NODE one of client-0..client-{nodes - 1} "
                         "and ROUND >= 1")
        return p


def gossip_problems(mode: str, gossip: GossipConfig, *, nodes: int, seed: int, adapter_method: str,
                    clients_per_round: float) -> list[str]:
    """What ``[gossip]`` and the other sections must agree on when ``sim.mode = "gossip"`` (else nothing)."""
    if mode != "gossip":
        return []
    p = gossip.validate(nodes, seed)
    if gossip.mix == "frozen_a" and adapter_method != "lora_fa":
        p.append(f"adapter.method: gossip.mix=frozen_a needs adapter.method=lora_fa (A frozen at adapter.seed), "
                 f"not {adapter_method!r}")
    elif gossip.mix != "frozen_a" and adapter_method not in ("lora", "rslora"):
        p.append(f"adapter.method: gossip.mix={gossip.mix} mixes LoRA factors A and B: use lora or rslora, not "
                 f"{adapter_method!r}" + (" (or gossip.mix=frozen_a)" if adapter_method == "lora_fa" else ""))
    if clients_per_round != 0:
        p.append(f"sim.clients_per_round: got {clients_per_round}; gossip trains every node each round (leave it 0)")
    return p
