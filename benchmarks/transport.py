"""Transport benchmark: upload throughput over loopback, and server memory under 32 concurrent uploads.

    .venv/bin/python benchmarks/transport.py [--quick] [--sizes 1024 --repeats 5 --only throughput]

1. Upload of a 256 MiB and a 1 GiB update (fp32, 16 MiB tensors) through ``FederationClient.submit``, from
   the call to the server's ack: over the bulk lane (what ``submit`` uses for large updates) and over the
   gRPC stream alone (``bulk=False``), each in plaintext and with TLS, next to a raw TCP socket copy of the
   same bytes in the same chunks (the anchor: no framing, no hash; the receiver writes each tensor into a
   fresh buffer, as the server does) and, for scale, the same copy with the transport's digest (xxh3-128)
   of every tensor on both sides (the least work an integrity-checked transfer does). The server runs in
   its own process and decodes and validates every tensor as it arrives (declared sizes, digest,
   finiteness), then drops it: these rows measure the transport; what aggregation costs on top is
   ``benchmarks/aggregate.py``'s. Paths are interleaved and the best of ``--repeats`` counts: other load
   on the machine hits them alike. Client and server share the machine's cores, so the CPU seconds per GiB
   on each side (the fewest of the repeats) are shown too: unlike the wall time they hardly depend on what
   else runs.
2. 32 clients upload 64 MiB each (4 MiB tensors) at the same time to a fresh server process that keeps
   a streaming sum; the server's peak RSS (VmHWM) is compared with the 2 GiB that buffering every update
   would need. The server admits 8 uploads at a time (on either path), so waiting uploads stay on the
   clients: gRPC's flow-control window of each stream is fixed at 4 MiB, and the bulk lane reads nothing
   of an upload before admitting it.

Prints a table and writes benchmarks/results/transport.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import RESULTS
from fedtune.transport import (
    DEFAULT_CHUNK_SIZE,
    Backoff,
    DecodedTensor,
    FederationClient,
    RoundStatus,
    UpdateHeader,
    create_keys,
    start_server,
)
from fedtune.transport.codec import DIGEST_ALG, DIGESTS
from fedtune.transport.server import STREAM_WINDOW_BYTES
from fedtune.types import ClientReply

MiB = 1 << 20
TENSOR_MIB = 16
CHUNK_SIZE = DEFAULT_CHUNK_SIZE


class StreamingSum:
    """Coordinator that adds every incoming tensor into a running sum and drops it (``sum=False``: drops
    it at once, after the transport decoded and validated it)."""

    def __init__(self, sum: bool = True) -> None:
        self.add = sum
        self.lock = threading.Lock()
        self.sum: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.base_rss_mb = _rss_mb()

    def register(self, node: str, fingerprint: str, base_updates: int = 0) -> None:
        pass

    def next_instructions(self, node: str, timeout: float) -> None:
        time.sleep(min(timeout, 0.1))

    def upload_window(self, node: str) -> float:
        return 3600.0

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        for d in tensors:
            if not self.add:
                continue
            with self.lock:
                acc = self.sum.get(d.name)
                if acc is None:
                    self.sum[d.name] = d.tensor.clone()
                else:
                    acc.add_(d.tensor)
            del d  # drop the tensor before the next one streams in
        with self.lock:
            self.updates += 1
        return "summed"

    def status(self) -> RoundStatus:
        peak = _hwm_mb()
        return RoundStatus(0, "bench", {"peak_rss_mb": f"{peak:.1f}", "base_rss_mb": f"{self.base_rss_mb:.1f}",
                                        "updates": str(self.updates)})


def _hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would include the parent's RSS at fork time)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def serve(tls_dir: str | None, window_bytes: int, add: bool) -> None:
    """Child process: serve until stdin closes."""
    torch.set_num_threads(1)  # client and server share the machine: idle OpenMP workers spin on the other's core
    kw: dict = {"stream_window_bytes": window_bytes}
    if tls_dir:
        kw |= {"cert_file": f"{tls_dir}/server.pem", "key_file": f"{tls_dir}/server.key",
               "allowlist_file": f"{tls_dir}/allowlist.txt"}
    server = start_server(StreamingSum(add), "127.0.0.1:0", max_workers=48, **kw)
    print(f"PORT {server.port}", flush=True)
    sys.stdin.read()
    server.stop(0)


def raw_sink() -> None:
    """Child process: per connection, receive (tensor count, tensor bytes, chunk bytes, hash?) and then the
    tensors, each into a new buffer, ``chunk`` bytes per ``recv_into``; hash each one if asked; answer a byte."""
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {lsock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        with conn:
            count, size, chunk, hashed = struct.unpack("<4q", conn.recv(32, socket.MSG_WAITALL))
            if count == 0:
                return
            for _ in range(count):
                buf: Any = np.empty(size, np.uint8)
                view, got = memoryview(buf), 0
                while got < size:
                    got += conn.recv_into(view[got:], min(size - got, chunk))
                if hashed:
                    _digest(view)
            conn.sendall(b"k")


class Child:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().split()[1])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _digest(data: Any) -> bytes:
    return DIGESTS[DIGEST_ALG][1](data).digest()


def make_update(total_mib: int, tensor_mib: int = TENSOR_MIB) -> dict[str, torch.Tensor]:
    n = tensor_mib * MiB // 4
    return {f"layers.{i}.lora_A.weight": torch.randn(n) for i in range(total_mib // tensor_mib)}


def raw_copy(port: int, state: dict[str, torch.Tensor], hashed: bool = False) -> float:
    """The tensors' bytes over one TCP connection in ``CHUNK_SIZE`` sends, the transport's digest (xxh3-128) per tensor if ``hashed``."""
    arrays: list[Any] = [t.numpy() for t in state.values()]
    payload = [memoryview(a).cast("B") for a in arrays]
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(struct.pack("<4q", len(payload), len(payload[0]), CHUNK_SIZE, hashed))
        for p in payload:
            if hashed:
                _digest(p)
            for start in range(0, len(p), CHUNK_SIZE):
                s.sendall(p[start:start + CHUNK_SIZE])
        assert s.recv(1) == b"k"
    return time.perf_counter() - t0


def upload(port: int, state: dict[str, torch.Tensor], node: str, tls_dir: str | None, bulk: bool = True) -> float:
    """``FederationClient.submit`` of ``state``: over the bulk lane, or the gRPC stream alone."""
    kw: dict = {"backoff": Backoff(initial_s=0.05), "heartbeat": False, "chunk_size": CHUNK_SIZE, "bulk": bulk}
    if tls_dir:
        kw |= {"ca_file": f"{tls_dir}/ca.pem", "key": f"{tls_dir}/nodes/{node}.key"}
    with FederationClient(f"127.0.0.1:{port}", node, **kw) as fc:
        t0 = time.perf_counter()
        ack = fc.submit(ClientReply(node, 0, state, num_examples=1))
        dt = time.perf_counter() - t0
    assert ack.accepted, ack
    return dt


def throughput(sizes: list[int], tls_dir: str, repeats: int, window: str) -> list[dict]:
    rows = []
    sink = Child("--raw-sink")
    plain = Child("--serve", "--window-mib", window, "--no-sum")
    tls = Child("--serve", "--window-mib", window, "--no-sum", "--tls-dir", tls_dir)
    paths = {"raw TCP": (sink, lambda st: raw_copy(sink.port, st)),
             "raw TCP + digest": (sink, lambda st: raw_copy(sink.port, st, hashed=True)),
             "fedtune (bulk lane)": (plain, lambda st: upload(plain.port, st, "node-0", None)),
             "fedtune + TLS (bulk lane)": (tls, lambda st: upload(tls.port, st, "node-0", tls_dir)),
             "gRPC stream only": (plain, lambda st: upload(plain.port, st, "node-0", None, bulk=False)),
             "gRPC stream only + TLS": (tls, lambda st: upload(tls.port, st, "node-0", tls_dir, bulk=False))}
    try:
        for mib in sizes:
            state = make_update(mib)
            runs: dict[str, list[tuple[float, float, float]]] = {path: [] for path in paths}
            for _ in range(repeats):  # interleaved, best of each: other load on the machine hits all paths alike
                for path, (receiver, send) in paths.items():
                    mine, theirs = time.process_time(), _cpu_seconds(receiver.proc.pid)
                    secs = send(state)
                    runs[path].append((secs, time.process_time() - mine, _cpu_seconds(receiver.proc.pid) - theirs))
            best = {path: min(r[0] for r in times) for path, times in runs.items()}
            for path, secs in best.items():
                gib = mib / 1024
                rows.append({"size_mib": mib, "path": path, "seconds": secs, "mib_per_s": mib / secs,
                             "vs_raw": best["raw TCP"] / secs, "vs_raw_digest": best["raw TCP + digest"] / secs,
                             "sender_cpu_s_per_gib": min(r[1] for r in runs[path]) / gib,
                             "receiver_cpu_s_per_gib": min(r[2] for r in runs[path]) / gib,
                             "all_seconds": [r[0] for r in runs[path]]})
            del state
    finally:
        with socket.create_connection(("127.0.0.1", sink.port)) as s:
            s.sendall(bytes(32))
        for c in (sink, plain, tls):
            c.close()
    return rows


def concurrent_memory(n_clients: int, mib_each: int, window: str) -> dict:
    server = Child("--serve", "--window-mib", window)
    state = make_update(mib_each, tensor_mib=4)  # shared read-only by every client thread
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            upload(server.port, state, f"node-{i}", None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    fc = FederationClient(f"127.0.0.1:{server.port}", "probe", heartbeat=False).connect()
    st, _ = fc.status()
    fc.close()
    server.close()
    if errors:
        raise errors[0]
    peak, base = float(st.detail["peak_rss_mb"]), float(st.detail["base_rss_mb"])
    return {"clients": n_clients, "mib_each": mib_each, "seconds": secs, "updates": int(st.detail["updates"]),
            "server_peak_rss_mib": peak, "server_base_rss_mib": base, "buffer_all_mib": n_clients * mib_each,
            "peak_over_base_mib": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 and 256 MiB uploads once each, 8 clients x 16 MiB")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    ap.add_argument("--no-sum", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_SIZE / MiB, help="chunk size of uploads")
    ap.add_argument("--window-mib", default=str(STREAM_WINDOW_BYTES / MiB),
                    help="the server's HTTP/2 flow-control window per stream")
    ap.add_argument("--sizes", help="upload sizes in MiB, comma-separated (default 256,1024; --quick 64,256)")
    ap.add_argument("--repeats", type=int, help="uploads per path and size, best counts (default 3; --quick 1)")
    ap.add_argument("--only", choices=["throughput", "memory"], help="run one of the two parts")
    ap.add_argument("--out", help="JSON path (default: results/transport.json, transport_quick.json with --quick)")
    args = ap.parse_args()
    if args.serve:
        return serve(args.tls_dir, int(float(args.window_mib) * MiB), add=not args.no_sum)
    if args.raw_sink:
        return raw_sink()
    torch.set_num_threads(1)
    global CHUNK_SIZE
    CHUNK_SIZE = int(args.chunk_mib * MiB)
    sizes, (n, each), repeats = ([64, 256], (8, 16), 1) if args.quick else ([256, 1024], (32, 64), 3)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else sizes
    repeats = args.repeats or repeats
    rows, mem = [], None
    if args.only != "memory":
        with tempfile.TemporaryDirectory() as keys:
            create_keys(keys, ["node-0"], ["localhost", "127.0.0.1"])
            rows = throughput(sizes, keys, repeats, args.window_mib)
    if args.only != "throughput":
        mem = concurrent_memory(n, each, args.window_mib)
    report(rows, mem, args)


def report(rows: list[dict], mem: dict | None, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Upload over loopback (client submit -> server ack; the server decodes and checks every tensor), "
                        f"{args.chunk_mib:g} MiB chunks, {float(args.window_mib):g} MiB stream window")
    for col in ("size", "path", "seconds", "MiB/s", "vs raw TCP", "vs raw TCP + digest", "CPU s/GiB sender",
                "CPU s/GiB receiver"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['size_mib']} MiB", r["path"], f"{r['seconds']:.2f}", f"{r['mib_per_s']:.0f}",
                      f"{100 * r['vs_raw']:.0f}%", f"{100 * r['vs_raw_digest']:.0f}%",
                      f"{r['sender_cpu_s_per_gib']:.2f}", f"{r['receiver_cpu_s_per_gib']:.2f}")
    console = Console(width=max(Console().width, 120))
    if rows:
        console.print(table)
    if mem:
        mt = Table(title=f"{mem['clients']} clients x {mem['mib_each']} MiB at once, streaming sum on the server")
        for col in ("seconds", "server peak RSS", "of which before uploads", "buffering all would need"):
            mt.add_column(col, justify="right")
        mt.add_row(f"{mem['seconds']:.1f}", f"{mem['server_peak_rss_mib']:.0f} MiB",
                   f"{mem['server_base_rss_mib']:.0f} MiB", f"{mem['buffer_all_mib']} MiB")
        console.print(mt)
    out = Path(args.out) if args.out else RESULTS / ("transport_quick.json" if args.quick else "transport.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "chunk_mib": args.chunk_mib, "window_mib": float(args.window_mib),
                               "load_average": os.getloadavg(),
                               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                               "throughput": rows, "concurrent": mem}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
