"""The simulator's ``Dispatcher``: virtual clients on a pool, with fault injection and byte counting.

Every instruction and reply goes through the wire in this process (``fedtune.transport.loopback``): encoded
with ``client.encoding``, counted, decoded. So simulated clients train on what a real node would decode, the
strategy aggregates what a server would, and ``bytes_up`` / ``bytes_down`` are the real messages' sizes. Faults
(``sim.dropout``, stragglers past ``sim.round_deadline_s``, corrupted updates) are drawn per phase from their
own seeded generator (``faults.fault_rng``). Replies come in client order (the pools answer in the order
asked), one per client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fedtune.compression.config import uplink_encoding
from fedtune.config import Config
from fedtune.simulation.faults import corrupt, fault_rng, inject
from fedtune.simulation.pools import ClientPool, VirtualClient
from fedtune.simulation.store import ClientStore
from fedtune.transport.loopback import send_instructions, send_reply
from fedtune.types import ClientReply, Instructions, failed_reply


class SimDispatcher:
    """``clients`` answering through ``pool``; ``store`` holds their state (checkpointed with the run)."""

    def __init__(self, cfg: Config, clients: list[VirtualClient], pool: ClientPool, store: ClientStore) -> None:
        self.cfg, self.pool, self.store = cfg, pool, store
        self.ids = [c.cid for c in clients]
        self.index = {c.cid: c.index for c in clients}

    def available(self, round: int) -> list[str]:
        return list(self.ids)

    def client_index(self, client_id: str) -> int:
        return self.index[client_id]

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        sim, encoding, up = self.cfg.sim, self.cfg.client.encoding, uplink_encoding(self.cfg)
        rng = fault_rng(self.cfg.seed, round, phase)
        attackers = set(self.ids[len(self.ids) - sim.byzantine:]) if sim.byzantine else set()
        faults = {cid: inject(sim, rng, byzantine=cid in attackers) for cid in instructions}
        received = {cid: send_instructions(ins, encoding) for cid, ins in instructions.items()}
        answered = self.pool.run(round, [(cid, received[cid][0]) for cid in instructions if faults[cid] != "dropout"])
        for cid, ins in instructions.items():
            fault, bytes_down = faults[cid], received[cid][1]
            if fault == "dropout":
                reply = failed_reply(cid, round, "dropped out (sim.dropout)")
                reply.bytes_down = bytes_down
                yield reply
                continue
            reply = next(answered)
            slowed = reply.metrics.get("fit_seconds", 0.0) * sim.straggler_slowdown
            deadline = sim.round_deadline_s
            if fault == "straggler" and deadline is not None and slowed > deadline:
                reply = failed_reply(cid, round, f"straggler: {slowed:.1f} s ({sim.straggler_slowdown}x slower) "
                                                 f"is past the round deadline of {deadline} s")
                reply.bytes_down = bytes_down
                yield reply
                continue
            if fault not in (None, "straggler") and reply.state is not None:
                reply = corrupt(reply, fault, sim.corrupt_scale, ins.state)
            reply, bytes_up = send_reply(reply, phase, up)
            reply.bytes_up, reply.bytes_down = bytes_up, bytes_down
            yield reply

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        self.store.load_state_dict(state, round)

    def close(self) -> None:
        self.pool.close()
