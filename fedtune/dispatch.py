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
