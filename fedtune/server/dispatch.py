"""The gRPC server's ``Dispatcher``: the round driver's phases published to nodes through ``RoundCoordinator``.

``available`` waits for ``federation.min_clients`` live nodes (giving up after ``federation.wait_timeout_s``)
and takes in what nodes reported at registration (``BaseSync``); ``dispatch`` opens the phase on the
coordinator and yields its replies as they arrive, with the bytes of each message. Client seeds derive from a
node's position among every node that registered since the server started, in natural name order
(``client-0``, ``client-1``, ... ``client-10``, as the simulator numbers its virtual clients), so a federation
of nodes named and partitioned like the simulator's clients computes what the simulation computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from fedtune.server.coordinator import RoundCoordinator
from fedtune.transport import FederationServer, instructions_wire_size
from fedtune.types import ClientReply, Instructions
from fedtune.untrusted import clean

STOP_GRACE_S = 10.0


class FederationError(RuntimeError):
    """The federation cannot go on (too few clients within ``federation.wait_timeout_s``)."""


class BaseSync:
    """Which base-weight updates (flora, fedex) each node's process holds, kept true across node restarts.

    The strategy's ``base_log`` sends every sampled node the updates it has not been sent yet, and its
    instructions carry ``base_from`` / ``base_to`` (the updates the node must hold before and after them) so
    a node can tell a stale bundle from a fresh one. A node reports at each registration how many it holds
    (a restarted process: none); ``rewind`` takes those reports in before a round is configured, and
    ``rebase`` rebuilds the open round's instructions of a node whose process restarted after they were made.
    """

    def __init__(self, strategy: Any) -> None:
        self.log = strategy.base_log

    def rewind(self, held: dict[str, int]) -> None:
        """Take in what each node reported at its registration (``RoundCoordinator.take_registrations``)."""
        if self.log is None:
            return
        for node, n in held.items():
            self.log.rewind(node, n)

    def rebase(self, node: str, held: int, ins: Instructions) -> Instructions:
        assert self.log is not None, "only instructions with a base range need a rebase"
        self.log.rewind(node, held)
        return dataclasses.replace(ins, base_update=self.log.pending(node),
                                   extra={**ins.extra, "base_from": held, "base_to": len(self.log.log)})


class GrpcDispatcher:
    """Nodes polling ``coord`` (served by ``server``); ``strategy`` for its base log and reply buffering."""

    def __init__(self, coord: RoundCoordinator, server: FederationServer, strategy: Any, *, min_clients: int,
                 wait_timeout_s: float, round_timeout_s: float, encoding: str, console: Any = None) -> None:
        self.coord, self.server, self.console = coord, server, console
        self.min_clients, self.wait_timeout_s, self.round_timeout_s = min_clients, wait_timeout_s, round_timeout_s
        self.encoding = encoding
        self.hold_all = bool(strategy.needs_all_replies)
        self.base_sync = BaseSync(strategy)
        coord.rebase = self.base_sync.rebase
        self._order: list[str] = []

    def available(self, round: int) -> list[str]:
        """Live nodes in natural name order, once ``min_clients`` are live.

        Raises:
            FederationError: fewer than ``min_clients`` within ``wait_timeout_s``.
        """
        self.coord.set_phase("waiting", round)
        if not self.coord.wait_for_clients(self.min_clients, self.wait_timeout_s):
            raise FederationError(
                f"only {len(self.coord.live_clients())} of federation.min_clients={self.min_clients} client(s) "
                f"connected within federation.wait_timeout_s={self.wait_timeout_s:g} s (round {round}); "
                "start more clients or lower federation.min_clients. The run resumes from its folder when the "
                "server is started again")
        self.base_sync.rewind(self.coord.take_registrations())
        self._order = self.coord.known_clients()
        return self.coord.live_clients()

    def client_index(self, client_id: str) -> int:
        return self._order.index(client_id) if client_id in self._order else len(self._order)

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        sizes = {cid: instructions_wire_size(ins, self.encoding) for cid, ins in instructions.items()}
        self.coord.open_round(round, instructions, self.round_timeout_s,
                              buffer=len(instructions) + 1 if self.hold_all else 2, phase=phase)
        for reply in self.coord.replies():
            reply.bytes_down = sizes.get(reply.client_id, 0)
            yield reply

    def metrics(self) -> dict[str, Any]:
        return {"rejected": self.coord.rejected}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        """Nothing: a node keeps its own state in its own folder."""

    def abort(self) -> None:
        """Stop serving without telling the nodes anything: the server failed, the federation is not done.
        Nodes see an unreachable server and keep reconnecting, so a restarted server resumes with them."""
        self.server.stop(grace=1.0)

    def close(self) -> None:
        """The run finished: tell every node the federation is done (waiting ``STOP_GRACE_S`` for them), then
        stop serving. Only a finished run calls this; a failed one calls ``abort``."""
        try:
            self.coord.finish()
            missing = self.coord.wait_stopped(STOP_GRACE_S)
            if missing and self.console is not None:
                self.console.print(f"not told to stop (gone?): {clean(', '.join(missing))}", highlight=False, markup=False)
        finally:
            self.server.stop(grace=1.0)
