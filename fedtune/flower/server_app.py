"""A relay ServerApp: its ``main`` takes the engine's rounds from a queue and sends them to Flower nodes.

The engine's round loop (configure, aggregate, evaluate, checkpoint) stays in charge; this ``main`` only
turns each round's instructions into Messages for node ids (virtual client i -> the i-th node), pushes them
all at once, and hands the replies back one by one as they arrive (Grid API: push_messages / pull_messages).
A reply saying the actor lacks older base updates than the message carried is not handed back: the task
goes out once more with the whole log (``base_from = 0``), which any actor can catch up from.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedtune.flower.records import (
    Task,
    content_to_reply,
    reply_client_state,
    reply_lacks_base,
    split_state,
    task_to_content,
)
from fedtune.types import ClientReply, Instructions, LowRankUpdate, failed_reply


@dataclass
class Job:
    """One round's work: ``items`` in, ``replies[i]`` out (for ``items[i]``) as each comes back.

    ``base`` is the run's whole base-update log; messages carry ``base[base_from:]`` unless an actor asks
    for more. ``states[i]`` is client i's state after its work (None when the actor failed).
    """

    rnd: int
    items: list[tuple[str, Instructions, int, dict[str, Any]]]  # (client id, instructions, index, client state)
    cfg_items: list[str]
    threads: int
    run: str = ""
    base: list[dict[str, LowRankUpdate]] = field(default_factory=list)
    base_from: int = 0
    replies: dict[int, ClientReply] = field(default_factory=dict)
    states: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def task(self, i: int, base_from: int) -> Task:
        _, ins, index, state = self.items[i]
        optimizer_state, client_state = split_state(state)
        return Task(ins, index, self.cfg_items, self.threads, run=self.run, base_from=base_from,
                    base_updates=self.base[base_from:], optimizer_state=optimizer_state, client_state=client_state)

    def put(self, i: int, reply: ClientReply, state: dict[str, Any] | None = None) -> None:
        with self.cond:
            self.replies[i] = reply
            self.states[i] = state
            self.cond.notify_all()


STOP = None


def _push(grid: Grid, nodes: list[int], job: Job, indices: list[int], base_from: int) -> dict[str, int]:
    """Send ``job``'s items ``indices`` with the base log from ``base_from``; returns message id -> item."""
    messages = [Message(task_to_content(job.task(i, base_from)), dst_node_id=nodes[job.items[i][2] % len(nodes)],
                        message_type="train") for i in indices]
    return dict(zip(grid.push_messages(messages), indices, strict=True))


def relay_app(jobs: queue.Queue[Job | None], num_nodes: int, poll_s: float = 0.02) -> ServerApp:
    """A ServerApp whose main serves ``jobs`` until it gets ``STOP`` (once all ``num_nodes`` are registered)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < num_nodes:  # the simulation registers its nodes after this thread starts
            time.sleep(poll_s)
            nodes = sorted(grid.get_node_ids())
        while (job := jobs.get()) is not STOP:
            pending = _push(grid, nodes, job, list(range(len(job.items))), job.base_from)  # message id -> item
            whole_log = set(pending.values()) if job.base_from == 0 else set()  # no actor can lack an update
            while pending:
                resend = []
                for msg in grid.pull_messages(list(pending)):
                    i = pending.pop(msg.metadata.reply_to_message_id)
                    cid = job.items[i][0]
                    if msg.has_error():
                        job.put(i, failed_reply(cid, job.rnd, f"flower client app failed: {msg.error.reason}"))
                    elif reply_lacks_base(msg.content) and i not in whole_log:
                        resend.append(i)
                    else:
                        job.put(i, content_to_reply(msg.content), reply_client_state(msg.content))
                if resend:
                    pending.update(_push(grid, nodes, job, resend, 0))
                    whole_log.update(resend)
                if pending:
                    time.sleep(poll_s)

    return app
