"""The Flower App's pieces without Flower processes: frames in records, and the Grid dispatcher on a fake Grid.

The real deployment (``flower-superlink``, ``flower-supernode``, ``flwr run``) is in
``tests/integration/test_flower_app.py`` (slow tier).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from fedtune.config import load_config
from fedtune.flower.app import (
    GridDispatcher,
    content_frames,
    frames_to_content,
    node_config_for,
    node_identity,
)
from fedtune.flower.template import write_app
from fedtune.server.dispatch import FederationError
from fedtune.strategies import make_strategy, strategy_config
from fedtune.transport.codec import Limits
from fedtune.transport.errors import MessageRejected
from fedtune.transport.messages import (
    frames_to_instructions,
    frames_to_reply,
    instructions_to_frames,
    reply_to_frames,
)
from fedtune.types import ClientReply, Instructions

ROOT = Path(__file__).parents[2]
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_A.weight": torch.randn(4, 16, generator=g).to(torch.bfloat16),
            "a.lora_B.weight": torch.randn(16, 4, generator=g),
            "head": torch.randn(3, 5, generator=g).half()}


def through_records(frames: list[bytes], meta: dict) -> tuple[list[bytes], dict]:
    """What the other side reads: the content deflated to bytes and inflated back, as Flower ships it."""
    content = frames_to_content(frames, meta)
    shipped = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    return content_frames(inflate_object_from_contents(content.object_id, shipped))


@pytest.fixture(autouse=True)
def a_flower_run():
    """Messages are made inside a Flower run (its id in ``TaskIdentity``)."""
    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.mark.parametrize("encoding", ["dense", "int8"])
def test_frames_survive_flower_records_bit_for_bit(encoding: str) -> None:
    ins = Instructions(round=3, client_id="client-1", state=tensors(), train={"max_steps": 2}, extra={"seed": 7})
    frames = list(instructions_to_frames(ins, encoding))
    got, meta = through_records(frames, {"phase": "train"})
    assert got == frames and meta == {"phase": "train"}
    back = frames_to_instructions(got, Limits())
    assert back is not None and back.client_id == "client-1" and back.extra["seed"] == 7
    if encoding == "dense":  # bf16 and fp16 travel in their own dtype, bit for bit (no numpy detour)
        for k, t in tensors().items():
            assert back.state[k].dtype == t.dtype and torch.equal(back.state[k], t)


def test_a_tampered_frame_is_refused_by_fedtune_digest() -> None:
    reply = ClientReply("client-0", 1, tensors(), 10, metrics={"train_loss": 1.0})
    frames = list(reply_to_frames(reply, "train", "dense"))
    got, _ = through_records(frames, {})
    assert frames_to_reply(got, Limits()).state["head"].dtype == torch.float16
    last = bytearray(got[-1])
    last[-1] ^= 0xFF
    with pytest.raises(MessageRejected):
        frames_to_reply([*got[:-1], bytes(last)], Limits())


def test_a_content_that_is_not_fedtune_frames_is_refused() -> None:
    with pytest.raises(MessageRejected, match="not a fedtune message"):
        content_frames(RecordDict({"meta": ConfigRecord({})}))
    alien = ArrayRecord({"000000": Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"\0" * 4)})
    with pytest.raises(MessageRejected, match="not fedtune frames"):
        content_frames(RecordDict({"frames": alien, "meta": ConfigRecord({})}))


class FakeGrid:
    """A Grid whose nodes answer at once: ``answer(node, message) -> reply content, or an Error, or None``
    (never answers); replies are pulled in reverse order of pushing."""

    def __init__(self, nodes: dict[int, dict], answer) -> None:
        self.nodes, self.answer = nodes, answer
        self._ids = itertools.count()
        self.outbox: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def _reply(self, msg: Message) -> Message | None:
        out = self.answer(msg.metadata.dst_node_id, msg)
        if out is None:
            return None
        return Message(out, reply_to=msg)

    def send_and_receive(self, messages, timeout=None):
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"q{next(self._ids)}"
        return [r for r in (self._reply(m) for m in messages) if r is not None]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            ids.append(m.metadata.message_id)
            reply = self._reply(m)
            if reply is not None:
                self.outbox.append(reply)
        return ids

    def pull_messages(self, message_ids):
        wanted = [r for r in self.outbox if r.metadata.reply_to_message_id in message_ids]
        self.outbox = [r for r in self.outbox if r not in wanted]
        return list(reversed(wanted))


def node_answer(names: dict[int, str], behaviour: dict[str, str]):
    def answer(node: int, msg: Message):
        name = names[node]
        if msg.metadata.message_type == "query":
            return RecordDict({"meta": ConfigRecord({"name": name, "index": int(name.split("-")[1]), "held": 0})})
        frames, _ = content_frames(msg.content)
        ins = frames_to_instructions(frames, Limits())
        how = behaviour.get(name, "ok")
        if how == "silent":
            return None
        if how == "crash":
            return Error(code=0, reason="[/x] boom " + "y" * 5000)
        who = "client-9" if how == "impostor" else ins.client_id
        state = {k: v + 1 for k, v in ins.state.items()}
        return frames_to_content(list(reply_to_frames(ClientReply(who, ins.round, state, 5), "train", "dense")), {})
    return answer


def dispatcher(tmp_path: Path, grid: FakeGrid, *extra: str) -> GridDispatcher:
    cfg = load_config(ROOT / "simulations" / "tiny.toml", ["federation.min_clients=2", "federation.round_timeout_s=0.5",
                                                           "federation.wait_timeout_s=1", *extra])
    strategy = make_strategy("fedavg", strategy_config(cfg, False, 0))
    return GridDispatcher(grid, cfg, strategy, QUIET, poll_s=0.01)


def test_grid_dispatcher_names_nodes_and_records_every_failure(tmp_path: Path) -> None:
    names = {101: "client-0", 102: "client-1", 103: "client-2", 104: "client-3"}
    grid = FakeGrid({n: {} for n in names}, node_answer(names, {"client-1": "crash", "client-2": "silent",
                                                                "client-3": "impostor"}))
    d = dispatcher(tmp_path, grid)
    assert d.available(1) == ["client-0", "client-1", "client-2", "client-3"]
    assert [d.client_index(c) for c in ("client-0", "client-3")] == [0, 3]
    state = {"w": torch.zeros(2, 2)}
    ins = {c: Instructions(round=1, client_id=c, state=state) for c in names.values()}
    replies = {r.client_id: r for r in d.dispatch(1, "train", ins)}
    assert set(replies) == set(names.values())
    ok = replies["client-0"]
    assert ok.error is None and torch.equal(ok.state["w"], torch.ones(2, 2)) and ok.bytes_up > 0 and ok.bytes_down > 0
    assert "ClientApp failed" in replies["client-1"].error and len(replies["client-1"].error) < 600
    assert "no reply within federation.round_timeout_s" in replies["client-2"].error
    assert "client-9" in replies["client-3"].error and replies["client-3"].state is None


def test_grid_dispatcher_gives_up_with_too_few_nodes(tmp_path: Path) -> None:
    grid = FakeGrid({7: {}}, node_answer({7: "client-0"}, {}))
    with pytest.raises(FederationError, match="federation.min_clients=2"):
        dispatcher(tmp_path, grid).available(1)


def test_node_identity_and_data_from_its_node_config(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "simulations" / "tiny.toml")
    assert node_identity({"partition-id": 2}) == ("client-2", 2)
    assert node_identity({"client-name": "site-a"}) == ("site-a", -1)
    with pytest.raises(ValueError, match="client-name"):
        node_identity({})
    own, part = node_config_for(cfg, {"data-path": "/d/a.jsonl", "overrides": "data.eval_fraction=0"})
    assert (own.data.path, own.data.eval_fraction, part) == ("/d/a.jsonl", 0.0, None)
    split, part = node_config_for(cfg, {"partition-id": 1, "num-partitions": 5})
    assert split.sim.num_clients == 5 and part == []
    with pytest.raises(ValueError, match="data-path"):
        node_config_for(cfg, {"partition-id": 1})


def test_write_app_folder_and_refuse_to_overwrite(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "simulations" / "tiny.toml", ["out=runs/x"])
    files = write_app(tmp_path / "app", cfg)
    assert {f.name for f in files} == {"pyproject.toml", "__init__.py", "server.py", "client.py", "fedtune.toml"}
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "fedtune_app.server:app"' in text and 'clientapp = "fedtune_app.client:app"' in text
    written = load_config(tmp_path / "app" / "fedtune_app" / "fedtune.toml")
    assert Path(written.out).is_absolute() and dataclasses.replace(written, out=cfg.out) == cfg
    with pytest.raises(FileExistsError, match="already holds"):
        write_app(tmp_path / "app", cfg)
