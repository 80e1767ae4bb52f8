"""Bytes versus quality: dense fp32 FedAvg against compressed updates (with error feedback) and downlink deltas.

SmolLM2-135M in NF4, 8 clients holding disjoint ChatterBot categories, LoRA r=8 on q,v, batch 4 at seq 64,
local lr 5e-3: the setting and, by default, the rounds and local steps of ``benchmarks/quality.py``. Every arm
is fedavg (but the rank-pruning arm: svd); the baseline sends dense fp32 adapters both ways (what FlowerTune does), the others list
``compress`` in ``client.pipeline`` (``compress.method`` and its setting) and send downlink deltas with the
same method (``compress.downlink``); the mask arms explore in round 1 (``mask.explore_steps`` local steps on
every sampled client, scores sent up; with ``mask.score=global`` round 1 trains dense instead and the mask
comes from its aggregate), then send only the masked entries. For each arm: the final held-out eval loss, total bytes up and down (the
encoded messages, as ``metrics.jsonl`` counts them), the reduction against the baseline, and the change in eval
loss. Also each compressor's CPU time per MiB of fp32 update (compress + wire encoding, one thread). Writes
``benchmarks/results/compression.json`` and the frontier plot ``benchmarks/results/compression.png``.

    nice -n 10 .venv/bin/python benchmarks/compression.py [--quick] [--rounds R --steps S] [--arms a,b]
        [--json part.json] [--merge other.json]

Target: at least 20x fewer total bytes than dense at an eval loss no more than 1% worse (moonshot 50x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS, machine_info, print_table, write_json
from quality import QUANT, base

DOWN = ["client.pipeline=[compress]", "compress.downlink=true"]
ARMS: dict[str, list[str]] = {
    "dense fp32": ["client.encoding=dense"],
    "int8": [*DOWN, "compress.method=int8"],
    "int4": [*DOWN, "compress.method=int4"],
    "sign": [*DOWN, "compress.method=sign"],
    "topk 10%": [*DOWN, "compress.method=topk", "compress.fraction=0.1"],
    "topk 1%": [*DOWN, "compress.method=topk", "compress.fraction=0.01"],
    "randk 10% (up only)": ["client.pipeline=[compress]", "compress.method=randk", "compress.fraction=0.1"],
    # rank pruning needs a strategy that takes factors of any rank: svd (the clients prune their uploads, the
    # server its global adapter, which then travels trimmed)
    "svd + rank prune 90%": ["strategy.name=svd", "client.pipeline=[rank_prune]", "compress.energy=0.9",
                             "strategy.svd_energy=0.9"],
    "mask 25%": ["mask.density=0.25"],
    "mask 10%": ["mask.density=0.1"],
    "mask 25% + sign": [*DOWN, "compress.method=sign", "mask.density=0.25"],
    "mask 10% + int4": [*DOWN, "compress.method=int4", "mask.density=0.1"],
    # no exploration phase: round 1 trains dense (here: sign), the mask comes from its aggregate (secagg's mask)
    "mask 25% global + sign": [*DOWN, "compress.method=sign", "mask.density=0.25", "mask.score=global"],
    # compress.pack: one wire tensor per message instead of one per LoRA factor (120 here, ~130 bytes of header
    # each); compress.block: values per sign scale
    "sign packed": [*DOWN, "compress.method=sign", "compress.pack=true"],
    "sign/128 packed": [*DOWN, "compress.method=sign", "compress.pack=true", "compress.block=128"],
    "sign/64 packed": [*DOWN, "compress.method=sign", "compress.pack=true", "compress.block=64"],
    "mask 25% global + sign packed": [*DOWN, "compress.method=sign", "compress.pack=true", "mask.density=0.25",
                                      "mask.score=global"],
}
BASELINE = "dense fp32"
RECOMMENDED = "sign"
"""The README's recommended default (the best ratio within 1% of dense in the last frontier), run over gRPC."""


def child(overrides: list[str], out: Path) -> None:
    import torch
    from rich.console import Console

    from fedtune.config import load_config
    from fedtune.simulation.engine import run_simulation

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*overrides, f"out={tmp}/run"])
        t0 = time.perf_counter()
        result = run_simulation(cfg, Console(file=open(os.devnull, "w")))  # noqa: SIM115
        wall = time.perf_counter() - t0
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    keys = ("round", "eval_loss", "bytes_up", "bytes_down", "dense_fp32_bytes", "compression_ratio", "clients_ok",
            "seconds")
    out.write_text(json.dumps({
        "before": result.before["eval_loss"], "after": result.after["eval_loss"], "wall_s": wall,
        "bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds),
        "dense_fp32_bytes": sum(r["dense_fp32_bytes"] for r in rounds),
        "failed": sum(r["clients_failed"] for r in rounds),
        "rounds": [{k: r.get(k) for k in keys} for r in rounds]}))


def run_arm(overrides: list[str]) -> dict[str, Any]:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(overrides), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"arm failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
        return dict(json.loads(out.read_text()))


def encoder_cost(mib: int = 4, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per codec, CPU seconds per MiB of fp32 update, one thread, best of ``repeats``: ``encode`` (compress with
    the residual, then the wire encoding: what a client pays) and ``decode`` (the wire chunks back to tensors,
    then the delta expanded to full tensors: what the server pays per reply), and the encoded bytes per MiB."""
    import torch

    from fedtune.compression.compressors import compress, expand
    from fedtune.compression.config import CompressConfig, wire_encoding
    from fedtune.transport.codec import decode_state, encode_state

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = mib * (1 << 20) // 4
    acc = {f"layer{i}.lora_A.weight": torch.randn(8, n // 16, generator=gen, dtype=torch.float64) for i in range(2)}
    like = {k: v.float() for k, v in acc.items()}
    settings = {"dense fp32": None, "int8": CompressConfig(method="int8"), "int4": CompressConfig(method="int4"),
                "sign": CompressConfig(method="sign"), "sign/128": CompressConfig(method="sign", block=128),
                "sign/64": CompressConfig(method="sign", block=64), "topk 10%": CompressConfig(method="topk", fraction=0.1),
                "topk 1%": CompressConfig(method="topk", fraction=0.01),
                "randk 10% (up only)": CompressConfig(method="randk", fraction=0.1)}

    def best(fn: Any, *args: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn(*args)
            times.append(time.process_time() - t0)
        return min(times) / mib

    def codec(c: CompressConfig | None) -> tuple[Any, Any]:
        """(encode, decode) of one setting: ``encode()`` returns the wire chunks ``decode(chunks)`` reads."""
        if c is None:
            return (lambda: list(encode_state(like, "fp32"))), decode_state

        def enc() -> list[Any]:
            sent, _ = compress(acc, c, seed=1)
            return list(encode_state(sent, wire_encoding(c)))

        def dec(chunks: list[Any]) -> None:
            for k, v in decode_state(chunks).items():
                expand(v, like[k], k, c, 1)
        return enc, dec

    out = {}
    for name, c in settings.items():
        enc, dec = codec(c)
        chunks = enc()
        out[name] = {"encode": best(enc), "decode": best(dec, chunks),
                     "bytes_per_mib": sum(len(x.data) for x in chunks) / mib}
    return out


def upload_sizes() -> list[list[str]]:
    """One client's upload of SmolLM2-135M's r=8 q,v adapter (120 tensors, its PEFT names and shapes, random
    values) in each sign setting, as ``reply_wire_size`` counts it (what ``metrics.jsonl`` adds up), against the
    same reply in dense fp32: the bytes of ``compress.pack`` and ``compress.block`` without a training run."""
    import torch

    from fedtune.compression.config import CompressConfig, wire_encoding
    from fedtune.compression.feedback import CompressTransform
    from fedtune.transport.messages import reply_wire_size
    from fedtune.types import ClientReply, Instructions

    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(30):
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(8, 576, generator=gen) * 0.01
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, 8, generator=gen) * 0.01
    trained = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    ins = Instructions(round=1, client_id="c", state=state, extra={"seed": 1})
    dense = reply_wire_size(ClientReply("c", 1, trained, 5), "train", "fp32")
    rows = [["dense fp32", f"{dense:,}", "1.0x"]]
    for name, c in [("sign", CompressConfig(method="sign")), ("sign packed", CompressConfig(method="sign", pack=True)),
                    ("sign/128 packed", CompressConfig(method="sign", pack=True, block=128)),
                    ("sign/64 packed", CompressConfig(method="sign", pack=True, block=64))]:
        sent, _ = CompressTransform(c).apply(ClientReply("c", 1, trained, 5), ins, {})
        n = reply_wire_size(sent, "train", wire_encoding(c))
        rows.append([name, f"{n:,}", f"{dense / n:.1f}x"])
    return rows


def grpc_run(overrides: list[str], tmp: Path, rounds: int) -> dict[str, Any]:
    """``overrides`` over real processes on loopback: one ``fedtune server`` and a ``fedtune client`` per
    simulated client, each node on exactly the records the simulator gives the virtual client of its name.
    Returns the server's total bytes and dense fp32 bytes (its ``metrics.jsonl``) and the final eval loss."""
    import socket
    import subprocess

    from fedtune.config import load_config
    from fedtune.data.partition import partition_clients
    from fedtune.pipeline import load_dataset

    cfg = load_config(None, overrides)
    train = load_dataset(cfg).train_records
    names = []
    for i, part in enumerate(partition_clients(cfg, train)):
        names.append(f"client-{i}")
        (tmp / f"client-{i}.jsonl").write_text("".join(json.dumps(train[j]) + "\n" for j in part))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = [*overrides, f"federation.rounds={rounds}", f"federation.min_clients={len(names)}",
              f"federation.clients_per_round={len(names)}", "federation.round_timeout_s=1800",
              "federation.wait_timeout_s=1800", "client.max_backoff_s=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def start(*args: str, log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "fedtune.cli_federation", *args], cwd=ROOT, env=env,
                                stdout=open(tmp / log, "w"), stderr=subprocess.STDOUT)

    t0 = time.perf_counter()
    procs = {"server": start("server", *common, f"out={tmp / 'server'}", f"server.address=127.0.0.1:{port}",
                             log="server.log")}
    for name in names:
        procs[name] = start("client", *common, f"client.name={name}", f"client.server=127.0.0.1:{port}",
                            f"data.path={tmp / (name + '.jsonl')}", "data.eval_fraction=0", "data.max_records=none",
                            f"out={tmp / name}", log=f"{name}.log")
    try:
        codes = {n: p.wait(timeout=3600) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    if any(codes.values()):
        logs = "\n".join(f"--- {n}\n{(tmp / (n + '.log')).read_text()[-2000:]}" for n in procs)
        raise RuntimeError(f"gRPC run failed {codes}:\n{logs}")
    rows = [json.loads(x) for x in (tmp / "server" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("round", 0) >= 1]
    return {"bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
            "dense_fp32_bytes": sum(r["dense_fp32_bytes"] for r in rows), "after": rows[-1]["eval_loss"],
            "failed": sum(r["clients_failed"] for r in rows), "wall_s": time.perf_counter() - t0}


def grpc_compare(args: argparse.Namespace) -> None:
    """Dense and the recommended compressor, each simulated and over real gRPC processes (``--grpc``)."""
    arms = [BASELINE, RECOMMENDED]
    rows: list[list[str]] = []
    out: dict[str, dict[str, Any]] = {}
    for name in arms:
        spec = [*base(args.rounds, args.steps, args.clients, args.eval_batches, args.lr), *QUANT["nf4"], *ARMS[name]]
        sim = run_arm(spec)
        with tempfile.TemporaryDirectory() as tmp:
            grpc = grpc_run(spec, Path(tmp), args.rounds)
        out[name] = {"simulated": sim, "grpc": grpc, "overrides": spec}
        print(f"{name}: simulated {(sim['bytes_up'] + sim['bytes_down']) / 2**20:.3f} MiB, gRPC "
              f"{(grpc['bytes_up'] + grpc['bytes_down']) / 2**20:.3f} MiB ({grpc['wall_s']:.0f} s)", flush=True)
    total = {n: {w: r[w]["bytes_up"] + r[w]["bytes_down"] for w in ("simulated", "grpc")} for n, r in out.items()}
    for name in arms:
        for where in ("simulated", "grpc"):
            r = out[name][where]
            rows.append([name, where, f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{total[name][where]:,}",
                         f"{total[BASELINE][where] / total[name][where]:.2f}x",
                         f"{r['dense_fp32_bytes'] / total[name][where]:.2f}x", f"{r['after']:.4f}", str(r["failed"])])
    title = (f"compression over gRPC: SmolLM2-135M nf4, {args.clients} real nodes on loopback, {args.rounds} rounds "
             f"x {args.steps} steps (load avg {os.getloadavg()[0]:.1f})")
    print_table(title, ["arm", "run", "bytes up", "bytes down", "total", "fewer than dense", "vs dense fp32",
                        "eval loss", "failed"], rows)
    path = write_json("compression_grpc.json", {
        "rounds": args.rounds, "steps": args.steps, "clients": args.clients, "results": out,
        "ratio": {w: total[BASELINE][w] / total[RECOMMENDED][w] for w in ("simulated", "grpc")},
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")


def print_codecs(cost: dict[str, dict[str, float]]) -> None:
    print_table(f"encoder CPU cost, one thread, 4 MiB fp32 update (load avg {os.getloadavg()[0]:.1f})",
                ["codec", "encode MiB/s", "decode MiB/s", "encode ms/MiB", "decode ms/MiB", "bytes per MiB"],
                [[n, f"{1 / c['encode']:.0f}", f"{1 / c['decode']:.0f}", f"{1e3 * c['encode']:.1f}",
                  f"{1e3 * c['decode']:.1f}", f"{c['bytes_per_mib']:,.0f}"] for n, c in cost.items()])


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        total = (r["bytes_up"] + r["bytes_down"]) / 2**20
        ax.scatter(total, r["after"], color="black" if name == BASELINE else "tab:blue")
        ax.annotate(name, (total, r["after"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ref = results.get(BASELINE)
    if ref:  # the target: at least 20x fewer bytes than dense at an eval loss at most 1% worse
        ax.axhline(1.01 * ref["after"], color="tab:red", linestyle="--", linewidth=0.8, label="dense + 1%")
        ax.axvline((ref["bytes_up"] + ref["bytes_down"]) / 2**20 / 20, color="tab:red", linestyle=":",
                   linewidth=0.8, label="20x fewer bytes")
        ax.legend(fontsize=8, loc="center right")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("total MiB sent (up + down, encoded), log scale")
    ax.set_ylabel("final held-out eval loss")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 1 step, the baseline and sign only")
    ap.add_argument("--rounds", type=int, default=6, help="as benchmarks/quality.py")
    ap.add_argument("--steps", type=int, default=4, help="local steps per client per round (as quality.py)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 8 scored")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--arms", default="", help="comma-separated subset (default: all; none: only --merge)")
    ap.add_argument("--json", default="", help="results file under benchmarks/results (default compression.json)")
    ap.add_argument("--merge", default="", help="comma-separated results files of earlier runs with the same "
                    "rounds, steps, clients, eval batches and lr, whose arms join the table and the plot (the "
                    "runs are deterministic: one thread per arm, seeded)")
    ap.add_argument("--parallel", type=int, default=1, help="arms run at once (each in its own process)")
    ap.add_argument("--grpc", action="store_true", help="dense and the recommended compressor (sign), each "
                    "simulated and over real `fedtune server` / `fedtune client` processes on loopback (one node "
                    "per client: use --clients 3 --rounds 2 --steps 1)")
    ap.add_argument("--codecs", action="store_true", help="only the encode / decode CPU cost table")
    ap.add_argument("--uploads", action="store_true", help="only the bytes of one SmolLM2 upload in each sign "
                    "setting (compress.pack, compress.block), no training")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child), Path(args.out))
        return
    if args.grpc:
        grpc_compare(args)
        return
    if args.uploads:
        print_table("one client's upload, SmolLM2-135M r=8 q,v (120 tensors, 460,800 values)",
                    ["setting", "bytes", "fewer than dense fp32"], upload_sizes())
        return
    load_before, t0 = os.getloadavg(), time.perf_counter()
    cost = encoder_cost()
    print_codecs(cost)
    merged: dict[str, dict[str, Any]] = {}
    for name in filter(None, args.merge.split(",")):
        old = json.loads((RESULTS / name).read_text())
        sizes = ("rounds", "steps", "clients", "eval_batches", "lr")
        if [old.get(k) for k in sizes] != [args.rounds, args.steps, args.clients, args.eval_batches, args.lr]:
            raise SystemExit(f"--merge {name}: {dict(zip(sizes, [old.get(k) for k in sizes], strict=True))}, not "
                             "this run's sizes")
        merged.update(old["results"])
    if args.codecs:
        print(f"wrote {write_json('compression_codecs.json', {'cpu_s_per_mib': cost, 'machine': machine_info()})}")
        return
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    todo = [a for a in ARMS if not args.arms or a in args.arms.split(",")]
    if args.merge:
        todo = [a for a in todo if a not in merged]
    if args.quick:
        todo = [BASELINE, "sign"]
    specs = {a: [*base(rounds, steps, args.clients, args.eval_batches, args.lr), *QUANT["nf4"], *ARMS[a]] for a in todo}
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, dict[str, Any]] = dict(merged)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for name, res in zip(specs, pool.map(run_arm, specs.values()), strict=True):
            results[name] = {**res, "overrides": specs[name]}
            print(f"{name}: eval loss {res['before']:.4f} -> {res['after']:.4f}, "
                  f"{(res['bytes_up'] + res['bytes_down']) / 2**20:.2f} MiB ({res['wall_s']:.0f} s)", flush=True)
    results = {a: results[a] for a in ARMS if a in results}
    ref = results.get(BASELINE)
    rows, frontier = [], {}
    for name, r in results.items():
        total = r["bytes_up"] + r["bytes_down"]
        fewer = (ref["bytes_up"] + ref["bytes_down"]) / total if ref else None
        worse = 100 * (r["after"] - ref["after"]) / ref["after"] if ref else None
        frontier[name] = {"total_bytes": total, "x_fewer_bytes": fewer, "eval_loss_change_pct": worse,
                          "meets_target": bool(fewer and worse is not None and fewer >= 20 and worse <= 1.0)}
        rows.append([name, f"{r['after']:.4f}", "-" if worse is None else f"{worse:+.2f}%",
                     f"{r['bytes_up'] / 2**20:.2f}", f"{r['bytes_down'] / 2**20:.2f}",
                     "-" if fewer is None else f"{fewer:.1f}x",
                     f"{1e3 * cost[codec]['encode']:.1f}" if (codec := name.removesuffix(" packed")) in cost else "-",
                     str(r["failed"]), f"{r['wall_s']:.0f}"])
    load = os.getloadavg()
    title = (f"compression: SmolLM2-135M nf4, {args.clients} clients by category, {rounds} rounds x {steps} steps, "
             f"fedavg ({'merged from ' + str(len(args.merge.split(','))) + ' run(s)' if args.merge else f'load avg {load[0]:.1f}'})")
    print_table(title, ["arm", "eval loss", "vs dense", "MiB up", "MiB down", "fewer bytes", "encode ms/MiB",
                        "failed", "wall s"], rows)
    name_json = args.json or ("compression_quick.json" if args.quick else "compression.json")
    if not args.quick:
        plot(results, RESULTS / "compression.png", title)
    path = write_json(name_json, {
        "rounds": rounds, "steps": steps, "clients": args.clients, "eval_batches": args.eval_batches, "lr": args.lr,
        "quant": "nf4", "results": results, "frontier": frontier, "encode_cpu_s_per_mib": cost,
        "total_s": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
