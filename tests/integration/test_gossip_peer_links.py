"""Gossip peers' exchanges over real gRPC on loopback, without a model: the mixing equals the simulator's
``GossipRounds``, missing neighbours are left out, hostile input and unknown peers are refused."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedtune.config import load_config
from fedtune.gossip.config import GossipConfig
from fedtune.gossip.peer import Peer, PeerDispatcher, PeerRounds
from fedtune.gossip.rounds import GossipRounds
from fedtune.strategies import StrategyConfig
from fedtune.transport import create_keys, revoke_node
from fedtune.transport.codec import Limits
from fedtune.transport.gossip import Board, PeerLink, PeerTLS, start_peer_server
from fedtune.types import ClientReply, failed_reply

pytestmark = pytest.mark.integration

KA, KB = "m.l0.q_proj.lora_A.weight", "m.l0.q_proj.lora_B.weight"
NAMES = [f"client-{i}" for i in range(4)]
SCFG = StrategyConfig(r=2, lora_alpha=4.0)
INITIAL = {KA: torch.zeros(2, 6), KB: torch.zeros(5, 2)}


def trained(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {KA: torch.randn(2, 6, generator=gen), KB: torch.randn(5, 2, generator=gen)}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Peers:
    """``live`` of the 4 nodes as in-process peers (a Board, a server and links each), plaintext on loopback."""

    def __init__(self, gcfg: GossipConfig, live: list[int], timeout: float = 10.0) -> None:
        ports = free_ports(len(NAMES))
        self.peers = [Peer(n, f"127.0.0.1:{p}") for n, p in zip(NAMES, ports, strict=True)]
        cfg = load_config(None, [f"gossip.round_timeout_s={timeout}", f"gossip.join_timeout_s={timeout}"])
        self.rounds, self.servers, self.links, self.dispatchers = {}, [], [], {}
        self.said = io.StringIO()
        """What the peers print (the console of ``fedtune gossip``)."""
        for i in live:
            board = Board(NAMES[i], 5)
            self.servers.append(start_peer_server(board, self.peers[i].address, set(NAMES) - {NAMES[i]}, None))
            links = {p.name: PeerLink(NAMES[i], p.name, p.address, None, Limits()) for p in self.peers if p.name != NAMES[i]}
            self.links += links.values()
            dispatcher = PeerDispatcher(cfg, None, self.peers, i, board, links,  # type: ignore[arg-type]
                                        Console(file=self.said, width=300))
            self.dispatchers[i] = dispatcher
            self.rounds[i] = PeerRounds(gcfg, SCFG, NAMES, i, INITIAL, seed=0, frozen=None, exchange=dispatcher.exchange)

    def round(self, rnd: int, states: dict[int, dict[str, torch.Tensor]], only: list[int] | None = None) -> dict[int, object]:
        """Every live peer (or those in ``only``) aggregates its trained state in its own thread, as separate
        processes would."""
        results: dict[int, object] = {}

        def one(i: int) -> None:
            self.dispatchers[i].available(rnd)
            reply = ClientReply(NAMES[i], rnd, states[i], num_examples=3)
            results[i] = self.rounds[i].aggregate(rnd, INITIAL, [reply])

        threads = [threading.Thread(target=one, args=(i,)) for i in (self.rounds if only is None else only)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    def close(self) -> None:
        for link in self.links:
            link.close()
        for s in self.servers:
            s.stop(0)


@pytest.mark.parametrize("mix", ["factors", "product"])
def test_peers_mix_over_the_network_exactly_as_the_simulator_does(mix: str) -> None:
    gcfg = GossipConfig(topology="ring", mix=mix, exchanges_per_round=2)
    sim = GossipRounds(gcfg, SCFG, NAMES, INITIAL, seed=0)
    peers = Peers(gcfg, live=[0, 1, 2, 3])
    try:
        for rnd in (1, 2):
            states = {i: trained(10 * rnd + i) for i in range(4)}
            sim.aggregate(rnd, INITIAL, [ClientReply(NAMES[i], rnd, states[i], num_examples=3) for i in range(4)])
            results = peers.round(rnd, states)
            for i in range(4):
                assert results[i].failures == {}, results[i].failures
                for k in (KA, KB):
                    assert torch.allclose(peers.rounds[i].node[k], sim.nodes[i][k], atol=1e-6), (rnd, i, k)
    finally:
        peers.close()


def test_a_neighbour_that_does_not_answer_is_left_out_as_in_the_simulator() -> None:
    gcfg = GossipConfig(topology="ring", mix="factors")
    sim = GossipRounds(gcfg, SCFG, NAMES, INITIAL, seed=0)
    peers = Peers(gcfg, live=[0, 1, 2], timeout=1.0)  # client-3 never starts
    try:
        states = {i: trained(i) for i in range(4)}
        replies = [ClientReply(NAMES[i], 1, states[i], num_examples=3) for i in range(3)]
        sim.aggregate(1, INITIAL, [*replies, failed_reply(NAMES[3], 1, "offline")])
        results = peers.round(1, states)
        assert "client-3" in results[0].failures and "client-3" in results[2].failures
        why = results[0].failures["client-3"]  # round 1: which peer was awaited, and the key to change
        assert "client-3 did not answer in time" in why and "waited 1 s: gossip.join_timeout_s" in why, why
        said = peers.said.getvalue()
        assert "round 1: waiting for client-1, client-3 (up to gossip.join_timeout_s=1 s)" in said, said
        assert ("client-3 did not answer within gossip.join_timeout_s=1 s: left out of round 1 (start it, or change "
                "gossip.join_timeout_s)") in said, said
        assert results[1].failures == {}  # client-1's neighbours are 0 and 2
        for i in range(3):
            assert torch.allclose(peers.rounds[i].node[KB], sim.nodes[i][KB], atol=1e-6), i
    finally:
        peers.close()


def test_peers_count_the_bytes_they_serve_and_receive_as_the_simulator_counts_its_nodes() -> None:
    from fedtune.gossip.sim import GossipDispatcher

    class Trained:  # the simulator's pools, answering with the trained adapters
        def __init__(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
            self.states = states

        def dispatch(self, rnd, phase, instructions):
            for cid in instructions:
                yield ClientReply(cid, rnd, self.states[NAMES.index(cid)], num_examples=3, bytes_up=1)

    gcfg = GossipConfig(topology="one_peer_exp", mix="factors", exchanges_per_round=2)
    sim = GossipRounds(gcfg, SCFG, NAMES, INITIAL, seed=0)
    peers = Peers(gcfg, live=[0, 1, 2, 3])
    try:
        for rnd in (1, 2):
            states = {i: trained(10 * rnd + i) for i in range(4)}
            counted = GossipDispatcher(Trained(states), sim)  # type: ignore[arg-type]
            replies = {r.client_id: r for r in counted.dispatch(rnd, "train", dict.fromkeys(NAMES))}
            sim.aggregate(rnd, INITIAL, replies.values())
            peers.round(rnd, states)
            for i in range(4):
                got = peers.dispatchers[i].metrics()
                assert (got["bytes_up"], got["bytes_down"]) == (replies[NAMES[i]].bytes_up,
                                                                replies[NAMES[i]].bytes_down), (rnd, i)
                # one neighbour per exchange: two adapters of 2x6 + 5x2 fp32 values and their headers
                assert 2 * 22 * 4 < got["bytes_up"] < 2 * 22 * 4 + 600
    finally:
        peers.close()


@pytest.mark.parametrize("mix", ["factors", "product"])
def test_with_bounded_staleness_a_slow_peer_s_last_adapter_is_mixed_as_the_simulator_mixes_it(mix: str) -> None:
    gcfg = GossipConfig(topology="ring", mix=mix, max_staleness=1)
    sim = GossipRounds(gcfg, SCFG, NAMES, INITIAL, seed=0)
    peers = Peers(gcfg, live=[0, 1, 2, 3], timeout=1.0)
    try:
        for rnd in (1, 2, 3):  # client-3 takes part in round 1 only, then is too slow
            on = [0, 1, 2, 3] if rnd == 1 else [0, 1, 2]
            states = {i: trained(10 * rnd + i) for i in range(4)}
            sim.aggregate(rnd, INITIAL, [ClientReply(NAMES[i], rnd, states[i], num_examples=3) if i in on
                                         else failed_reply(NAMES[i], rnd, "too slow") for i in range(4)])
            results = peers.round(rnd, states, only=on)
            for i in on:
                assert torch.allclose(peers.rounds[i].node[KB], sim.nodes[i][KB], atol=1e-6), (rnd, i)
                assert torch.allclose(peers.rounds[i].node[KA], sim.nodes[i][KA], atol=1e-6), (rnd, i)
            if rnd == 2:  # its round-1 adapter, 1 round old: mixed, and the stamp said
                assert sim.last_stale == {"client-0": {"client-3": 1}, "client-2": {"client-3": 1}}
                assert "mixed its round-1 adapter instead (age 1 <= gossip.max_staleness=1)" in \
                    results[0].failures["client-3"]
                assert results[0].metrics["neighbours_stale"] == 1 and results[1].failures == {}
            if rnd == 3:  # 2 rounds old: left out
                assert sim.last_stale == {} and results[0].metrics["neighbours_stale"] == 0
                assert "mixed its" not in results[0].failures["client-3"]
    finally:
        peers.close()


def _fetch_from(board: Board, rnd: int = 1) -> object:
    port = free_ports(1)[0]
    server = start_peer_server(board, f"127.0.0.1:{port}", {"client-0"}, None)
    link = PeerLink("client-0", board.node, f"127.0.0.1:{port}", None, Limits())
    try:
        return link.fetch(rnd, 0, timeout=5.0)
    finally:
        link.close()
        server.stop(0)


def test_hostile_adapters_are_refused_with_the_reason_and_the_round_goes_on() -> None:
    gcfg = GossipConfig(topology="ring", mix="factors")
    # a corrupt frame: one payload byte flipped after the digest was computed
    board = Board("client-1", 3)
    board.post(1, 0, trained(1), 3)
    frames = board._posts[(1, 0)]
    last = bytearray(frames[-1])
    last[-1] ^= 0xFF
    frames[-1] = bytes(last)
    got = _fetch_from(board)
    assert got.reply is None and "digest" in got.error, got.error
    # NaN values
    board = Board("client-1", 3)
    board.post(1, 0, {KA: torch.full((2, 6), float("nan")), KB: torch.zeros(5, 2)}, 3)
    got = _fetch_from(board)
    assert got.reply is None and "NaN or Inf" in got.error, got.error
    # another peer's name in the header
    board = Board("client-9", 3)
    board.post(1, 0, trained(1), 3)
    board.node = "client-1"
    got = _fetch_from(board)
    assert got.reply is None and "'client-9'" in got.error, got.error
    # wrong shapes: decoded fine, refused by the peer before mixing; it keeps its own adapter and goes on
    board = Board("client-1", 3)
    board.post(1, 0, {KA: torch.zeros(3, 6), KB: torch.zeros(5, 3)}, 3)
    got = _fetch_from(board)
    assert got.reply is not None
    mine = trained(0)
    rounds = PeerRounds(gcfg, SCFG, NAMES[:2], 0, INITIAL, seed=0, frozen=None,
                        exchange=lambda r, t, s, n, nb: [got])
    result = rounds.aggregate(1, INITIAL, [ClientReply("client-0", 1, mine, num_examples=3)])
    assert "shape" in result.failures["client-1"], result.failures
    assert torch.equal(rounds.node[KB], mine[KB])


def _tls(keys: Path, name: str, trusts: Path | None = None) -> PeerTLS:
    """``name``'s side of mutual TLS from ``keys``; ``trusts``: another federation's CA and allow-list."""
    site, other = keys / "sites" / name, trusts or keys / "sites" / name
    return PeerTLS(other / "ca.pem", site / "peers" / f"{name}.pem", site / "peers" / f"{name}.key",
                   other / "allowlist.txt")


def test_only_allow_listed_peers_with_the_federation_s_certificates_are_answered(tmp_path: Path) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    create_keys(keys, ["client-0", "client-1", "client-2"], peers=True)
    create_keys(other, ["mallory"], peers=True)  # another federation's CA
    board = Board("client-0", 3)
    board.post(1, 0, trained(0), 3)
    port = free_ports(1)[0]
    tls0 = _tls(keys, "client-0", trusts=keys)  # the operator's allow-list: revoking takes effect at once
    server = start_peer_server(board, f"127.0.0.1:{port}", {"client-1", "client-2", "mallory"}, tls0)
    address = f"127.0.0.1:{port}"
    links = []
    try:
        ok = PeerLink("client-1", "client-0", address, _tls(keys, "client-1"), Limits())
        links.append(ok)
        assert ok.fetch(1, 0, timeout=10).reply is not None
        stranger = PeerLink("mallory", "client-0", address, _tls(other, "mallory", trusts=keys), Limits())
        links.append(stranger)
        refused = stranger.fetch(1, 0, timeout=1.5)
        assert refused.reply is None and "Socket closed" in refused.error, refused.error  # the handshake
        revoke_node(keys / "allowlist.txt", "client-2")
        revoked = PeerLink("client-2", "client-0", address, _tls(keys, "client-2"), Limits())
        links.append(revoked)
        got = revoked.fetch(1, 0, timeout=5)
        assert got.reply is None and "PERMISSION_DENIED" in got.error and "allow-list" in got.error, got.error
        assert any("client-2" in why for why in server.servicer.refused)
        # a peer that claims another's name with its own certificate is refused too
        liar = PeerLink("client-1", "client-0", address, _tls(keys, "client-2"), Limits())
        links.append(liar)
        got = liar.fetch(1, 0, timeout=5)
        assert got.reply is None and "the certificate names 'client-2'" in got.error, got.error
        # an impostor serving client-0's address with another name's certificate is not trusted by callers
        assert ok.fetch(1, 0, timeout=5).reply is not None
    finally:
        for link in links:
            link.close()
        server.stop(0)


def test_bad_peer_addresses_a_taken_port_and_missing_keys_end_at_once_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtune.models.loader
    from fedtune.cli import main

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input must end before any model loads")

    monkeypatch.setattr(fedtune.models.loader, "load_base", no_model, raising=True)

    def gossip(*args: str) -> tuple[int, str]:
        code = main(["gossip", *args])
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return code, err

    port = free_ports(2)
    peers = f'gossip.peers=["a@127.0.0.1:{port[0]}","b@127.0.0.1:{port[1]}"]'
    code, err = gossip('gossip.peers=["a@127.0.0.1","b@127.0.0.1:1"]', "gossip.name=a", f"out={tmp_path / 'r1'}")
    assert code == 2 and "gossip.peers: 'a@127.0.0.1' is not \"name@host:port\"" in err, err
    code, err = gossip(peers, "gossip.name=c", f"out={tmp_path / 'r2'}")
    assert code == 2 and "gossip.name: 'c' is not in gossip.peers (a, b)" in err, err
    code, err = gossip(peers, "gossip.name=a", f"gossip.keys_dir={tmp_path / 'nokeys'}", f"out={tmp_path / 'r3'}")
    assert code == 2 and "missing" in err and "fedtune keys" in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port[0]))
        taken.listen()
        code, err = gossip(peers, "gossip.name=a", f"out={tmp_path / 'r4'}")
    assert code == 2 and "port is in use" in err and "gossip.listen" in err, err


def test_a_peer_list_entry_must_name_a_peer_on_every_machine_alike() -> None:
    from fedtune.gossip.peer import parse_peers

    peers, me = parse_peers(GossipConfig(peers=["b@h:2", "a@h:1"], name="b"))
    assert [p.name for p in peers] == ["a", "b"] and me == 1  # sorted: every peer numbers the nodes alike
    with pytest.raises(ValueError, match="the name 'a' appears more than once"):
        parse_peers(GossipConfig(peers=["a@h:2", "a@h:1"], name="a"))
