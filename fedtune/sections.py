"""Config sections of the federation side: simulation, the coordinator's rounds, the server and a client node.

They live apart from ``fedtune.config`` so that the simulator and the gRPC server can import their own
section without the whole schema; ``fedtune.config.Config`` gathers them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

WireEncoding = Literal["dense", "fp32", "bf16", "fp16", "int8", "sparse_coo", "sparse_bitmap", "fixed_u32", "sign",
                       "sign_b32", "sign_b64", "sign_b128", "sign_b512", "sign_b1024", "int8_pow2", "int4_pow2",
                       "bitmap"]
"""The encodings of ``fedtune.transport.encodings`` (a test checks the two lists agree)."""


def opt(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


def address_problem(key: str, address: str, any_port: bool = False) -> str | None:
    """Why ``address`` is not a ``host:port`` (``[v6]:port``) gRPC can use, naming ``key``; None when it is.
    ``any_port``: port 0 (any free port) is allowed, as a server may listen on it."""
    host, sep, port = address.rpartition(":")
    example = f"expected host:port, for example {'0.0.0.0:7443' if any_port else 'coord.example.org:7443'}"
    if not sep or not host or not _HOST.match(host) or (":" in host and not host.startswith("[")):
        return f"{key}: got {address!r}, {example}"
    if not port.isdigit() or not (0 if any_port else 1) <= int(port) <= 65535:
        return f"{key}: got {address!r}: the port must be a number from {0 if any_port else 1} to 65535"
    return None


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
    mode: Literal["federated", "centralized", "local-only", "gossip"] = opt(
        "federated", "federated, or a baseline: centralized (one client with all data, same total steps) or "
        "local-only (each client alone, evaluated on the global held-out set); or gossip: no server, each node "
        "mixes its adapter with its neighbours' (the [gossip] section)")
    eval_every: int = opt(1, "evaluate the global adapter every this many rounds (and after the last)")
    dropout: float = opt(0.0, "probability that a sampled client drops out of a round")
    straggler_prob: float = opt(0.0, "probability that a sampled client is slowed down")
    straggler_slowdown: float = opt(4.0, "slow-down factor of a straggler against sim.round_deadline_s")
    round_deadline_s: float | None = opt(None, "simulated round deadline; stragglers whose slowed time exceeds it "
                                         "are left out (unset: no deadline)")
    corrupt_prob: float = opt(0.0, "probability that a client's update is corrupted")
    corrupt_kind: Literal["nan", "scale", "flip", "huge", "weight", "mixed"] = opt(
        "nan", "corruption: nan values, values scaled by sim.corrupt_scale, the update sign-flipped and scaled by "
        "sim.corrupt_scale (flip), values of 1.7e19 (huge), a flipped update declaring 2^63-1 examples (weight), "
        "or one of scale, flip, nan, weight drawn per corrupted reply (mixed)")
    corrupt_scale: float = opt(100.0, "factor of a scaled or flipped corrupted update")
    byzantine: int = opt(0, "the last this many clients corrupt every update they send (sim.corrupt_kind), on top "
                         "of sim.corrupt_prob's random corruptions")
    keep_optimizer_state: bool = opt(False, "each client keeps its own optimizer state across rounds")
    optimizer_state_on: Literal["cpu", "disk"] = opt(
        "cpu", "where per-client state (kept optimizer states, update-pipeline state) lives: cpu memory, or disk "
        "(run folder, for many clients)")
    ray_address: str | None = opt(None, "Ray cluster address for backend=flower (unset: a local Ray)")
    batch_clients: int | Literal["auto"] = opt(
        1, "inproc: sampled clients trained together in one forward and backward pass over the shared base, each "
        "with its own adapter slot, optimizer, clipping and schedule (LoRA, rsLoRA, lora_fa; DoRA and VeRA train "
        "one by one); with sim.workers each worker trains batches of this many; 1: one client at a time; auto: "
        "the largest that fits in memory by fedtune info's estimate, at most a worker's share of a round")

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
        if not 0 <= self.byzantine <= self.num_clients:
            p.append(f"sim.byzantine: got {self.byzantine}, must be in [0, sim.num_clients={self.num_clients}]")
        if self.workers < 1:
            p.append(f"sim.workers: got {self.workers}, must be >= 1")
        for key in ("dropout", "straggler_prob", "corrupt_prob"):
            if not 0 <= getattr(self, key) <= 1:
                p.append(f"sim.{key}: got {getattr(self, key)}, must be in [0, 1]")
        if self.dirichlet_alpha <= 0:
            p.append(f"sim.dirichlet_alpha: got {self.dirichlet_alpha}, must be > 0")
        if self.eval_every < 1:
            p.append(f"sim.eval_every: got {self.eval_every}, must be >= 1")
        if self.batch_clients == "auto":
            pass
        elif not isinstance(self.batch_clients, int) or self.batch_clients < 1:
            p.append(f"sim.batch_clients: got {self.batch_clients}, must be >= 1 or auto")
        elif self.batch_clients > 1 and self.backend != "inproc":
            p.append(f"sim.batch_clients: batching needs sim.backend=inproc, not {self.backend!r} "
                     "(set sim.batch_clients=1)")
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
    disconnect_grace_s: float = opt(5.0, "a node whose connection closed (its process ended, its network dropped) "
                                    "is lost this many seconds later unless it reconnects, without waiting for "
                                    "federation.silence_s (which bounds it)")
    keepalive_s: float | None = opt(10.0, "the server pings a node's connection after this many seconds without a "
                                    "byte from it and closes the connection when the ping is not answered within "
                                    "as long again, so a node cut off without its connection closing (network cut, "
                                    "machine off) is lost at most twice this plus federation.disconnect_grace_s "
                                    "later; a live node's gRPC library answers even while it trains. null: no "
                                    "pings (federation.silence_s alone)")
    eval_every: int = opt(1, "evaluate the global adapter every this many rounds (and after the last), as "
                             "sim.eval_every does in simulation")
    # What one reply may contribute (fedtune.strategies.screen); the simulator applies the same bounds.
    weighting: Literal["examples", "equal"] = opt(
        "examples", "weight of a reply in the average: its declared num_examples (at most federation.max_examples), "
        "or equal (every reply weighs 1, whatever it declares); the simulator applies it too")
    max_examples: int = opt(1_000_000, "a reply declaring more examples than this weighs this much (the capped "
                            "declarations are recorded in the round's record)")
    max_update_norm: float | None = opt(10.0, "largest L2 norm of a reply's update (its tensors minus the global "
                                        "ones): times the round's median update norm (federation.update_norm_bound"
                                        "=median, with 3 or more replies) or absolute; larger ones are refused; "
                                        "unset: no bound")
    update_norm_bound: Literal["median", "absolute"] = opt(
        "median", "how federation.max_update_norm is read: a factor on the round's (lower) median update norm, "
        "which makes the round hold every reply before aggregating, or an absolute norm (replies stream)")
    reorder_buffer: int = opt(64, "updates that arrive before an earlier client's are held (at most this many) "
                              "so that a streaming aggregate sums them in client order: real, restarted and "
                              "simulated runs then agree bit for bit; past it, arrival order (the round's record "
                              "counts screen.out_of_order); 0: arrival order")
    max_abs_value: float | None = opt(1e4, "largest magnitude of any value a reply holds for the global "
                                      "adapter, in any dtype; replies beyond it are refused, and a round whose "
                                      "aggregate is beyond it (or not finite) is not applied; unset: no bound")

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
        if self.disconnect_grace_s < 0:
            p.append(f"federation.disconnect_grace_s: got {self.disconnect_grace_s}, must be >= 0")
        if self.keepalive_s is not None and not self.keepalive_s > 0:
            p.append(f"federation.keepalive_s: got {self.keepalive_s}, must be > 0 (or null: no pings)")
        for key in ("heartbeat_s", "silence_s"):
            if getattr(self, key) <= 0:
                p.append(f"federation.{key}: got {getattr(self, key)}, must be > 0")
        if self.eval_every < 1:
            p.append(f"federation.eval_every: got {self.eval_every}, must be >= 1")
        if self.reorder_buffer < 0:
            p.append(f"federation.reorder_buffer: got {self.reorder_buffer}, must be >= 0 (0: arrival order)")
        if self.max_examples < 1:
            p.append(f"federation.max_examples: got {self.max_examples}, must be >= 1")
        for key in ("max_update_norm", "max_abs_value"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                p.append(f"federation.{key}: got {value}, must be > 0 (or unset: no bound)")
        if self.update_norm_bound == "median" and self.max_update_norm is not None and self.max_update_norm < 1:
            p.append(f"federation.max_update_norm: got {self.max_update_norm}, a factor on the round's median "
                     "update norm must be >= 1 (or set federation.update_norm_bound=absolute)")
        if 0 < self.silence_s <= self.heartbeat_s:
            p.append(f"federation.silence_s: got {self.silence_s}, must exceed federation.heartbeat_s "
                     f"({self.heartbeat_s}), or every node looks silent between two heartbeats")
        return p


@dataclass(frozen=True)
class ServerConfig:
    address: str = opt("127.0.0.1:7070", "host:port the coordinator listens on")
    keys_dir: str | None = opt(None, "folder made by `fedtune keys` (TLS certificate, key, node allow-list)")
    insecure: bool = opt(False, "plaintext without TLS (refused unless the address is loopback or this is set)")
    no_node_auth: bool = opt(False, "serve a non-loopback address without server.keys_dir: anyone who reaches the "
                                    "port can join as any node (refused unless set; logged as a warning)")
    bulk_port: int | None = opt(0, "TCP port of the bulk upload lane on the server's host (large updates skip "
                                   "gRPC's copies; same TLS and node sessions): 0 any free port, null none")
    eval_data: bool = opt(True, "evaluate the global adapter on the server's own held-out data each round")
    max_workers: int = opt(0, "threads serving node calls; each connected node holds one for its presence "
                              "stream and one while it polls or uploads, and an eighth stay free for heartbeats. "
                              "0: 256, or 3 per federation.min_clients plus 64 when that is more")

    def validate(self) -> list[str]:
        p = [x for x in [address_problem("server.address", self.address, any_port=True)] if x]
        if self.max_workers < 0:
            p.append(f"server.max_workers: got {self.max_workers}, must be >= 0 (0: sized from federation.min_clients)")
        return p


@dataclass(frozen=True)
class ClientConfig:
    server: str = opt("127.0.0.1:7070", "host:port of the coordinator")
    name: str = opt("site-1", "this node's name in status, logs and metrics (and its key file name)")
    keys_dir: str | None = opt(None, "folder with ca.pem and nodes/<client.name>.key from `fedtune keys`")
    insecure: bool = opt(False, "plaintext without TLS (refused unless the server is on loopback or this is set)")
    max_backoff_s: float = opt(30.0, "longest wait between reconnection attempts")
    max_retry_s: float = opt(600.0, "how long a node keeps trying to reach a server that refuses or drops its "
                                    "connection before it gives up (exit 1); counted from the last contact")
    bulk_min_mb: float | None = opt(1.0, "updates of at least this size go over the server's bulk lane when it "
                                         "offers one (gRPC otherwise, or when the lane cannot be reached); "
                                         "null: always gRPC")
    encoding: WireEncoding = opt("dense", "wire encoding of updates and of the server's instructions: dense "
                                 "(lossless), fp32 / bf16 / fp16, int8 (blocks with a scale each), sparse_coo, "
                                 "sparse_bitmap, fixed_u32, sign / sign_b<n> / int8_pow2 / int4_pow2 (what the compress "
                                 "transform sends; it picks them itself); the simulator encodes and decodes the same way. "
                                 "Server and nodes must agree")
    pipeline: list[str] = opt([], "update transforms applied after local training, in order, before the wire "
                                  "encoding (fedtune.client.pipeline); each keeps its own state per client. "
                                  "Server and nodes must agree")

    def validate(self) -> list[str]:
        from fedtune.names import name_problem

        p = [x for x in [address_problem("client.server", self.server), name_problem(self.name)] if x]
        p = [x if x.startswith("client.") else f"client.name: {x}" for x in p]
        for key in ("max_backoff_s", "max_retry_s"):
            if getattr(self, key) <= 0:
                p.append(f"client.{key}: got {getattr(self, key)}, must be > 0")
        return p
