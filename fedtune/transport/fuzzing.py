"""A structure-aware fuzzer of the federation protocol, run against a live server (issue 16).

It starts from valid messages of every RPC and of the bulk lane, built as a node builds them, and mutates
them: one field of a protobuf message (at any depth) set to a hostile value (markup, control characters,
huge strings, boundary integers, NaN, odd enum values, long repeated fields), the serialized bytes flipped,
cut or stretched, a stream's frames dropped, repeated or swapped, a session token replaced. The fuzzer
registers as a node (``fuzz-0``) with the federation's fingerprint, so it is sampled like any node and its
updates reach the coordinator, not just the authentication checks. Every call has a deadline.

``Fuzzer.run(n)`` returns what came back, counted by gRPC status (``DEADLINE_EXCEEDED`` counts as a hang,
``INTERNAL`` as a server bug, ``UNAVAILABLE`` as a possible crash). ``benchmarks/fuzz.py`` and
``tests/integration/test_fuzz.py`` drive it next to honest nodes against a real ``fedtune server``.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc
import torch
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message

from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport.bulk import DATA, END, HEADER, MAGIC, META
from fedtune.transport.client import Backoff, FederationClient
from fedtune.transport.codec import encode_state
from fedtune.transport.security import SESSION_METADATA_KEY, sign_challenge
from fedtune.transport.server import SERVICE

STRINGS = ["", "[/x]", "[bold red]x[/]", "\x1b[2J\x1b]0;t\x07", "a\nround 9/9 FORGED", "\u202e\u0000", "é" * 40,
           "x" * 65, "x" * (1 << 16), "%s%n{0}", "../../etc/passwd", "a#b", "observer", "fuzz-0", "client-0",
           "train", "stop", "float32", "int8", "sparse_coo", "fixed_u32", "sha256", "state", "mask"]
INTS = [0, 1, -1, 2, 255, 1 << 16, 1 << 24, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324, 1e19]
BYTE_SIZES = [0, 1, 16, 31, 32, 33, 64, 65, 4096, 1 << 20]
STATE = {"fuzz.lora_A.weight": torch.randn(4, 8), "fuzz.lora_B.weight": torch.randn(8, 4)}


@dataclass
class FuzzReport:
    """What the server answered: ``outcomes[rpc][status]`` counts, and examples of the worrying ones."""

    sent: int = 0
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def count(self, rpc: str, status: str, what: str = "") -> None:
        self.sent += 1
        self.outcomes.setdefault(rpc, Counter())[status] += 1
        if status in ("INTERNAL", "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN") and len(self.examples) < 20:
            self.examples.append(f"{rpc}: {status}: {what[:300]}")

    def total(self, status: str) -> int:
        return sum(c[status] for c in self.outcomes.values())


def _value(fd: Any, rng: random.Random) -> Any:
    if fd.type == FD.TYPE_STRING:
        return rng.choice(STRINGS)
    if fd.type == FD.TYPE_BYTES:
        return rng.randbytes(rng.choice(BYTE_SIZES))
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice(FLOATS)
    if fd.type == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if fd.type == FD.TYPE_ENUM:
        return rng.randint(-1, 8)
    return rng.choice(INTS)


def mutate_fields(msg: Message, rng: random.Random, depth: int = 0) -> None:
    """Set one field of ``msg`` (or of a message inside it) to a hostile value, in place."""
    fields = list(msg.DESCRIPTOR.fields)
    if not fields:
        return
    fd = rng.choice(fields)
    try:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            mp = getattr(msg, fd.name)
            key, val = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            for _ in range(rng.choice([1, 1, 2, 40])):
                if val.message_type is None:
                    mp[_value(key, rng)] = _value(val, rng)
        elif fd.message_type is not None:
            sub = getattr(msg, fd.name).add() if fd.label == FD.LABEL_REPEATED else getattr(msg, fd.name)
            if depth < 3:
                mutate_fields(sub, rng, depth + 1)
            else:
                sub.SetInParent()
        elif fd.label == FD.LABEL_REPEATED:
            rep = getattr(msg, fd.name)
            if rng.random() < 0.3:
                del rep[:]
            for _ in range(rng.choice([1, 3, 9, 64])):
                rep.append(_value(fd, rng))
        else:
            setattr(msg, fd.name, _value(fd, rng))
    except (ValueError, TypeError):  # a value outside the field's range: the wire would never carry it
        msg.ClearField(fd.name)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One byte-level mutation: flipped bits, a cut, a repeated or inserted slice."""
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:
        b = b[:rng.randint(0, len(b))]
    elif op == 2 and b:
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randint(1, 64)] * rng.randint(1, 8)
    elif op == 3:
        b[rng.randint(0, len(b)):0] = rng.randbytes(rng.choice([1, 5, 100]))
    else:
        b += bytes([0xFF] * rng.randint(1, 10))
    return bytes(b)


class Fuzzer:
    """Mutated messages against the server at ``address`` (plaintext on loopback), registered as node
    ``name`` with config ``fingerprint`` and, when the server has an allow-list, the node's ``key``.
    Use as a context manager."""

    def __init__(self, address: str, fingerprint: str, *, key: Path | None = None, seed: int = 0,
                 name: str = "fuzz-0", deadline_s: float = 10.0) -> None:
        self.address, self.rng, self.deadline_s = address, random.Random(seed), deadline_s
        self.node = FederationClient(address, name, fingerprint=fingerprint, key=key)
        self.name = name
        self.report = FuzzReport()
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> Self:
        self.node.connect()
        self._channel = grpc.insecure_channel(self.address)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
        self.node.close()

    # -- valid messages, then mutated ----------------------------------------------------------------
    def _md(self) -> list[tuple[str, str]]:
        token = self.node._token or ""
        if self.rng.random() < 0.1:
            token = self.rng.choice(["", "[/x]", "x" * 129, "x" * 4000, "%s", token[::-1], token[:-1]])
        return [(SESSION_METADATA_KEY, token)]

    def _mutated(self, msg: Message) -> bytes:
        if self.rng.random() < 0.7:
            for _ in range(self.rng.choice([1, 1, 2, 3])):
                mutate_fields(msg, self.rng)
        data = msg.SerializeToString()
        return mutate_bytes(data, self.rng) if self.rng.random() < 0.4 else data

    def _update_frames(self) -> list[bytes]:
        state, header = self._valid_update()
        chunks = [fpb.UpdateChunk(header=header)]
        chunks += [fpb.UpdateChunk(tensor=c) for c in encode_state(state, chunk_size=self.rng.choice([16, 64, 4096]))]
        target = self.rng.randrange(len(chunks))
        inner = chunks[target].header if chunks[target].HasField("header") else chunks[target].tensor
        frames = [c.SerializeToString() for c in chunks]
        if self.rng.random() < 0.6:
            mutate_fields(inner, self.rng)
            frames[target] = chunks[target].SerializeToString()
        op = self.rng.randrange(5)
        if op == 0:
            frames[target] = mutate_bytes(frames[target], self.rng)
        elif op == 1 and len(frames) > 1:
            del frames[self.rng.randrange(len(frames))]
        elif op == 2:
            frames.insert(self.rng.randrange(len(frames) + 1), self.rng.choice(frames))
        elif op == 3 and len(frames) > 2:
            i, j = self.rng.sample(range(len(frames)), 2)
            frames[i], frames[j] = frames[j], frames[i]
        return frames

    def _valid_update(self) -> tuple[dict[str, torch.Tensor], fpb.UpdateHeader]:
        """What an honest answer to this node's open instructions would hold (made-up tensors without any)."""
        ins = self.node.poll(wait_s=0.0)
        rnd = ins.round if ins is not None else self.node.heartbeat().round
        state = dict(ins.state) if ins is not None and ins.state else STATE
        phase = ins.phase if ins is not None else "train"
        return state, fpb.UpdateHeader(round=rnd, phase=phase, node=self.name, num_examples=4)

    # -- the calls -----------------------------------------------------------------------------------
    def _unary(self, rpc: str, payload: bytes, metadata: list[tuple[str, str]] | None = None) -> None:
        assert self._channel is not None
        call: Callable[..., Any] = self._channel.unary_unary(f"/{SERVICE}/{rpc}")
        try:
            call(payload, timeout=self.deadline_s, metadata=metadata)
            self.report.count(rpc, "OK")
        except grpc.RpcError as e:
            self.report.count(rpc, e.code().name, e.details() or "")  # type: ignore[attr-defined]

    def challenge(self) -> None:
        self._unary("Challenge", self._mutated(fpb.ChallengeRequest(node=self.name)))

    def register(self) -> None:
        nonce = fpb.ChallengeReply.FromString(self._channel.unary_unary(f"/{SERVICE}/Challenge")(  # type: ignore[union-attr]
            fpb.ChallengeRequest(node=self.name).SerializeToString(), timeout=self.deadline_s)).nonce
        req = fpb.RegisterRequest(node=self.name, nonce=nonce, config_fingerprint=self.node.fingerprint)
        if self.node.key is not None:
            req.signature = sign_challenge(self.node.key, nonce, self.name)
        self._unary("Register", self._mutated(req))
        self.node.register()  # a mutated registration may have opened a session of its own: take ours back

    def small_call(self) -> None:
        rpc, msg = self.rng.choice([("Heartbeat", fpb.HeartbeatRequest(round=1, phase="train")),
                                    ("Status", fpb.StatusRequest())])
        self._unary(rpc, self._mutated(msg), self._md())

    def get_instructions(self) -> None:
        assert self._channel is not None
        call = self._channel.unary_stream(f"/{SERVICE}/GetInstructions")
        try:
            for _ in call(self._mutated(fpb.InstructionsRequest(wait_s=0.0)), timeout=2.0,
                          metadata=self._md()):
                pass
            self.report.count("GetInstructions", "OK")
        except grpc.RpcError as e:
            code = e.code().name  # type: ignore[attr-defined]
            # a long poll may rightly outlast our short deadline (the server waits up to its max_wait_s)
            self.report.count("GetInstructions", "waiting" if code == "DEADLINE_EXCEEDED" else code,
                              e.details() or "")  # type: ignore[attr-defined]

    def submit(self) -> None:
        assert self._channel is not None
        frames = self._update_frames()
        call = self._channel.stream_unary(f"/{SERVICE}/SubmitUpdate")
        try:
            call(iter(frames), timeout=self.deadline_s, metadata=self._md())
            self.report.count("SubmitUpdate", "OK")
        except grpc.RpcError as e:
            self.report.count("SubmitUpdate", e.code().name, e.details() or "")  # type: ignore[attr-defined]

    def bulk(self) -> None:
        port = self.node._bulk_port
        if not port:
            return
        state, header = self._valid_update()
        token = (self.node._token or "").encode()
        records = [struct.pack("<BI", HEADER, header.ByteSize()) + header.SerializeToString()]
        for c in encode_state(state, chunk_size=64):
            if c.HasField("meta"):
                meta = c.meta
                if self.rng.random() < 0.3:
                    mutate_fields(meta, self.rng)
                records.append(struct.pack("<BI", META, meta.ByteSize()) + meta.SerializeToString())
            records.append(struct.pack("<BI", DATA, len(c.data)) + c.data)
        records.append(struct.pack("<BI", END, 0))
        data = MAGIC + struct.pack("<H", len(token)) + token + b"".join(records)
        data = mutate_bytes(data, self.rng) if self.rng.random() < 0.7 else data
        host = self.address.rsplit(":", 1)[0]
        try:
            with socket.create_connection((host, port), timeout=self.deadline_s) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = s.recv(1 << 16)
            self.report.count("bulk", "answered" if got else "closed")
        except TimeoutError:
            self.report.count("bulk", "DEADLINE_EXCEEDED", "no answer from the bulk lane")
        except OSError as e:
            self.report.count("bulk", "reset", str(e))

    def run(self, n: int) -> FuzzReport:
        """Send ``n`` mutated messages, spread over every RPC and the bulk lane."""
        actions = [self.challenge, self.register, self.small_call, self.small_call, self.get_instructions,
                   self.submit, self.submit, self.submit, self.bulk]
        for _ in range(n):
            self.rng.choice(actions)()
        return self.report


def _rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident bytes of process ``pid`` (``/proc``)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) * 1024
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


def _rounds(run: Path) -> int:
    """Rounds recorded in ``run/metrics.jsonl`` (round 0, the start, not counted)."""
    import json

    path, n = run / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            n += json.loads(line).get("round", 0) >= 1
        except ValueError:  # a line being written
            pass
    return n


def fuzz_federation(workdir: Path, scenario: Path, *, messages: int, seed: int = 0, honest: int = 2,
                    baseline_s: float = 20.0, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """A real ``fedtune server`` (allow-list, plaintext on loopback, config ``scenario``) with ``honest``
    nodes answering every round, ``baseline_s`` seconds alone, then ``messages`` mutated messages from an
    enrolled fuzzing node. Returns the counts, the server's memory and the honest rounds per minute
    without and with the fuzzer; the server is stopped at the end.
    """
    import subprocess
    import sys
    import threading
    import time

    from fedtune.config import fingerprint, load_config
    from fedtune.transport.errors import MessageRejected, TransportError
    from fedtune.transport.keys import create_keys
    from fedtune.types import ClientReply

    names = [f"client-{i}" for i in range(honest)]
    keys = create_keys(workdir / "keys", [*names, "fuzz-0"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    common = [str(scenario), "eval.samples=0", "server.eval_data=false", "federation.rounds=100000",
              f"federation.min_clients={honest}", "federation.round_timeout_s=20", "federation.wait_timeout_s=600",
              "federation.heartbeat_s=1", "federation.silence_s=30", *overrides]
    fp = fingerprint(load_config(scenario, common[1:]))
    log = (workdir / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "fedtune.cli_federation", "server", *common,
                               f"out={workdir / 'run'}", f"server.address={address}", f"server.keys_dir={keys}",
                               "server.insecure=true"], stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    honest_errors: list[str] = []

    def node(name: str) -> None:
        try:
            with FederationClient(address, name, fingerprint=fp, key=keys / "nodes" / f"{name}.key",
                                  backoff=Backoff(max_s=1.0, max_attempts=600)) as fc:
                while not stop.is_set():
                    ins = fc.poll(wait_s=1.0)
                    if ins is not None and ins.phase != "stop":
                        try:
                            fc.submit(ClientReply(name, ins.round, dict(ins.state), 5), phase=ins.phase)
                        except MessageRejected as e:  # e.g. past the deadline: the next round comes
                            honest_errors.append(f"{name}: round {ins.round}: {e.reason}")
        except TransportError as e:
            if not stop.is_set():
                honest_errors.append(f"{name}: {e.reason}")

    threads = [threading.Thread(target=node, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    out: dict[str, Any] = {"messages": messages, "seed": seed, "honest_nodes": honest}
    try:
        end = time.monotonic() + 600
        while _rounds(workdir / "run") < 1:  # the server is up and the honest nodes are in
            if server.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the server did not start a round (exit code {server.poll()})")
            time.sleep(0.5)
        r0, t0 = _rounds(workdir / "run"), time.monotonic()
        time.sleep(baseline_s)
        r1, t1 = _rounds(workdir / "run"), time.monotonic()
        rss0, _ = _rss(server.pid)
        with Fuzzer(address, fp, key=keys / "nodes" / "fuzz-0.key", seed=seed) as fz:
            report = fz.run(messages)
        r2, t2 = _rounds(workdir / "run"), time.monotonic()
        alive = server.poll() is None
        rss1, peak = _rss(server.pid) if alive else (0, 0)
        out.update(
            server_alive=alive, internal=report.total("INTERNAL"), unknown=report.total("UNKNOWN"),
            hangs=report.total("DEADLINE_EXCEEDED"), unavailable=report.total("UNAVAILABLE"),
            outcomes={k: dict(v) for k, v in report.outcomes.items()}, examples=report.examples,
            rss_before_mib=rss0 / 2**20, rss_after_mib=rss1 / 2**20, rss_peak_mib=peak / 2**20,
            rounds_baseline=r1 - r0, rounds_fuzzing=r2 - r1, fuzz_seconds=t2 - t1,
            rounds_per_min_baseline=60 * (r1 - r0) / (t1 - t0), rounds_per_min_fuzzing=60 * (r2 - r1) / (t2 - t1),
            honest_errors=honest_errors)
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        for t in threads:
            t.join(10)
        log.close()
    return out
