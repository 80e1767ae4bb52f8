"""fedtune's Flower App in a real Flower deployment on loopback: ``flower-superlink``, three ``flower-supernode``s
and ``flwr run`` of the folder ``fedtune flower-app`` writes (tiny Llama, fp32, 2 rounds).

The reference is fedtune's own simulator on the same seeds: each SuperNode gets a JSONL file holding exactly the
records the simulator's partitioner gave the virtual client of its index, and is named like it, as in
``test_federation.py`` (which shows fedtune's gRPC server equals that simulator). Flower starts a fresh
ClientApp process per message (imports and the model load each time), so rounds take seconds, not tenths.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.data.partition import partition_clients
from fedtune.pipeline import load_dataset
from fedtune.simulation.engine import run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
SCENARIO = ROOT / "simulations" / "tiny.toml"
BIN = Path(sys.executable).parent
QUIET = Console(file=open(os.devnull, "w"), width=200)  # noqa: SIM115
BASE = ["train.max_steps=2", "eval.samples=0", "sim.num_clients=3", "sim.rounds=2", "sim.partitioner=iid",
        "data.max_records=90", "federation.rounds=2", "federation.min_clients=3", "federation.round_timeout_s=240",
        "federation.wait_timeout_s=240"]
SITE = "data.eval_fraction=0 data.max_records=none"  # a site trains on its whole file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def worst_difference(a: Path, b: Path) -> float:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, Path]:
    """The simulator's run and per-client JSONL files of its partition."""
    tmp = tmp_path_factory.mktemp("sim")
    cfg = load_config(SCENARIO, [*BASE, f"out={tmp / 'sim'}"])
    run_simulation(cfg, QUIET)
    train = load_dataset(cfg).train_records
    for i, part in enumerate(partition_clients(cfg, train)):
        (tmp / f"client-{i}.jsonl").write_text("".join(json.dumps(train[j]) + "\n" for j in part))
    return tmp / "sim", tmp


class Deployment:
    """A SuperLink and SuperNodes on loopback, a Flower config home naming it ``dep``, logs under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n\n'
            '[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 3\n'
            'options.backend.client-resources.num-cpus = 1\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}:{os.environ['PATH']}",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def superlink(self, timeout: float = 180) -> None:
        """Start the SuperLink and wait until it listens (``flwr run`` before that finds no SuperLink)."""
        proc = self.start("superlink", str(BIN / "flower-superlink"), "--insecure",
                          "--disable-runtime-dependency-installation", "--port", str(self.port))
        end = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert proc.poll() is None and time.monotonic() < end, f"the SuperLink did not listen\n{self.logs()}"
            time.sleep(0.5)

    def supernode(self, i: int, data: Path) -> None:
        node_config = (f"client-name='client-{i}' partition-id={i} data-path='{data / f'client-{i}.jsonl'}' "
                       f"overrides='{SITE}'")
        self.start(f"supernode-{i}", str(BIN / "flower-supernode"), "--insecure", "--superlink",
                   f"127.0.0.1:{self.port}", "--port", str(free_port()), "--node-config", node_config)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def make_app(tmp: Path, *extra: str) -> Path:
    app = tmp / "app"
    subprocess.run([str(BIN / "fedtune"), "flower-app", str(app), str(SCENARIO), *BASE, f"out={tmp / 'run'}", *extra],
                   check=True, capture_output=True, cwd=ROOT)
    return app


def flwr_run(dep: Deployment, app: Path, connection: str, timeout: float) -> str:
    out = subprocess.run([str(BIN / "flwr"), "run", str(app), connection, "--stream"], check=False, env=dep.env,
                         cwd=dep.tmp, capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


@pytest.fixture
def deployment(tmp_path: Path):
    dep = Deployment(tmp_path)
    yield dep
    dep.stop()


def test_flwr_run_equals_the_simulator(simulated, deployment: Deployment) -> None:
    sim_run, data = simulated
    dep = deployment
    app = make_app(dep.tmp)
    dep.superlink()
    for i in range(3):
        dep.supernode(i, data)
    out = flwr_run(dep, app, "dep", timeout=900)
    run = dep.tmp / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file(), out + dep.logs()
    assert worst_difference(run, sim_run) <= 1e-6
    got, want = metrics(run), metrics(sim_run)
    assert [r["round"] for r in got] == [0, 1, 2]
    for g, w in zip(got, want, strict=True):
        assert g["eval_loss"] == pytest.approx(w["eval_loss"], abs=1e-5)
        assert (g["clients_ok"], g["clients_failed"]) == (w["clients_ok"], w["clients_failed"])
        # the same frames as fedtune's own wire; instructions also carry each client's seed
        assert g["bytes_up"] == w["bytes_up"]
        assert 0 <= g["bytes_down"] - w["bytes_down"] <= 32 * g["clients_ok"]
    assert "round 2/2" in out


def test_a_supernode_killed_mid_run_is_a_recorded_failure(simulated, deployment: Deployment) -> None:
    _, data = simulated
    dep = deployment
    app = make_app(dep.tmp, "federation.rounds=3", "federation.min_clients=2", "federation.round_timeout_s=60",
                   "train.max_steps=6")
    dep.superlink()
    for i in range(3):
        dep.supernode(i, data)
    run = dep.tmp / "run"
    runner = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "dep", "--stream"], env=dep.env, cwd=dep.tmp,
                              stdout=open(dep.tmp / "flwr-run.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        end = time.monotonic() + 600
        while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2):  # round 1 done
            assert time.monotonic() < end and runner.poll() is None, dep.logs()
            time.sleep(0.5)
        dep.procs["supernode-2"].kill()
        runner.wait(timeout=900)
    finally:
        if runner.poll() is None:
            runner.kill()
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3], dep.logs()
    failed = [r for r in rounds[2:] if "client-2" in r["failures"]]
    assert failed and all(r["clients_ok"] >= 1 for r in rounds[1:]), rounds
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_local_simulation_of_the_app_equals_the_simulator(simulated, tmp_path: Path) -> None:
    """``flwr run APP local``: Flower's own simulation runtime, nodes taking their partition of the data."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("Flower's simulation runtime needs ray (pip install -e '.[ray]')")
    sim_run, _ = simulated
    dep = Deployment(tmp_path)
    app = make_app(tmp_path)
    try:
        out = flwr_run(dep, app, "local", timeout=900)
    finally:  # `flwr run` leaves its local SuperLink serving: stop it (another run would reuse it)
        subprocess.run(["pkill", "-f", f"{dep.home}/local-superlink"], check=False)
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file(), out
    assert worst_difference(run, sim_run) <= 1e-6
