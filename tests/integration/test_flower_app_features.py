"""The Flower App with fedtune's other features, in one process: base-model strategies (flora, fedex), secure
aggregation, compression with error feedback and a compressed downlink, DP, and a restarted app run.

``LocalGrid`` is Flower's ``Grid`` as a SuperLink gives it to the ServerApp, with each SuperNode being fedtune's
real ClientApp (``make_client_app``) called with its own Flower ``Context``: ``node_config`` as Flower's ``:local:``
simulation sets it (``partition-id``, ``num-partitions``), ``state`` kept between the messages of one run and new
for each run, as on a SuperNode. Only the processes are missing; the real SuperLink/SuperNode deployment is in
``test_flower_deployment.py`` (slow tier). Each run is compared with fedtune's simulator on the same seeds.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_seams import QUIET, SCENARIO, adapter, rounds, simulate

from fedtune.config import load_config, save_config
from fedtune.flower.app import make_client_app, run_flower_server
from fedtune.rounds import RunResult

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES = 3
FAST = ["train.max_steps=1", "eval.samples=0", "data.max_records=60", "sim.partitioner=iid"]


class LocalGrid:
    """See the module docstring. ``lives``: node id -> how many messages that SuperNode answers before it is
    gone (never answers again)."""

    def __init__(self, app_config: Path, run_id: int, nodes: int = NODES, lives: dict[int, int] | None = None) -> None:
        self.app, self.lives = make_client_app(app_config), dict(lives or {})
        self.contexts = {100 + i: Context(run_id=run_id, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": nodes})
                         for i in range(nodes)}
        self._ids = itertools.count()
        self.outbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _answer(self, msg: Message) -> Message | None:
        msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"  # what the SuperLink does on push
        node = msg.metadata.dst_node_id
        if self.lives.get(node, 1) <= 0:
            return None
        if node in self.lives:
            self.lives[node] -= 1
        return self.app(msg, self.contexts[node])

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        return [r for r in map(self._answer, messages) if r is not None]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            reply = self._answer(msg)
            ids.append(msg.metadata.message_id)
            if reply is not None:
                self.outbox.append(reply)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        got = [r for r in self.outbox if r.metadata.reply_to_message_id in message_ids]
        self.outbox = [r for r in self.outbox if r not in got]
        return got


@pytest.fixture(autouse=True)
def a_flower_run():
    """Messages are made inside a Flower run (its id in ``TaskIdentity``), as in a SuperNode's process."""
    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def app_folder(tmp: Path, *overrides: str) -> Path:
    """The app's ``fedtune.toml``, as ``fedtune flower-app`` writes it (here: the config file the run reads)."""
    cfg = load_config(SCENARIO, [*FAST, f"sim.num_clients={NODES}", f"federation.min_clients={NODES}",
                                 "federation.round_timeout_s=5", "federation.wait_timeout_s=5", *overrides])
    path = tmp / "fedtune.toml"
    save_config(cfg, path)
    return path


def flower_run(tmp: Path, out: Path, *overrides: str, run_id: int = 1, lives: dict[int, int] | None = None
               ) -> RunResult:
    config_file = app_folder(tmp, f"out={out}", *overrides)
    grid = LocalGrid(config_file, run_id, lives=lives)
    return run_flower_server(load_config(config_file), grid, QUIET)  # type: ignore[arg-type]


def worst(a: Path, b: Path) -> float:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


FEATURES = {
    "flora": ("strategy.name=flora", "train.lr=5e-2"),
    "fedex": ("strategy.name=fedex", "train.lr=5e-2"),
    "secagg": ("privacy.secagg=true", "privacy.clip_norm=10"),
    "sign+downlink": ("client.pipeline=[compress]", "compress.method=sign", "compress.downlink=true",
                      "train.lr=5e-2"),
    "topk+kept optimizer": ("client.pipeline=[compress]", "compress.method=topk", "compress.fraction=0.1",
                            "sim.keep_optimizer_state=true", "train.lr=5e-2"),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_the_app_equals_the_simulator_with(tmp_path: Path, feature: str) -> None:
    opts = (*FEATURES[feature], "sim.rounds=2", "federation.rounds=2")
    sim = simulate(tmp_path / "sim", *FAST, *opts)
    app = flower_run(tmp_path, tmp_path / "app", *opts)
    assert worst(app.run_dir, sim.run_dir) <= 1e-6
    for s, g in zip(rounds(sim), rounds(app), strict=True):
        assert (g["clients_ok"], g["failures"], g["applied"]) == (NODES, {}, True) == (
            s["clients_ok"], s["failures"], s["applied"])
        assert g["eval_loss"] == pytest.approx(s["eval_loss"], abs=1e-5)
        # fedtune's own frames, whatever carries them (secure aggregation's Shamir shares are random numbers,
        # written in as many digits as they have: a few bytes differ from run to run)
        assert g["bytes_up"] == pytest.approx(s["bytes_up"], abs=64 if feature == "secagg" else 0)
        if feature != "secagg":  # instructions also carry each client's seed (the simulator's do not)
            assert 0 <= g["bytes_down"] - s["bytes_down"] <= 32 * NODES
        if feature == "sign+downlink":  # signs and a scale per block, both ways
            assert g["compression_ratio"] > 5


def test_dp_through_the_app_reports_the_simulators_epsilon(tmp_path: Path) -> None:
    opts = ("privacy.dp=central", "client.pipeline=[dp_clip]", "privacy.sample_rate=1.0", "privacy.accountant=rdp",
            "privacy.noise_multiplier=0.5", "sim.rounds=2", "federation.rounds=2")
    sim, app = simulate(tmp_path / "sim", *FAST, *opts), flower_run(tmp_path, tmp_path / "app", *opts)
    assert [r["epsilon"] for r in rounds(app)] == pytest.approx([r["epsilon"] for r in rounds(sim)])
    assert 0 < rounds(app)[0]["epsilon"] < rounds(app)[1]["epsilon"]
    assert worst(app.run_dir, sim.run_dir) <= 1e-6  # the noise is seeded like the simulator's


@pytest.mark.parametrize("strategy", ["fedavg", "flora"])
def test_a_restarted_app_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path: Path, strategy: str) -> None:
    """The ServerApp stops after round 1 (a crash, or a SuperLink restart); a new ``flwr run`` with the same
    ``out`` continues from the checkpoint, with new node contexts (Flower keeps node state for one run only)."""
    opts = (f"strategy.name={strategy}", "train.lr=5e-2")
    straight = simulate(tmp_path / "sim", *FAST, *opts, "sim.rounds=3")
    flower_run(tmp_path, tmp_path / "app", *opts, "federation.rounds=1", run_id=1)
    resumed = flower_run(tmp_path, tmp_path / "app", *opts, "federation.rounds=3", run_id=2)
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3]
    assert worst(resumed.run_dir, straight.run_dir) <= 1e-6
    want = {k: torch.as_tensor(v) for k, v in adapter(straight.run_dir).items()}
    assert all(torch.allclose(adapter(resumed.run_dir)[k], want[k], atol=1e-6) for k in want)
