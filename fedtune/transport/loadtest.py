"""Load and attack harness: a real `fedtune server` process, lightweight honest nodes, hostile peers.

Used by the resource-exhaustion test (tests/integration/test_exhaustion.py) and benchmarks
(``benchmarks/exhaustion.py``). The server is the real one (tiny Llama for its global adapter, fedavg,
plaintext on loopback, no allow-list). Honest nodes are threads of the calling process, each a
``FederationClient`` answering every round with small random tensors shaped like the adapter (no model).
The attacks are the ones of issue 16, each kept up (re-opened as the server closes them) until stopped:

- ``idle_uploads``: an observer key opens idle upload streams, on gRPC and on the bulk lane (item 3);
- ``poll_flood``: an enrolled key keeps 300 instruction long polls open (item 4);
- ``slowloris``: 300 idle TCP connections to the bulk lane, no TLS, no token (item 8).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.bulk import MAGIC
from fedtune.transport.client import Backoff, FederationClient
from fedtune.types import ClientReply

ROOT = Path(__file__).resolve().parents[2]
OBSERVER = "observer"  # fedtune.server.coordinator.OBSERVER (not imported: that pulls in the round loop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_overrides(port: int, out: Path, rounds: int, min_clients: int, round_timeout_s: float = 120.0,
                     ) -> list[str]:
    """Config overrides of a small real federation: tiny Llama, fp32, no evaluation, loopback."""
    return ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "adapter.r=4",
            "adapter.target_modules=[q_proj,v_proj]", "data.max_records=40", "eval.samples=0",
            "server.eval_data=false", f"federation.rounds={rounds}", f"federation.min_clients={min_clients}",
            f"federation.round_timeout_s={round_timeout_s}", "federation.wait_timeout_s=600", f"out={out}",
            f"server.address=127.0.0.1:{port}"]


def start_server_process(overrides: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli_federation", "server", *overrides], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def metrics(out: Path) -> list[dict[str, Any]]:
    """The rounds (>= 1) of a run folder's metrics.jsonl."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["round"] >= 1]


def rounds_per_minute(rows: list[dict[str, Any]]) -> float:
    """Rounds over the sum of their wall times, from round 2 on: round 1's time includes the wait for the
    first ``federation.min_clients`` nodes (which start after the attack has taken hold)."""
    timed = [r for r in rows if r["round"] >= 2] or rows
    total = sum(r["seconds"] for r in timed)
    return 60.0 * len(timed) / total if total > 0 else 0.0


@dataclass
class HonestNodes:
    """``n`` lightweight nodes (threads) answering every round; see the module docstring."""

    port: int
    n: int
    fingerprint: str
    bulk_min_bytes: int = 0
    prefix: str = "node"
    acked: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(f"{self.prefix}-{i:04d}",), daemon=True)
                        for i in range(self.n)]
        self._clients: list[FederationClient] = []
        self.stopped = threading.Event()

    def stop(self, timeout: float = 30.0) -> None:
        """Close every node's client (its calls end, its retries stop) and wait for the threads; what fails
        from now on is not counted as an error."""
        self.stopped.set()
        with self._lock:
            clients = list(self._clients)
        for fc in clients:
            fc.close()
        self.join(timeout)

    def start(self) -> HonestNodes:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))

    def _run(self, name: str) -> None:
        try:
            fc = FederationClient(f"127.0.0.1:{self.port}", name, fingerprint=self.fingerprint,
                                  backoff=Backoff(initial_s=0.5, max_s=2.0, max_attempts=120),
                                  bulk_min_bytes=self.bulk_min_bytes)
            with self._lock:
                self._clients.append(fc)
            with fc:
                while (not self.stopped.is_set() and (ins := fc.wait_for_instructions(poll_s=20)) is not None
                       and ins.phase != "stop"):
                    state = {k: torch.randn_like(v) * 0.01 for k, v in ins.state.items()}
                    if fc.submit(ClientReply(name, ins.round, state, num_examples=10)).accepted:
                        with self._lock:
                            self.acked[ins.round] = self.acked.get(ins.round, 0) + 1
        except Exception as e:  # noqa: BLE001 - reported by the caller
            if self.stopped.is_set():
                return
            with self._lock:
                self.errors.append(f"{name}: {type(e).__name__}: {e}")


class Attack:
    """A hostile peer kept up on its own threads until ``stop``; ``opened`` counts what it opened."""

    def __init__(self, port: int, fingerprint: str = OBSERVER, name: str = "mallory") -> None:
        self.port, self.fingerprint, self.name = port, fingerprint, name
        self.stopped = threading.Event()
        self.opened = 0
        self._threads: list[threading.Thread] = []
        self.channel: grpc.Channel | None = None
        self.token, self.bulk_port = "", 0

    def register(self) -> fpb_grpc.FederationStub:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        stub = fpb_grpc.FederationStub(self.channel)
        nonce = stub.Challenge(fpb.ChallengeRequest(node=self.name), timeout=30).nonce
        rep = stub.Register(fpb.RegisterRequest(node=self.name, nonce=nonce, config_fingerprint=self.fingerprint),
                            timeout=30)
        self.token, self.bulk_port = rep.session_token, rep.bulk_port
        return stub

    def spawn(self, fn: Callable[[], None], n: int = 1, pause_s: float = 1.0) -> None:
        """Run ``fn`` again and again on ``n`` threads, ``pause_s`` apart (the attack holds resources; it is
        not a request flood, which would measure this machine's CPU rather than the server's bounds)."""
        for _ in range(n):
            t = threading.Thread(target=self._loop, args=(fn, pause_s), daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self, fn: Callable[[], None], pause_s: float) -> None:
        while not self.stopped.is_set():
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 - an attacker shrugs and tries again
                pass
            self.stopped.wait(pause_s)

    def stop(self) -> None:
        self.stopped.set()
        for t in self._threads:
            t.join(timeout=10)
        if self.channel is not None:
            self.channel.close()

    @property
    def md(self) -> list[tuple[str, str]]:
        return [("x-fedtune-session", self.token)]


def idle_uploads(port: int, streams: int = 8) -> Attack:
    """Item 3: an observer key keeps ``streams`` idle gRPC uploads and as many idle bulk-lane uploads open."""
    a = Attack(port, name="spy")
    stub = a.register()

    def grpc_upload() -> None:
        done = threading.Event()

        def idle() -> Any:  # sends nothing until the call is over
            while not (done.is_set() or a.stopped.is_set()):
                done.wait(0.5)
            yield from ()
        a.opened += 1
        try:
            stub.SubmitUpdate(idle(), metadata=a.md, timeout=120)
        except grpc.RpcError:
            pass
        finally:
            done.set()

    def lane_upload() -> None:
        with socket.create_connection(("127.0.0.1", a.bulk_port), timeout=120) as s:
            a.opened += 1
            tok = a.token.encode()
            s.sendall(MAGIC + struct.pack("<H", len(tok)) + tok)
            s.recv(64)  # OK (then idle: nothing follows) or the server's refusal
            a.stopped.wait(120)

    a.spawn(grpc_upload, streams)
    if a.bulk_port:
        a.spawn(lane_upload, streams)
    return a


def poll_flood(port: int, polls: int = 300) -> Attack:
    """Item 4: an enrolled key keeps ``polls`` instruction long polls open."""
    a = Attack(port, name="poller")
    stub = a.register()

    def poll() -> None:
        a.opened += 1
        for _ in stub.GetInstructions(fpb.InstructionsRequest(wait_s=30), metadata=a.md, timeout=60):
            pass

    a.spawn(poll, polls)
    return a


def slowloris(port: int, bulk_port: int, connections: int = 300) -> Attack:
    """Item 8: ``connections`` idle TCP connections to the bulk lane (no TLS, no token)."""
    a = Attack(port)

    def hold() -> None:
        with socket.create_connection(("127.0.0.1", bulk_port), timeout=10) as s:
            a.opened += 1
            s.settimeout(130)
            s.recv(1)  # until the server closes it
    a.spawn(hold, connections)
    return a


ATTACKS = ("idle_uploads", "poll_flood", "slowloris")


def start_attack(kind: str, port: int, bulk_port: int) -> Attack:
    if kind == "idle_uploads":
        return idle_uploads(port)
    if kind == "poll_flood":
        return poll_flood(port)
    if kind == "slowloris":
        return slowloris(port, bulk_port)
    raise ValueError(f"unknown attack {kind!r}; valid: {', '.join(ATTACKS)}")


@dataclass
class FederationRun:
    """One real federation with ``nodes`` honest nodes for ``rounds`` rounds, under ``attack`` (or none)."""

    attack: str | None
    rounds: list[dict[str, Any]]
    acked: dict[int, int]
    node_errors: list[str]
    server_exit: int | None
    attack_opened: int = 0
    attack_cpu_s: float = 0.0
    """CPU time the attack process used (on the same machine as the server: it competes for the cores)."""

    @property
    def rounds_per_minute(self) -> float:
        return rounds_per_minute(self.rounds)


def spawn_attack(attack: str, port: int, bulk_port: int | None, status: Path, log: Path,
                 timeout_s: float) -> subprocess.Popen[bytes]:
    """``attack`` in its own process (its threads must not slow the honest nodes: one GIL), returned once it
    has written ``status`` to say it started."""
    atk = subprocess.Popen([sys.executable, "-m", "fedtune.transport.loadtest", attack, str(port),
                            str(bulk_port), str(status)], cwd=ROOT,
                           stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    end = time.monotonic() + timeout_s
    while not status.exists() and atk.poll() is None and time.monotonic() < end:
        time.sleep(0.2)  # the process imports torch before it attacks
    if not status.exists():
        raise RuntimeError(f"the {attack} attack did not start (see {log})")
    return atk


def run_federation(tmp: Path, nodes: int, rounds: int, attack: str | None = None, *, bulk: bool = True,
                   timeout_s: float = 600.0, round_timeout_s: float = 120.0) -> FederationRun:
    """Start a server process, the honest nodes and the attack (once the server answers); wait for the run.

    The attack starts before the honest nodes register, so that it holds what it can from the first round.
    """
    from fedtune.config import fingerprint, load_config  # the config, not the model: cheap

    port = free_port()
    out = tmp / f"run-{attack or 'none'}"
    overrides = server_overrides(port, out, rounds, nodes, round_timeout_s)
    fp = fingerprint(load_config(None, overrides))
    server = start_server_process(overrides, tmp / f"server-{attack or 'none'}.log")
    atk: subprocess.Popen[bytes] | None = None
    attack_cpu = 0.0
    status = tmp / f"attack-{attack}.count"
    honest = HonestNodes(port, nodes, fp, bulk_min_bytes=0 if bulk else 1 << 62)
    try:
        bulk_port = wait_until_serving(port, server, timeout_s)
        if attack is not None:  # its own process: its threads must not slow the honest ones (one GIL)
            atk = spawn_attack(attack, port, bulk_port, status, tmp / f"attack-{attack}.log", timeout_s)
            time.sleep(3.0)  # let it take hold
        honest.start()
        try:
            code = server.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        honest.join(30)
    finally:
        if atk is not None:
            attack_cpu = _cpu_seconds(atk.pid)
            atk.terminate()
            atk.wait(30)
        if server.poll() is None:
            server.kill()
            server.wait()
    opened = int(status.read_text() or 0) if status.exists() else 0
    return FederationRun(attack, metrics(out), dict(honest.acked), honest.errors, code, opened, attack_cpu)


class MetricsTail:
    """The rounds (>= 1) of a growing metrics.jsonl, read incrementally (only whole lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset, self._partial = 0, b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.rows
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.rows += [r for r in (json.loads(x) for x in lines if x.strip()) if r["round"] >= 1]
        return self.rows

    @property
    def last(self) -> int:
        """The last round written (0 before the first)."""
        return int(self.rows[-1]["round"]) if self.rows else 0


@dataclass
class Window:
    """``rounds`` consecutive honest rounds with ``attack`` on (or None: off), measured on one server."""

    attack: str | None
    rounds: list[dict[str, Any]]
    acked: int
    """Updates the honest nodes saw acknowledged in these rounds (filled in when the run ends)."""
    server_cpu_s: float
    """CPU time of the server process (user + system, ``/proc``) between the window's two marks."""
    attack_cpu_s: float
    rounds_between_marks: int
    """Rounds that ended between the marks (the window's rounds and the one under way at the first mark)."""
    wall_s: float
    attack_opened: int = 0
    """Calls and connections the attack had opened by the window's end (since its process started)."""

    @property
    def rounds_per_minute(self) -> float:
        return rounds_per_minute(self.rounds)

    @property
    def server_cpu_ms_per_round(self) -> float:
        return 1000.0 * self.server_cpu_s / max(1, self.rounds_between_marks)

    @property
    def failed(self) -> int:
        return sum(int(r["clients_failed"]) for r in self.rounds)

    @property
    def lost(self) -> int:
        return self.acked - sum(int(r["clients_ok"]) for r in self.rounds)


def neighbour_ratios(windows: list[Window]) -> list[float | None]:
    """For each attack window, its round rate over the mean rate of the attack-off windows next to it (the one
    before and the one after; one when the other is missing); None for the attack-off windows (and an attack
    window without a measured neighbour). A slow drift of the machine's load moves both sides alike."""
    out: list[float | None] = []
    for i, w in enumerate(windows):
        near = [windows[j].rounds_per_minute for j in (i - 1, i + 1)
                if 0 <= j < len(windows) and windows[j].attack is None]
        base = sum(near) / len(near) if near else 0.0
        out.append(w.rounds_per_minute / base if w.attack is not None and base > 0 else None)
    return out


def window_plan(attacks: list[str], repeats: int) -> list[str | None]:
    """Off, then ``repeats`` times each attack followed by off: every attack window has an attack-off window on
    each side (A B A C A D A B A ...)."""
    plan: list[str | None] = [None]
    for _ in range(repeats):
        for a in attacks:
            plan += [a, None]
    return plan


def run_interleaved(tmp: Path, nodes: int, attacks: list[str], repeats: int, window_rounds: int, *,
                    settle_s: float = 5.0, timeout_s: float = 600.0, round_timeout_s: float = 60.0,
                    progress: Callable[[Window], None] | None = None) -> list[Window]:
    """One server and one set of honest nodes; the attacks switched on and off in turn (``window_plan``), each
    window ``window_rounds`` rounds long. An attack runs in a process of its own, started before its window
    (its imports and its taking hold are not measured) and killed after it (the server sees its connections
    close); each window starts ``settle_s`` after the switch, at the next round boundary: the round under way
    at that mark is not counted. Returns the windows in order.

    Raises:
        RuntimeError: the server stopped, an attack did not start, or a window did not finish in ``timeout_s``.
    """
    from fedtune.config import fingerprint, load_config  # the config, not the model: cheap

    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; valid: {', '.join(ATTACKS)}")
    port = free_port()
    out = tmp / "run-interleaved"
    overrides = server_overrides(port, out, 1_000_000, nodes, round_timeout_s)
    fp = fingerprint(load_config(None, overrides))
    server = start_server_process(overrides, tmp / "server-interleaved.log")
    honest = HonestNodes(port, nodes, fp)
    tail = MetricsTail(out / "metrics.jsonl")
    atk: subprocess.Popen[bytes] | None = None
    windows: list[Window] = []

    def wait_for_round(n: int) -> None:
        end = time.monotonic() + timeout_s
        tail.poll()
        while tail.last < n:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} (see {tmp}/server-interleaved.log)")
            if time.monotonic() > end:
                raise RuntimeError(f"round {n} did not end within {timeout_s:.0f} s")
            time.sleep(0.05)
            tail.poll()

    try:
        bulk_port = wait_until_serving(port, server, timeout_s)
        honest.start()
        wait_for_round(2)  # the nodes are in, round 1's wait for them is over
        for i, attack in enumerate(window_plan(attacks, repeats)):
            if atk is not None:
                atk.kill()
                atk.wait(30)
                atk = None
            status = tmp / f"attack-{i}.count"
            if attack is not None:
                atk = spawn_attack(attack, port, bulk_port, status, tmp / f"attack-{i}.log", timeout_s)
            time.sleep(settle_s)
            tail.poll()
            first = tail.last
            cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
            acpu0 = _cpu_seconds(atk.pid) if atk is not None else 0.0
            wait_for_round(first + 1 + window_rounds)
            cpu1, t1 = _cpu_seconds(server.pid), time.monotonic()
            acpu1 = _cpu_seconds(atk.pid) if atk is not None else 0.0
            last = tail.last
            rows = [r for r in tail.rows if first + 1 < r["round"] <= first + 1 + window_rounds]
            opened = int(status.read_text() or 0) if attack is not None else 0
            w = Window(attack, rows, 0, cpu1 - cpu0, acpu1 - acpu0, last - first, t1 - t0, opened)
            windows.append(w)
            if progress is not None:
                progress(w)
    finally:
        if atk is not None:
            atk.kill()
            atk.wait(30)
        server.kill()
        server.wait()
        honest.stop()
    for w in windows:  # counted once every acknowledgement is in
        w.acked = sum(honest.acked.get(r["round"], 0) for r in w.rounds)
    return windows


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_serving(port: int, server: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for the server process to answer a registration; returns its bulk-lane port."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"the server process exited with {server.returncode} before serving")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = fpb_grpc.FederationStub(ch)
                nonce = stub.Challenge(fpb.ChallengeRequest(node="probe"), timeout=2).nonce
                rep = stub.Register(fpb.RegisterRequest(node="probe", nonce=nonce, config_fingerprint=OBSERVER),
                                    timeout=2)
                return int(rep.bulk_port)
        except grpc.RpcError:
            time.sleep(0.5)
    raise RuntimeError(f"the server on port {port} did not answer within {timeout_s:.0f} s")


def _attack_main(kind: str, port: str, bulk_port: str, status: str) -> None:
    """``python -m fedtune.transport.loadtest KIND[,KIND...] PORT BULK_PORT STATUS_FILE``: run the attacks until SIGTERM,
    writing how many calls or connections it opened to STATUS_FILE every second."""
    import signal

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    attacks = [start_attack(k, int(port), int(bulk_port)) for k in kind.split(",")]  # several at once
    while True:
        Path(status).write_text(str(sum(a.opened for a in attacks)))
        if done.wait(1.0):
            break
    for a in attacks:
        a.stopped.set()
    os._exit(0)  # threads blocked in calls: do not wait for them


if __name__ == "__main__":
    _attack_main(*sys.argv[1:5])
