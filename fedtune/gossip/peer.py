"""``fedtune gossip``: one real gossip peer, on the one round driver, with no coordinator anywhere.

A peer is node i of ``gossip.peers`` (sorted by name) and runs the simulator's algorithm for that node only,
with the same functions, so peers on a network end with the adapters ``sim.mode = "gossip"`` gives its nodes:

    setup: peer list -> keys checked, port bound (before the model loads) -> model, data (its share with
    ``gossip.partition``), the simulator's starting adapter (``sim.gossip_start``) -> resume from its own
    checkpoint, re-joining at the round its neighbours are in -> the round driver (``fedtune.rounds``):
        configure: train from its own adapter, with the seed of the simulator's client i
        -> dispatch (``PeerDispatcher``): ``run_phase`` on this node, as the simulator's pools do
        -> aggregate (``PeerRounds``): for each exchange t: post the adapter, fetch the neighbours' of the
           same (round, t) in parallel within ``gossip.round_timeout_s``, and take row i of the mixing matrix
           with the neighbours that did not answer (or sent something refused) left out
           (``mixing.drop_missing``), mixed with ``mixing.mix_row``
        -> evaluate, ``metrics.jsonl``, checkpoint, ``adapter/`` (this node's adapter)
    -> stay until the neighbours fetched the last round's adapter (or the round timeout), stop serving.

A neighbour that is missing is a failure of the round (``failures`` in ``metrics.jsonl``), never an
exception. A restarted peer resumes from its checkpoint, asks the others which round they are in and
continues from that round (the rounds it missed are not trained).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.adapters import A_SUFFIX
from fedtune.client.phases import ClientContext, run_phase
from fedtune.compression.config import uplink_encoding
from fedtune.compression.link import make_link
from fedtune.config import Config
from fedtune.gossip.config import GossipConfig, gossip_problems
from fedtune.gossip.mixing import Seen, mix_row, mixing_matrix, with_stale
from fedtune.gossip.topology import make_topology
from fedtune.names import name_problem
from fedtune.strategies.base import (
    PhaseResult,
    Rng,
    RoundResult,
    finish,
    lora_scale,
    make_instructions,
    valid_replies,
)
from fedtune.strategies.config import StrategyConfig
from fedtune.strategies.screen import ReplyPolicy
from fedtune.strategies.specs import StrategySpec
from fedtune.transport.gossip import Board, FetchResult, PeerLink, PeerTLS, start_peer_server
from fedtune.transport.keys import read_allowlist
from fedtune.transport.loopback import send_instructions, send_reply
from fedtune.transport.security import check_plaintext_allowed
from fedtune.types import ClientReply, Instructions, State

# Keys a restarted peer may change: addresses, timeouts, keys, evaluation, more rounds.
RESUMABLE_CHANGES = ("out", "eval.", "sim.rounds", "sim.eval_every", "gossip.peers", "gossip.listen",
                     "gossip.keys_dir", "gossip.insecure", "gossip.round_timeout_s", "gossip.join_timeout_s")


@dataclass(frozen=True)
class Peer:
    name: str
    address: str


def parse_peers(g: GossipConfig) -> tuple[list[Peer], int]:
    """The peers sorted by name and this peer's place among them.

    Raises:
        ValueError: every problem with gossip.peers / gossip.name at once.
    """
    problems, peers = [], []
    for entry in g.peers:
        name, _, address = entry.partition("@")
        host, _, port = address.rpartition(":")
        bad = name_problem(name) if name else "no name"
        if bad or not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"gossip.peers: {entry!r} is not \"name@host:port\"" + (f" ({bad})" if bad else ""))
        else:
            peers.append(Peer(name, address))
    names = [p.name for p in peers]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"gossip.peers: the name {dup!r} appears more than once")
    addresses = [p.address for p in peers]
    for dup in sorted({a for a in addresses if addresses.count(a) > 1}):
        problems.append(f"gossip.peers: the address {dup} appears more than once")
    if len(g.peers) < 2:
        problems.append("gossip.peers: list at least two peers as \"name@host:port\" (this one included)")
    if not problems and g.name not in names:
        problems.append(f"gossip.name: {g.name!r} is not in gossip.peers ({', '.join(sorted(names))})")
    if problems:
        raise ValueError("; ".join(problems))
    peers.sort(key=lambda p: p.name)
    return peers, [p.name for p in peers].index(g.name)


def peer_tls(cfg: Config, peers: Sequence[Peer], me: Peer) -> PeerTLS | None:
    """Mutual TLS from gossip.keys_dir, or None for plaintext (loopback only, unless gossip.insecure).

    Raises:
        FileNotFoundError: a key file is missing (naming the `fedtune keys` command that makes it).
        InsecureTransportError: plaintext off loopback without gossip.insecure.
    """
    g = cfg.gossip
    if g.keys_dir is None:
        for p in peers:
            check_plaintext_allowed(p.address, g.insecure, side="client")
        return None
    keys = Path(g.keys_dir)
    tls = PeerTLS(keys / "ca.pem", keys / "peers" / f"{me.name}.pem", keys / "peers" / f"{me.name}.key",
                  keys / "allowlist.txt")
    missing = [str(p) for p in (tls.ca_file, tls.cert_file, tls.key_file, tls.allowlist_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"gossip.keys_dir={keys}: missing {', '.join(missing)} (make them with `fedtune keys "
                                f"DIR --nodes {','.join(p.name for p in peers)} --peers`; gossip.name picks the "
                                "certificate)")
    listed = read_allowlist(tls.allowlist_file)
    refused = [p.name for p in peers if p.name not in listed or listed[p.name].revoked]
    if refused:
        raise ValueError(f"gossip.peers: {', '.join(refused)} not on {tls.allowlist_file} (or revoked): this peer "
                         "would refuse them; add them with `fedtune keys DIR --nodes ... --peers` or leave them out")
    return tls


class PeerRounds:
    """This peer's adapter and its mixing with the neighbours' (see the module docstring): the simulator's
    ``GossipRounds`` for one node, with ``exchange`` fetching the neighbours' adapters."""

    needs_all_replies = True
    base_log: Any = None

    def __init__(self, gcfg: GossipConfig, scfg: StrategyConfig, names: Sequence[str], me: int, initial: State, *,
                 seed: int, frozen: State | None,
                 exchange: Callable[[int, int, State, int, Sequence[str]], list[FetchResult]]) -> None:
        self.gcfg, self.cfg, self.names, self.me = gcfg, scfg, list(names), me
        self.name = f"gossip-{gcfg.mix}"
        self.spec = StrategySpec(f"{__name__}:PeerRounds", "one gossip peer (Dec-LoRA / DeCAF mixing)", lora_only=True)
        self.node: State = dict(initial)
        self.topology = make_topology(gcfg.topology, len(names), seed=seed, degree=gcfg.degree, p=gcfg.p)
        self.rank, self.scale, self.frozen, self.exchange = scfg.r, lora_scale(scfg, scfg.r), frozen, exchange
        self.seen: Seen = {}
        """Bounded staleness: the latest adapter fetched from each neighbour (``mixing.with_stale``)."""

    @property
    def linear(self) -> bool:
        return False

    def phases(self, round: int) -> Sequence[str]:
        return ("train",)

    def sent_keys(self, global_state: State) -> list[str]:
        return list(global_state)

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        me = self.names[self.me]
        return make_instructions(round, [me], {me: self.node}, self.cfg)

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult:
        """This node's trained adapter, mixed with its neighbours' over the round's exchanges."""
        failures: dict[str, str] = {}
        mine = list(valid_replies(replies, global_state, failures))
        if not mine:  # training failed here: keep the adapter, as the simulator's node that fails does
            return finish(RoundResult(state=self.node, applied=False), [], failures)
        state, examples = mine[0].state, mine[0].num_examples
        assert state is not None
        n, i, e = len(self.names), self.me, self.gcfg.exchanges_per_round
        answered: set[str] = set()
        used: dict[str, int] = {}
        for t in range(e):
            graph = self.topology((round - 1) * e + t)
            neighbours = [self.names[j] for j in sorted(graph.neighbours[i])]
            states, live = [state] * n, [False] * n
            live[i] = True
            for got in self.exchange(round, t, state, examples, neighbours):
                reason = got.error or self._problem(got.reply, state)
                if reason is not None:
                    failures[got.peer] = f"exchange {t}: {reason}"
                    continue
                assert got.reply is not None and got.reply.state is not None
                j = self.names.index(got.peer)
                states[j], live[j] = got.reply.state, True
                answered.add(got.peer)
            q, most = mixing_matrix(graph, self.gcfg.weights), self.gcfg.max_staleness
            row, view, stale = with_stale(q, i, states, live, self.seen if most > 0 else {}, round, t, most)
            for j, r in stale.items():
                used[self.names[j]] = r
                failures[self.names[j]] += (f"; mixed its round-{r} adapter instead (age {round - r} <= "
                                            f"gossip.max_staleness={most})")
            state = mix_row(view, row, i, self.gcfg.mix, scale=self.scale, rank=self.rank, frozen=self.frozen)
        self.node = state
        metrics = {"neighbours_live": float(len(answered)), "neighbours_missing": float(len(failures)),
                   "neighbours_stale": float(len(used))}
        return finish(RoundResult(state=state, metrics=metrics), [self.names[i], *sorted(answered)], failures)

    def _problem(self, reply: ClientReply | None, mine: State) -> str | None:
        """Why a neighbour's adapter cannot be mixed with this one (names, shapes, dtypes, finite values; the
        same frozen A under ``frozen_a``), or None."""
        assert reply is not None
        failures: dict[str, str] = {}
        if not list(valid_replies([reply], mine, failures)):
            return f"refused its adapter: {failures[reply.client_id]}"
        if self.gcfg.mix == "frozen_a":
            assert reply.state is not None
            for k in (k for k in mine if k.endswith(A_SUFFIX)):
                if not torch.equal(reply.state[k], mine[k]):
                    return f"refused its adapter: its {k} differs from this peer's (same adapter.seed?)"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"node": dict(self.node), "seen": {self.names[j]: {"round": r, "exchange": t, "state": dict(st)}
                                                  for j, (r, t, st) in self.seen.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node = dict(state["node"])
        self.seen = {self.names.index(j): (int(v["round"]), int(v["exchange"]), dict(v["state"]))
                     for j, v in state.get("seen", {}).items() if j in self.names}


class PeerDispatcher:
    """Dispatch to this one node (``run_phase``, as the simulator's pools), and the neighbour exchanges.

    Bytes: ``bytes_up`` is what this peer's server handed to its neighbours' fetches since the last round's
    record (``Board.bytes_served``; an exchange ends when the neighbours that answered have fetched this
    peer's adapter, or after ``gossip.round_timeout_s``), ``bytes_down`` what its fetches received: the
    encoded frames, so on the same run they equal the simulator's per-node counts."""

    def __init__(self, cfg: Config, ctx: ClientContext, peers: Sequence[Peer], me: int, board: Board,
                 links: Mapping[str, PeerLink], console: Console | None = None) -> None:
        self.cfg, self.ctx, self.peers, self.me, self.board, self.links = cfg, ctx, list(peers), me, board, links
        self.console = console
        self.first_round = 1
        self.received = 0
        self._reported = 0
        """``board.bytes_served`` at the last round's record."""
        self.last: tuple[int, int, set[str]] = (0, 0, set())
        """The last (round, exchange) posted and the neighbours that answered in it."""

    def available(self, round: int) -> list[str]:
        self.board.enter(round)
        return [self.peers[self.me].name]

    def client_index(self, client_id: str) -> int:
        return self.me

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        for ins in instructions.values():  # through the wire as the simulator's, so encodings agree
            received, _ = send_instructions(ins, self.cfg.client.encoding)
            reply, _ = send_reply(run_phase(self.ctx, received), phase, uplink_encoding(self.cfg))
            reply.bytes_up = reply.bytes_down = 0  # nothing crossed a network: the exchanges' bytes are metrics()
            yield reply

    def _timeout(self, round: int) -> tuple[float, str]:
        g = self.cfg.gossip
        if round == self.first_round:
            return g.join_timeout_s, "gossip.join_timeout_s"
        return g.round_timeout_s, "gossip.round_timeout_s"

    def exchange(self, round: int, exchange: int, state: State, examples: int,
                 neighbours: Sequence[str]) -> list[FetchResult]:
        """Post this node's adapter at (round, exchange), fetch the neighbours' (in parallel), and wait until
        the neighbours that answered have fetched this one's (so the round's bytes are all counted)."""
        self.board.post(round, exchange, state, examples)
        timeout, key = self._timeout(round)
        if self.console is not None and round == self.first_round and exchange == 0 and neighbours:
            self.console.print(f"round {round}: waiting for {', '.join(neighbours)} (up to {key}={timeout:g} s)",
                               highlight=False)
        if not neighbours:
            results: list[FetchResult] = []
        else:
            with ThreadPoolExecutor(len(neighbours)) as pool:
                results = list(pool.map(lambda n: self.links[n].fetch(round, exchange, timeout), neighbours))
        for r in results:
            if r.error is not None and r.error.startswith("did not answer in time"):
                r.error = (f"{r.peer} {r.error} (waited {timeout:g} s: {key}; is it started, at "
                           f"{self.links[r.peer].address}?)")
                if self.console is not None and round == self.first_round:
                    self.console.print(f"{r.peer} did not answer within {key}={timeout:g} s: left out of round "
                                       f"{round} (start it, or change {key})", highlight=False)
        self.received += sum(r.bytes for r in results)
        answered = {r.peer for r in results if r.reply is not None}
        self.board.wait_fetched(round, exchange, answered, self.cfg.gossip.round_timeout_s)
        self.last = (round, exchange, answered)
        return results

    def metrics(self) -> dict[str, Any]:
        # the round's bytes are the exchanges' (the round driver's per-reply counts see no network here);
        # fetches that came after the last round's record count in this one
        served = self.board.bytes_served
        up, self._reported = served - self._reported, served
        down, self.received = self.received, 0
        # exchanges are dense: no compression ratio (the local reply's would compare unlike things)
        return {"bytes_up": up, "bytes_down": down, "bytes_per_node": up, "dense_fp32_bytes": None,
                "compression_ratio": None}

    def state_dict(self) -> dict[str, Any]:
        return {self.peers[self.me].name: dict(self.ctx.state)}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        self.ctx.state = dict(state.get(self.peers[self.me].name, {}))

    def close(self) -> None:
        for link in self.links.values():
            link.close()


def current_round(links: Mapping[str, PeerLink], timeout: float) -> tuple[int, bool]:
    """The latest round the other peers are in, and whether they have all finished (0, False: nobody answers)."""
    with ThreadPoolExecutor(max(len(links), 1)) as pool:
        answers = [a for a in pool.map(lambda link: link.where(timeout), links.values()) if a is not None]
    if not answers:
        return 0, False
    return max(a[0] for a in answers), all(a[1] for a in answers)


def peer_plan(cfg: Config) -> dict[str, Any]:
    """The round plan's arguments, those of ``fedtune simulate`` in gossip mode (same seeds and steps)."""
    overrides = {"max_steps": cfg.gossip.local_steps, "epochs": None} if cfg.gossip.local_steps else {}
    return {"rounds": cfg.sim.rounds, "seed": cfg.seed, "train": cfg.train, "eval_every": cfg.sim.eval_every,
            "policy": ReplyPolicy.from_config(cfg.federation), "reorder_buffer": cfg.federation.reorder_buffer,
            "train_overrides": overrides, "link": make_link(cfg)}


def check_peer_config(cfg: Config) -> tuple[list[Peer], int, PeerTLS | None]:
    """Everything about the peer that can be checked before a model loads.

    Raises:
        ValueError / FileNotFoundError / InsecureTransportError: as ``parse_peers`` and ``peer_tls``, or a
            topology or mixing mode that does not fit (naming the key).
    """
    peers, me = parse_peers(cfg.gossip)
    problems = gossip_problems("gossip", dataclasses.replace(cfg.gossip, gone=[]), nodes=len(peers), seed=cfg.seed,
                               adapter_method=cfg.adapter.method, clients_per_round=0)
    if problems:
        raise ValueError("; ".join(problems))
    return peers, me, peer_tls(cfg, peers, peers[me])


def listen_address(cfg: Config, me: Peer) -> str:
    return cfg.gossip.listen or me.address


def run_peer(cfg: Config, console: Console, *, overwrite: bool = False) -> Any:
    """Run this peer until its last round (see the module docstring); returns the round driver's result.

    Raises:
        ValueError, FileNotFoundError, OSError, InsecureTransportError: bad peers, keys or address, before the
            model loads.
    """
    from fedtune.data.partition import partition_clients
    from fedtune.global_model import GlobalModel
    from fedtune.gossip.sim import gossip_start
    from fedtune.models import load_model
    from fedtune.pipeline import encode, load_dataset
    from fedtune.report import print_summary
    from fedtune.rounds import RoundPlan, has_checkpoint, open_run, run_rounds
    from fedtune.runs import claim_run_folder
    from fedtune.strategies import spec_of

    peers, me, tls = check_peer_config(cfg)
    cfg = dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, num_clients=len(peers), clients_per_round=0))
    resume = has_checkpoint(cfg) and not overwrite
    if not resume:
        claim_run_folder(cfg.out, overwrite=overwrite)
    names = [p.name for p in peers]
    board = Board(names[me], cfg.sim.rounds)
    server = start_peer_server(board, listen_address(cfg, peers[me]), set(names) - {names[me]}, tls)
    limits = _limits(cfg)
    links = {p.name: PeerLink(names[me], p.name, p.address, tls, limits) for p in peers if p.name != names[me]}
    try:
        run, ckpt = open_run(cfg, resume=resume, may_change=RESUMABLE_CHANGES)
        data = load_dataset(cfg)
        lm = load_model(cfg, num_labels=len(data.label_names) or None)
        records = data.train_records
        if cfg.gossip.partition:
            records = [records[j] for j in partition_clients(cfg, records)[me]]
        model = GlobalModel(cfg, lm, encode(data.eval_records, lm.tokenizer, cfg, for_training=False),
                            frozen_in_state=spec_of(cfg.strategy.name).frozen_in_state)
        initial, frozen, scfg = gossip_start(cfg, model)
        ctx = ClientContext(cfg, lm, encode(records, lm.tokenizer, cfg),
                            keep_optimizer_state=cfg.sim.keep_optimizer_state)
        dispatcher = PeerDispatcher(cfg, ctx, peers, me, board, links, console)
        strategy = PeerRounds(cfg.gossip, scfg, names, me, initial, seed=cfg.seed, frozen=frozen,
                              exchange=dispatcher.exchange)
        console.print(f"peer {names[me]} (node {me} of {len(peers)}) serving on port {server.port}"
                      + (" with mutual TLS" if tls is not None else " in plaintext"), highlight=False)
        if ckpt is not None:  # re-join where the others are: the rounds in between are missed, not replayed
            now, done = current_round(links, timeout=5.0)
            start = cfg.sim.rounds + 1 if done else min(now, cfg.sim.rounds + 1)
            if start - 1 > ckpt.round:
                console.print(f"re-joining at round {start}: its checkpoint is of round {ckpt.round}, rounds "
                              f"{ckpt.round + 1}..{start - 1} are missed", highlight=False)
                run.rewrite_metrics([r for r in run.read_metrics() if r.get("round", 0) <= ckpt.round])
                ckpt = dataclasses.replace(ckpt, round=start - 1)
            dispatcher.first_round = ckpt.round + 1
        result = run_rounds(RoundPlan(**peer_plan(cfg)), run, model, strategy, dispatcher, console, resume=ckpt)
        round_, exchange, answered = dispatcher.last
        late = board.wait_fetched(round_, exchange, answered, cfg.gossip.round_timeout_s) if round_ else set()
        if late:
            console.print(f"{', '.join(sorted(late))} did not fetch the last adapter", highlight=False)
        g = cfg.gossip
        print_summary(console, f"fedtune gossip: peer {names[me]} of {len(peers)}, {g.topology}/{g.mix}, "
                               f"{cfg.sim.rounds} rounds", result)
        return result
    finally:
        board.finish()
        for link in links.values():
            link.close()
        server.stop(grace=0.5)


def _limits(cfg: Config) -> Any:
    from fedtune.transport.codec import Limits

    most = int(cfg.federation.max_update_mb * 2**20)
    return Limits(max_tensor_bytes=most, max_total_bytes=most)

