"""sim.backend=flower: the same federation on Flower's simulation engine (Ray) as in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.flower.records import (
    Task,
    config_from_overrides,
    config_overrides,
    content_to_reply,
    content_to_task,
    reply_lacks_base,
    reply_optimizer_state,
    reply_to_content,
    task_to_content,
)
from fedtune.runs import RunDir
from fedtune.types import ClientReply, Instructions, LowRankUpdate

pytestmark = pytest.mark.integration  # trains simulated federations

SCENARIO = Path(__file__).parents[2] / "simulations" / "tiny.toml"
QUIET = Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def test_config_survives_the_message(tmp_path: Path) -> None:
    cfg = load_config(SCENARIO, [f"out={tmp_path}", "train.max_grad_norm=none", "strategy.name=svd", "strategy.client_ranks=[2,4]",
                                 "adapter.r=4", "sim.ray_address=auto"])
    assert config_from_overrides(config_overrides(cfg)) == cfg


def test_tasks_and_replies_survive_flower_records() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16)}
    ins = Instructions(round=3, client_id="client-2", state=state, train={"max_steps": 5, "lr": 1e-3}, rank=2)
    base = [{"m.q_proj": LowRankUpdate(B=torch.randn(8, 3), A=torch.randn(3, 8)),
             "m.v_proj": LowRankUpdate(B=torch.randn(8, 2), A=torch.randn(2, 8))}, {}]
    opt: dict[str, Any] = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.randn(4, 8)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None}]}
    back = content_to_task(task_to_content(Task(ins, 2, ["seed=1"], 2, run="r1", base_from=4, base_updates=base,
                                                optimizer_state=opt)))
    assert (back.index, back.cfg_items, back.threads, back.run, back.base_from) == (2, ["seed=1"], 2, "r1", 4)
    assert back.ins.round == 3 and back.ins.client_id == "client-2" and back.ins.train == ins.train and back.ins.rank == 2
    assert all(torch.equal(back.ins.state[k], state[k]) and back.ins.state[k].dtype == state[k].dtype for k in state)
    assert [sorted(u) for u in back.base_updates] == [["m.q_proj", "m.v_proj"], []]
    assert all(torch.equal(back.base_updates[0][k].A, u.A) and torch.equal(back.base_updates[0][k].B, u.B)
               for k, u in base[0].items())
    assert back.optimizer_state is not None and torch.equal(back.optimizer_state["state"][0]["exp_avg"],
                                                            opt["state"][0]["exp_avg"])
    assert back.optimizer_state["param_groups"] == opt["param_groups"]
    assert content_to_task(task_to_content(Task(ins, 0, [], 1))).optimizer_state is None
    reply = ClientReply("client-2", 3, state, 40, metrics={"train_loss": 1.5})
    content = reply_to_content(reply, opt)
    got = content_to_reply(content)
    assert got.ok and got.num_examples == 40 and got.metrics == {"train_loss": 1.5} and got.rank is None
    assert got.state is not None and all(torch.equal(got.state[k], state[k]) for k in state)
    kept = reply_optimizer_state(content)
    assert kept is not None and kept["param_groups"] == opt["param_groups"] and not reply_lacks_base(content)
    failed = content_to_reply(reply_to_content(ClientReply("c", 1, None, 0, error="local training failed: x")))
    assert not failed.ok and failed.error == "local training failed: x"


def test_an_actor_folds_in_exactly_the_base_updates_it_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """In log order, each once; older ones missing -> ask for the whole log; another run's model -> reload."""
    from types import SimpleNamespace

    from fedtune.flower import client_app

    def fresh() -> SimpleNamespace:
        model = torch.nn.Module()
        model.layer = torch.nn.Linear(3, 2, bias=False)
        torch.nn.init.zeros_(model.layer.weight)
        return SimpleNamespace(model=model, quantized=False)

    loads: list[int] = []

    def load(cfg: Any, labels: int | None) -> SimpleNamespace:
        loads.append(1)
        return fresh()

    monkeypatch.setattr(client_app, "_load", load)
    site = SimpleNamespace(cfg=None, data=SimpleNamespace(label_names=[]))
    upd = [{"layer": LowRankUpdate(B=torch.full((2, 1), k + 1.0), A=torch.ones(1, 3))} for k in range(3)]
    ins = Instructions(round=1, client_id="c", state={})
    cached = client_app._Model(fresh())  # type: ignore[arg-type]

    def sync(run: str, base_from: int, updates: list[dict[str, LowRankUpdate]]) -> tuple[bool, float]:
        ok = client_app.sync_base(site, cached, Task(ins, 0, [], 1, run=run, base_from=base_from,  # type: ignore[arg-type]
                                                     base_updates=updates))
        weight = cached.lm.model.layer.weight.detach()
        assert bool((weight == weight[0, 0]).all())
        return ok, float(weight[0, 0])

    assert sync("a", 1, upd[1:2]) == (False, 0.0)  # a fresh actor that missed round 1's update
    assert sync("a", 0, upd[:2]) == (True, 3.0)  # the resend: 1 + 2
    assert sync("a", 1, upd[1:3]) == (True, 6.0)  # holds update 1 already: only 3 more
    assert sync("a", 1, upd[1:3]) == (True, 6.0) and cached.applied == 3
    assert not loads
    assert sync("b", 0, upd[:1]) == (True, 1.0)  # another run: reloaded, then its own log
    assert loads == [1]


def _outcome(run_dir: Path) -> dict[str, Any]:
    """What a run ends with: adapter, per-round metrics, base updates and optimizer states (checkpoint)."""
    from fedtune.checkpoint import load_checkpoint

    rounds = [r for r in RunDir(run_dir).read_metrics() if r.get("round", 0) >= 1]
    ckpt = load_checkpoint(run_dir)
    return {"adapter": load_file(str(run_dir / "adapter" / "adapter_model.safetensors")),
            **{k: [r.get(k) for r in rounds] for k in ("clients_ok", "eval_loss", "bytes_up", "agg_error")},
            "base_updates": ckpt.base_updates, "client_states": ckpt.clients}


def _difference(x: Any, y: Any, path: str = "") -> str | None:
    """Where ``x`` and ``y`` differ (tensors bit for bit), or None."""
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        return None if same else f"{path}: max |diff| {float((x.float() - y.float()).abs().max()):.3g}"
    if isinstance(x, LowRankUpdate) and isinstance(y, LowRankUpdate):
        return _difference(x.B, y.B, f"{path}.B") or _difference(x.A, y.A, f"{path}.A")
    if isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            return f"{path}: keys {sorted(map(str, x))} != {sorted(map(str, y))}"
        return next((d for k in x if (d := _difference(x[k], y[k], f"{path}/{k}"))), None)
    if isinstance(x, list | tuple) and isinstance(y, list | tuple) and len(x) == len(y):
        return next((d for i, (a, b) in enumerate(zip(x, y)) if (d := _difference(a, b, f"{path}[{i}]"))), None)
    return None if x == y else f"{path}: {x!r} != {y!r}"


class _FakeGrid:
    """Flower's Grid answered in this process by two "actors" (model caches), chosen per (round, client)."""

    def __init__(self, num_nodes: int, route: dict[tuple[int, int], int], actors: list[dict[str, Any]]):
        self.nodes, self.route, self.actors = list(range(1, num_nodes + 1)), route, actors
        self.answers: dict[str, Any] = {}
        self.seen: list[tuple[int, int, int, int, bool]] = []  # (round, client, actor, base_from, lacked)

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: list[Any]) -> list[str]:
        from types import SimpleNamespace
        from unittest.mock import patch

        from fedtune.flower import client_app

        ids = []
        for msg in messages:
            task = content_to_task(msg.content)
            actor = self.route[(task.ins.round, task.index)]
            with patch.object(client_app, "_MODELS", self.actors[actor]):
                content = client_app.train(msg, None).content  # type: ignore[arg-type]
            self.seen.append((task.ins.round, task.index, actor, task.base_from, reply_lacks_base(content)))
            mid = f"m{len(self.seen)}"
            self.answers[mid] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), content=content,
                                                has_error=lambda: False)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        return [self.answers.pop(m) for m in ids if m in self.answers]


def test_flower_relay_keeps_each_actor_in_step_as_clients_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flora + kept optimizer states through the relay and the ClientApp (no Ray), resumed after round 2:
    bitwise the uninterrupted inproc run.

    Clients move between two actors that outlive the killed run. In round 3 (resumed: a new run nonce) actor 0
    holds the old run's update and reloads; actor 1 sat out round 3, so in round 4 it reloads too, lacks the
    updates of rounds 1-2, says so, and gets the whole log.
    """
    import queue
    import threading

    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.flower import client_app
    from fedtune.flower.server_app import STOP, relay_app
    from fedtune.simulation import flower_backend
    from fedtune.simulation.engine import run_simulation

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    route = {(1, 0): 0, (1, 1): 1, (1, 2): 0, (2, 0): 0, (2, 1): 0, (2, 2): 1, (3, 0): 0, (3, 1): 0, (3, 2): 0,
             (4, 0): 1, (4, 1): 0, (4, 2): 1}  # (round, client) -> actor
    actors: list[dict[str, Any]] = [{}, {}]
    grids: list[_FakeGrid] = []

    class InProcessFlower:
        def __init__(self, num_nodes: int, backend: dict[str, Any]):
            self.jobs: queue.Queue[Any] = queue.Queue()
            grids.append(_FakeGrid(num_nodes, route, actors))
            self.thread = threading.Thread(target=relay_app(self.jobs, num_nodes), args=(grids[-1], None), daemon=True)
            self.thread.start()

        def check(self) -> None:
            assert self.thread.is_alive()

        def close(self) -> None:
            self.jobs.put(STOP)
            self.thread.join()

    monkeypatch.setattr(flower_backend, "_Simulation", InProcessFlower)

    def config(backend: str, rounds: int) -> Any:
        return load_config(SCENARIO, [f"out={tmp_path / backend}", f"sim.backend={backend}", "eval.samples=0",
                                      "strategy.name=flora", f"sim.rounds={rounds}", "train.max_steps=1",
                                      "sim.keep_optimizer_state=true"])

    loads = client_app.LOADS["models"]
    inproc = _outcome(run_simulation(config("inproc", 4), QUIET).run_dir)
    run_simulation(config("flower", 2), QUIET)
    flower = _outcome(run_simulation(config("flower", 4), QUIET, resume=tmp_path / "flower").run_dir)
    assert inproc["clients_ok"] == flower["clients_ok"] == [3, 3, 3, 3]
    assert [s[1:] for s in grids[1].seen if s[0] == 4] == [(0, 1, 2, True), (1, 0, 2, False), (2, 1, 2, True),
                                                          (0, 1, 0, False), (2, 1, 0, False)]
    assert client_app.LOADS["models"] - loads == 4  # each actor once per run
    assert _difference(inproc, flower) is None, _difference(inproc, flower)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "extra", "ray_cpus"), [
    ("fedavg", [], None),
    ("svd", [], None),
    ("flora", ["train.max_steps=1"], "1"),  # folds into the base weights, which both actors must track
    ("fedavg", ["sim.keep_optimizer_state=true", "train.max_steps=1"], "1"),  # states travel between actors
], ids=["fedavg", "svd", "flora-2-actors", "keep-optimizer-state-2-actors"])
def test_flower_backend_gives_the_inproc_adapter_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         strategy: str, extra: list[str], ray_cpus: str | None) -> None:
    """Same seeds, same data partitions, same fp32 CPU math with the same thread count: identical tensors.

    With ``ray_cpus=1`` there are two actors (on 2 cores) computing with one thread each, so 3 clients a round
    spread over both and may land on another actor next round; both runs then compute with one thread.
    """
    from fedtune.simulation.engine import run_simulation

    threads = torch.get_num_threads()
    if ray_cpus is not None:
        monkeypatch.setenv("FEDTUNE_RAY_CPUS", ray_cpus)
        torch.set_num_threads(int(ray_cpus))
    runs = {}
    try:
        for backend in ("inproc", "flower"):
            cfg = load_config(SCENARIO, [f"out={tmp_path / backend}", f"sim.backend={backend}", "eval.samples=0",
                                         f"strategy.name={strategy}", *extra])
            runs[backend] = _outcome(run_simulation(cfg, QUIET).run_dir)
            assert runs[backend]["clients_ok"] == [3, 3]
    finally:
        torch.set_num_threads(threads)
    assert _difference(runs["inproc"], runs["flower"]) is None, _difference(runs["inproc"], runs["flower"])
