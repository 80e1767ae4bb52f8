"""Config sections of the federation side: simulation, the coordinator's rounds, the server and a client node.

They live apart from ``fedtune.config`` so that the simulator and the gRPC server can import their own
section without the whole schema; ``fedtune.config.Config`` gathers them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

WireEncoding = Literal["dense", "fp32", "bf16", "fp16", "int8", "sparse_coo", "sparse_bitmap", "fixed_u32", "sign",
                       "int8_pow2", "int4_pow2"]
"""The encodings of ``fedtune.transport.encodings`` (a test checks the two lists agree)."""


def opt(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SimConfig:
    num_clients: int = opt(4, "number of virtual clients (sites) in the simulated federation")
    clients_per_round: float = opt(0, "clients sampled each round: 0 for all, a fraction (< 1) or a count (>= 1)")
    rounds: int = opt(3, "federated rounds")
    partitioner: Literal["category", "dirichlet", "iid", "size_skew"] = opt(
        "category", "how records are split across clients: whole categories, Dirichlet over categories, iid, "
        "or iid with skewed sizes")
    categories_per_client: int = opt(1, "whole categories per client (partitioner=category)")
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration (partitioner=dirichlet); smaller is more skewed")
    size_skew: float = opt(1.0, "log-normal sigma of client sizes (partitioner=size_skew): 0 gives equal sizes, "
                           "1 a largest client typically several times the smallest")
    backend: Literal["inproc", "flower"] = opt("inproc", "inproc (one process, shared base model) or flower "
                                                "(Flower's simulation engine on Ray)")
    workers: int = opt(1, "inproc: processes training the sampled clients in parallel, forked once the model is "
                          "loaded so that they share its base weights (one thread each); 1: the engine's process")
    mode: Literal["federated", "centralized", "local-only"] = opt(
        "federated", "federated, or a baseline: centralized (one client with all data, same total steps) or "
        "local-only (each client alone, evaluated on the global held-out set)")
    eval_every: int = opt(1, "evaluate the global adapter every this many rounds (and after the last)")
    dropout: float = opt(0.0, "probability that a sampled client drops out of a round")
    straggler_prob: float = opt(0.0, "probability that a sampled client is slowed down")
    straggler_slowdown: float = opt(4.0, "slow-down factor of a straggler against sim.round_deadline_s")
    round_deadline_s: float | None = opt(None, "simulated round deadline; stragglers whose slowed time exceeds it "
                                         "are left out (unset: no deadline)")
    corrupt_prob: float = opt(0.0, "probability that a client's update is corrupted")
    corrupt_kind: Literal["nan", "scale"] = opt("nan", "corruption: nan values or scaled by sim.corrupt_scale")
    corrupt_scale: float = opt(100.0, "factor of a scaled corrupted update")
    keep_optimizer_state: bool = opt(False, "each client keeps its own optimizer state across rounds")
    optimizer_state_on: Literal["cpu", "disk"] = opt(
        "cpu", "where per-client state (kept optimizer states, update-pipeline state) lives: cpu memory, or disk "
        "(run folder, for many clients)")
    ray_address: str | None = opt(None, "Ray cluster address for backend=flower (unset: a local Ray)")

    def validate(self) -> list[str]:
        p = []
        if self.num_clients < 1:
            p.append(f"sim.num_clients: got {self.num_clients}, must be >= 1")
        if self.clients_per_round < 0:
            p.append(f"sim.clients_per_round: got {self.clients_per_round}, must be >= 0 (0: all clients)")
        elif self.clients_per_round >= 1 and self.clients_per_round > self.num_clients:
            p.append(f"sim.clients_per_round: got {self.clients_per_round}, more than sim.num_clients "
                     f"({self.num_clients})")
        if self.rounds < 1:
            p.append(f"sim.rounds: got {self.rounds}, must be >= 1")
        if self.workers < 1:
            p.append(f"sim.workers: got {self.workers}, must be >= 1")
        for key in ("dropout", "straggler_prob", "corrupt_prob"):
            if not 0 <= getattr(self, key) <= 1:
                p.append(f"sim.{key}: got {getattr(self, key)}, must be in [0, 1]")
        if self.dirichlet_alpha <= 0:
            p.append(f"sim.dirichlet_alpha: got {self.dirichlet_alpha}, must be > 0")
        if self.eval_every < 1:
            p.append(f"sim.eval_every: got {self.eval_every}, must be >= 1")
        return p


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = opt(3, "rounds the coordinator runs")
    min_clients: int = opt(2, "clients that must be connected before a round starts (the valid replies a round "
                           "needs to be applied are strategy.min_replies)")
    clients_per_round: float = opt(0, "clients sampled each round: 0 for all connected, a fraction (< 1) or a "
                                   "count (>= 1)")
    round_timeout_s: float = opt(600.0, "seconds to wait for updates; later ones are left out of the round")
    wait_timeout_s: float = opt(3600.0, "seconds to wait for federation.min_clients before giving up")
    max_update_mb: float = opt(4096.0, "largest update a client may declare, in MiB")
    heartbeat_s: float = opt(2.0, "seconds between a node's heartbeats (the server's value is sent to every node "
                             "when it registers)")
    silence_s: float = opt(10.0, "a node not heard from for this many seconds is no longer live: it is left out of "
                           "the open round and of sampling (must exceed federation.heartbeat_s)")
    eval_every: int = opt(1, "evaluate the global adapter every this many rounds (and after the last), as "
                             "sim.eval_every does in simulation")

    def validate(self) -> list[str]:
        p = []
        if self.rounds < 1:
            p.append(f"federation.rounds: got {self.rounds}, must be >= 1")
        if self.min_clients < 1:
            p.append(f"federation.min_clients: got {self.min_clients}, must be >= 1")
        if self.clients_per_round < 0:
            p.append(f"federation.clients_per_round: got {self.clients_per_round}, must be >= 0 (0: all)")
        if self.round_timeout_s <= 0:
            p.append(f"federation.round_timeout_s: got {self.round_timeout_s}, must be > 0")
        for key in ("heartbeat_s", "silence_s"):
            if getattr(self, key) <= 0:
                p.append(f"federation.{key}: got {getattr(self, key)}, must be > 0")
        if self.eval_every < 1:
            p.append(f"federation.eval_every: got {self.eval_every}, must be >= 1")
        if 0 < self.silence_s <= self.heartbeat_s:
            p.append(f"federation.silence_s: got {self.silence_s}, must exceed federation.heartbeat_s "
                     f"({self.heartbeat_s}), or every node looks silent between two heartbeats")
        return p


@dataclass(frozen=True)
class ServerConfig:
    address: str = opt("127.0.0.1:7070", "host:port the coordinator listens on")
    keys_dir: str | None = opt(None, "folder made by `fedtune keys` (TLS certificate, key, node allow-list)")
    insecure: bool = opt(False, "plaintext without TLS (refused unless the address is loopback or this is set)")
    bulk_port: int | None = opt(0, "TCP port of the bulk upload lane on the server's host (large updates skip "
                                   "gRPC's copies; same TLS and node sessions): 0 any free port, null none")
    eval_data: bool = opt(True, "evaluate the global adapter on the server's own held-out data each round")


@dataclass(frozen=True)
class ClientConfig:
    server: str = opt("127.0.0.1:7070", "host:port of the coordinator")
    name: str = opt("site-1", "this node's name in status, logs and metrics (and its key file name)")
    keys_dir: str | None = opt(None, "folder with ca.pem and nodes/<client.name>.key from `fedtune keys`")
    insecure: bool = opt(False, "plaintext without TLS (refused unless the server is on loopback or this is set)")
    max_backoff_s: float = opt(30.0, "longest wait between reconnection attempts")
    bulk_min_mb: float | None = opt(1.0, "updates of at least this size go over the server's bulk lane when it "
                                         "offers one (gRPC otherwise, or when the lane cannot be reached); "
                                         "null: always gRPC")
    encoding: WireEncoding = opt("dense", "wire encoding of updates and of the server's instructions: dense "
                                 "(lossless), fp32 / bf16 / fp16, int8 (blocks with a scale each), sparse_coo, "
                                 "sparse_bitmap, fixed_u32, sign / int8_pow2 / int4_pow2 (what the compress "
                                 "transform sends; it picks them itself); the simulator encodes and decodes the same way. "
                                 "Server and nodes must agree")
    pipeline: list[str] = opt([], "update transforms applied after local training, in order, before the wire "
                                  "encoding (fedtune.client.pipeline); each keeps its own state per client. "
                                  "Server and nodes must agree")
