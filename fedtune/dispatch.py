"""How the round driver reaches clients: the ``Dispatcher`` protocol (Flower's ``Grid``, fedtune-sized).

The driver (``fedtune.rounds``) decides what every client is asked; a dispatcher only delivers it and brings
back the answers. Implementations:

- ``fedtune.simulation.dispatch.SimDispatcher``: virtual clients on a pool (in-process, forked workers, or
  Flower/Ray), with fault injection and byte counting from the encoded messages;
- ``fedtune.server.dispatch.GrpcDispatcher``: the gRPC ``RoundCoordinator`` and the nodes polling it;
- later: a neighbour exchange per gossip peer, and Flower's ``Grid`` in a Flower App.

Contract of ``dispatch``: every client in ``instructions`` gets exactly one reply, yielded as soon as it is
in, in any order; a client that fails, drops out, is too late or sends something invalid yields a reply
with ``error`` set (failures are data). Each reply carries ``bytes_down`` (its instructions on the wire)
and ``bytes_up`` (its update on the wire, 0 when nothing came). The iterator may block while clients work.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fedtune.types import ClientReply, Instructions


class Dispatcher(Protocol):
    """Delivers one phase's instructions to clients and yields their replies; see the module docstring."""

    def available(self, round: int) -> list[str]:
        """The clients that may be asked in ``round``, in a stable order (sampling draws from this list).

        May block (the server waits for ``federation.min_clients`` live nodes) and may raise to end the run
        (too few clients in time).
        """
        ...

    def client_index(self, client_id: str) -> int:
        """A stable number per client; its training seed in each round derives from it (``client_seed``)."""
        ...

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        """Send every client its instructions; yield one reply per client as they arrive (any order)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """What the last round adds to its record besides the replies (the server: updates it refused)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Per-client state to checkpoint with the run (the simulator's store; a server keeps none)."""
        ...

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        """Restore ``state_dict()`` from the checkpoint of ``round`` (a resumed run)."""
        ...

    def close(self) -> None:
        """Release workers or connections; a server tells its nodes the federation is done."""
        ...


def sampling_rng(seed: int, round: int) -> random.Random:
    """The generator a round's client sampling draws from: reproducible per (seed, round), so a resumed run
    samples as an uninterrupted one, and a real federation as its simulation."""
    return random.Random(seed * 7919 + round)


def in_order(replies: Iterable[ClientReply], order: list[str]) -> list[ClientReply]:
    """``replies`` sorted into ``order`` (the instructions' order): for strategies that hold every reply, so
    that their result does not depend on who answered first. Unknown clients go last, in arrival order."""
    rank = {cid: i for i, cid in enumerate(order)}
    return sorted(replies, key=lambda r: rank.get(r.client_id, len(order)))


@dataclass
class ClientOrder:
    """Replies passed on in the instructions' order, whatever order they arrive in, holding at most ``hold``
    early ones: so that a streaming aggregate (fedavg's running sums) adds them in one fixed order and a real
    federation computes, bit for bit, what its simulation and a restarted run compute.

    A reply goes on once every client before it has answered or failed; one that comes early waits. Failed
    replies cost nothing to hold; when more than ``hold`` replies with a state wait, the earliest of them goes
    on out of order (bounded memory first), and ``out_of_order`` counts them (the round's record shows it).
    ``hold = 0``: arrival order.
    """

    order: list[str]
    hold: int
    out_of_order: int = 0

    def __call__(self, replies: Iterable[ClientReply]) -> Iterator[ClientReply]:
        position = {cid: i for i, cid in enumerate(self.order)}
        waiting: dict[int, ClientReply] = {}
        sent_early: set[int] = set()
        next_up, held = 0, 0
        for reply in replies:
            i = position.get(reply.client_id)
            if i is None or i < next_up or i in waiting or i in sent_early:
                yield reply  # not asked, or a second reply: the strategy refuses it, in any order
                continue
            waiting[i] = reply
            held += reply.state is not None
            while next_up in waiting or next_up in sent_early:
                sent_early.discard(next_up)
                ready = waiting.pop(next_up, None)
                next_up += 1
                if ready is not None:
                    held -= ready.state is not None
                    yield ready
            while held > self.hold:
                early = min(j for j, r in waiting.items() if r.state is not None)
                held -= 1
                self.out_of_order += 1
                sent_early.add(early)
                yield waiting.pop(early)
        for i in sorted(waiting):
            yield waiting[i]
