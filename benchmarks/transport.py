"""Transport benchmark: upload throughput over loopback, and server memory under 32 concurrent uploads.

    .venv/bin/python benchmarks/transport.py [--quick]

1. Upload of a 256 MiB and a 1 GiB update (fp32, 16 MiB tensors) through ``FederationClient.submit``:
   plaintext gRPC and TLS, next to a raw TCP socket copy of the same bytes. The server runs in its own
   process and sums the update tensor by tensor as it arrives (decode, SHA-256 and finiteness checks
   included), so the figures are end to end.
2. 32 clients upload 64 MiB each (4 MiB tensors) at the same time to a fresh server process that keeps
   a streaming sum; the server's peak RSS (VmHWM) is compared with the 2 GiB that buffering every update
   would need. The server admits 8 uploads at a time and fixes each stream's flow-control window at
   4 MiB, so waiting uploads stay on the clients.

Prints a table and writes benchmarks/results/transport.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
from fedtune.types import ClientReply

MiB = 1 << 20
TENSOR_MIB = 16
CHUNK_SIZE = DEFAULT_CHUNK_SIZE


class StreamingSum:
    """Coordinator that adds every incoming tensor into a running sum and drops it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sum: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.base_rss_mb = _rss_mb()

    def register(self, node: str, fingerprint: str, base_updates: int = 0) -> None:
        pass

    def next_instructions(self, node: str, timeout: float) -> None:
        time.sleep(min(timeout, 0.1))

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        for d in tensors:
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


def serve(tls_dir: str | None) -> None:
    """Child process: serve until stdin closes."""
    kw = {}
    if tls_dir:
        kw = {"cert_file": f"{tls_dir}/server.pem", "key_file": f"{tls_dir}/server.key",
              "allowlist_file": f"{tls_dir}/allowlist.txt"}
    server = start_server(StreamingSum(), "127.0.0.1:0", max_workers=48, **kw)
    print(f"PORT {server.port}", flush=True)
    sys.stdin.read()
    server.stop(0)


def raw_sink() -> None:
    """Child process: receive length-prefixed payloads into a buffer, answer one byte each."""
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {lsock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        with conn:
            n = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "little")
            if n == 0:
                return
            buf, got = bytearray(n), 0
            view = memoryview(buf)
            while got < n:
                got += conn.recv_into(view[got:], min(n - got, 4 * MiB))
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


def make_update(total_mib: int, tensor_mib: int = TENSOR_MIB) -> dict[str, torch.Tensor]:
    n = tensor_mib * MiB // 4
    return {f"layers.{i}.lora_A.weight": torch.randn(n) for i in range(total_mib // tensor_mib)}


def raw_copy(port: int, state: dict[str, torch.Tensor]) -> float:
    payload = [memoryview(t.numpy()).cast("B") for t in state.values()]
    total = sum(len(p) for p in payload)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(total.to_bytes(8, "little"))
        for p in payload:
            s.sendall(p)
        assert s.recv(1) == b"k"
    return time.perf_counter() - t0


def grpc_upload(port: int, state: dict[str, torch.Tensor], node: str, tls_dir: str | None) -> float:
    kw: dict = {"backoff": Backoff(initial_s=0.05), "heartbeat": False, "chunk_size": CHUNK_SIZE}
    if tls_dir:
        kw |= {"ca_file": f"{tls_dir}/ca.pem", "key": f"{tls_dir}/nodes/{node}.key"}
    with FederationClient(f"127.0.0.1:{port}", node, **kw) as fc:
        t0 = time.perf_counter()
        ack = fc.submit(ClientReply(node, 0, state, num_examples=1))
        dt = time.perf_counter() - t0
    assert ack.accepted, ack
    return dt


def throughput(sizes: list[int], tls_dir: str, repeats: int) -> list[dict]:
    rows = []
    sink, plain, tls = Child("--raw-sink"), Child("--serve"), Child("--serve", "--tls-dir", tls_dir)
    try:
        for mib in sizes:
            state = make_update(mib)
            runs: dict[str, list[float]] = {"raw TCP": [], "gRPC": [], "gRPC + TLS": []}
            for _ in range(repeats):  # interleaved, best of each: other load on the machine hits all paths alike
                runs["raw TCP"].append(raw_copy(sink.port, state))
                runs["gRPC"].append(grpc_upload(plain.port, state, "node-0", None))
                runs["gRPC + TLS"].append(grpc_upload(tls.port, state, "node-0", tls_dir))
            best = {path: min(times) for path, times in runs.items()}
            for path, secs in best.items():
                rows.append({"size_mib": mib, "path": path, "seconds": secs, "mib_per_s": mib / secs,
                             "vs_raw": best["raw TCP"] / secs})
            del state
    finally:
        with socket.create_connection(("127.0.0.1", sink.port)) as s:
            s.sendall((0).to_bytes(8, "little"))
        for c in (sink, plain, tls):
            c.close()
    return rows


def concurrent_memory(n_clients: int, mib_each: int) -> dict:
    server = Child("--serve")
    state = make_update(mib_each, tensor_mib=4)  # shared read-only by every client thread
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            grpc_upload(server.port, state, f"node-{i}", None)
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
    ap.add_argument("--quick", action="store_true", help="64 and 256 MiB uploads, 8 clients x 16 MiB")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_SIZE / MiB, help="chunk size of uploads")
    ap.add_argument("--only", choices=["throughput", "memory"], help="run one of the two parts")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transport.json"))
    args = ap.parse_args()
    if args.serve:
        return serve(args.tls_dir)
    if args.raw_sink:
        return raw_sink()
    torch.set_num_threads(1)
    global CHUNK_SIZE
    CHUNK_SIZE = int(args.chunk_mib * MiB)
    sizes, (n, each), repeats = ([64, 256], (8, 16), 1) if args.quick else ([256, 1024], (32, 64), 3)
    rows, mem = [], None
    if args.only != "memory":
        with tempfile.TemporaryDirectory() as keys:
            create_keys(keys, ["node-0"], ["localhost", "127.0.0.1"])
            rows = throughput(sizes, keys, repeats)
    if args.only != "throughput":
        mem = concurrent_memory(n, each)
    report(rows, mem, args)


def report(rows: list[dict], mem: dict | None, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Upload over loopback (client submit -> server ack, streaming sum on the server)")
    for col in ("size", "path", "seconds", "MiB/s", "vs raw TCP"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['size_mib']} MiB", r["path"], f"{r['seconds']:.2f}", f"{r['mib_per_s']:.0f}",
                      f"{100 * r['vs_raw']:.0f}%")
    console = Console()
    if rows:
        console.print(table)
    if mem:
        mt = Table(title=f"{mem['clients']} clients x {mem['mib_each']} MiB at once, streaming sum on the server")
        for col in ("seconds", "server peak RSS", "of which before uploads", "buffering all would need"):
            mt.add_column(col, justify="right")
        mt.add_row(f"{mem['seconds']:.1f}", f"{mem['server_peak_rss_mib']:.0f} MiB",
                   f"{mem['server_base_rss_mib']:.0f} MiB", f"{mem['buffer_all_mib']} MiB")
        console.print(mt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                               "throughput": rows, "concurrent": mem}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
