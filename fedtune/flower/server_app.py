"""A relay ServerApp: its ``main`` takes the engine's rounds from a queue and sends them to Flower nodes.

The engine's round loop (configure, aggregate, evaluate, checkpoint) stays in charge; this ``main`` only
turns each round's instructions into Messages for node ids (virtual client i -> the i-th node), pushes them
all at once, and hands the replies back one by one as they arrive (Grid API: push_messages / pull_messages).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedtune.flower.records import content_to_reply, instructions_to_content
from fedtune.types import ClientReply, Instructions, failed_reply


@dataclass
class Job:
    """One round's work: ``items`` in, ``replies[i]`` out (for ``items[i]``), ``done`` once all are in."""

    rnd: int
    items: list[tuple[str, Instructions, int]]  # (client id, instructions, client index)
    cfg_items: list[str]
    threads: int
    replies: dict[int, ClientReply] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def put(self, i: int, reply: ClientReply) -> None:
        with self.cond:
            self.replies[i] = reply
            self.cond.notify_all()


STOP = None


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
            messages = [Message(instructions_to_content(ins, index, job.cfg_items, job.threads),
                                dst_node_id=nodes[index % len(nodes)], message_type="train")
                        for _, ins, index in job.items]
            pending = {mid: i for i, mid in enumerate(grid.push_messages(messages))}
            del messages
            while pending:
                for msg in grid.pull_messages(list(pending)):
                    i = pending.pop(msg.metadata.reply_to_message_id)
                    cid = job.items[i][0]
                    if msg.has_error():
                        job.put(i, failed_reply(cid, job.rnd, f"flower client app failed: {msg.error.reason}"))
                    else:
                        job.put(i, content_to_reply(msg.content))
                if pending:
                    time.sleep(poll_s)

    return app
