"""Privacy costs: secure aggregation's masks and rounds against plain aggregation, and its upload bytes.

    .venv/bin/python benchmarks/privacy.py [--quick] [--words N] [--repeat N]

1. Mask generation: fedtune's keystream (AES-256-CTR keyed with a 256-bit derived key, OpenSSL via
   ``cryptography``, written into one reused cache-sized buffer) against ChaCha20 written the same way and
   numpy's ``RandomState`` (what Flower's SecAgg+ seeds with a 32-bit value); and masking a vector (fedtune's
   ``add_mask`` in place against Flower's draw-then-add): 10M 32-bit words, best of ``--repeat`` interleaved
   runs, CPU time of this process (the machine may be shared). "x Flower's" is numpy randint's time (for
   masking: randint + add) over the row's.
2. One round of the secure-aggregation protocol (``SecAggClient`` / ``SecAggServer``: keys, signed adverts,
   Shamir shares encrypted end to end, fixed point, masks, unmasking with the dropped clients' pair masks)
   for 10, 50 and 100 simulated clients with 0% and 30% dropping out after sharing keys (the costliest
   phase to recover from), on the SmolLM2-135M adapter size (r = 8 on q_proj and v_proj: 460,800 values),
   against the plain round's server work on the same vectors (a float32 running sum, as fedavg streams it).
   Local training is not included: both rounds add the same training time on top.
3. Upload bytes per client: plain float32 vector against secure aggregation's four messages (the JSON
   adverts, shares and unmask answers, and the uint32 masked vector).
4. ``--loss``: final held-out eval loss at epsilon 1, 4 and 8 (delta 1e-5) against no DP, central DP, noise
   multiplier for each epsilon from ``noise_for_epsilon`` (dp-accounting's calibration, RDP accountant: PLD's
   calibration at q = 1 takes minutes), updates clipped to ``--clip``, ``--rounds`` x ``--steps`` (SmolLM2-135M,
   fedavg, the quality benchmark's model settings). By default on the quality benchmark's federation
   (``benchmarks/quality.py``: 8 clients by ChatterBot category), every client every round
   (``privacy.sample_rate = 1``, no sampling amplification: 8 clients are too few to sample). With
   ``--loss-clients N --sample-rate q``: N simulated clients on an iid split of the same data, Poisson-sampled
   with probability q under DP (the accountant charges that amplification), the no-DP arm sampling
   ``round(q N)`` clients a round. Only this arm runs with ``--loss``; it writes
   benchmarks/results/privacy_loss.json (privacy_loss_N.json).
5. ``--e2e``: whole rounds through the round driver (``run_rounds``), the client phase handlers and the wire
   sizes, secure aggregation against plain fedavg, for each of ``--clients`` (comma-separated, default 100)
   and ``--dropout`` (fractions dropping out in the last phase: the upload after sharing keys; plain: the
   training reply; default 0.3), on the SmolLM2-135M adapter size. ``--train fixed`` (default): local
   training is a fixed update (no model), so the ratio is the protocol's cost over plain's bookkeeping, the
   worst case. ``--train smollm2``: the clients of both arms really train SmolLM2-135M NF4 (r = 8 on q and v,
   ``--train-steps`` steps of ``--train-batch`` examples of ``--seq-len`` tokens, an iid split), one shared
   model in this process. The arms take turns round by round; each round's CPU seconds of this process (all
   clients and the server run in it) and wall seconds, median of ``--rounds``; each client's handler CPU
   seconds, its training apart, give the per-client critical path and the server's side. Writes
   privacy_e2e.json.

Prints tables and writes benchmarks/results/privacy.json (privacy_quick.json with --quick: 10 and 50 clients,
1M words for the masks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine_info, print_table, write_json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.privacy.accounting import epsilon, noise_for_epsilon
from fedtune.privacy.secagg import (
    SecAggClient,
    SecAggServer,
    _keystream,
    add_mask,
    default_neighbours,
    fixed_point_scale,
    identity_public,
    prg,
    quantize,
    threshold,
)

SMOLLM2_ADAPTER = 30 * ((8 * 576 + 576 * 8) + (8 * 576 + 192 * 8))  # 30 layers, q_proj 576->576, v_proj 576->192


def cpu(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def chacha20(key: bytes, words: int) -> None:
    """ChaCha20 written into one reused cache-sized buffer, as ``_keystream`` does with AES-256-CTR."""
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    buf = bytearray(4 * 2**16 + 16)
    zeros = memoryview(bytes(4 * 2**16))
    for start in range(0, words, 2**16):
        enc.update_into(zeros[:4 * min(2**16, words - start)], buf)


def masks(words: int, repeat: int) -> list[dict[str, Any]]:
    """CPU seconds per generator, cells interleaved so that load on the shared machine hits them alike."""
    key = bytes(range(32))
    y = np.zeros(words, dtype=np.uint32)

    def flower_mask() -> None:  # Flower's masking: draw the mask, then add it (a new array)
        np.add(y, np.random.RandomState(1234).randint(0, 2**31, size=words), out=y, casting="unsafe")

    cells = {
        "numpy RandomState.randint (Flower's call)": lambda: np.random.RandomState(1234).randint(0, 2**31, size=words),
        "numpy RandomState.randint uint32":
            lambda: np.random.RandomState(1234).randint(0, 2**32, size=words, dtype=np.uint32),
        "ChaCha20, into a reused buffer": lambda: chacha20(key, words),
        "AES-256-CTR keystream (fedtune, into a reused buffer)": lambda: [None for _ in _keystream(key, words)],
        "AES-256-CTR prg (fedtune, a new array)": lambda: prg(key, words),
        "masking: randint + add (Flower)": flower_mask,
        "masking: add_mask in place (fedtune)": lambda: add_mask(y, key),
    }
    best = dict.fromkeys(cells, float("inf"))
    for _ in range(repeat):
        for label, fn in cells.items():
            best[label] = min(best[label], cpu(fn, 1))
    base, masking = best["numpy RandomState.randint (Flower's call)"], best["masking: randint + add (Flower)"]
    return [{"generator": label, "seconds": t, "words_per_s": words / t,
             "x_flower": (masking if label.startswith("masking") else base) / t} for label, t in best.items()]


def blob_bytes(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")).encode())


def secagg_round(n: int, dropout: float, words: int, fraction: float, seed: int = 0) -> dict[str, Any]:
    """CPU seconds of every client's and the server's work in one round, and bytes up per client."""
    rng = np.random.default_rng(seed)
    ids = [f"client-{i}" for i in range(n)]
    idents = {c: Ed25519PrivateKey.generate() for c in ids}
    trusted = {c: identity_public(k) for c, k in idents.items()}
    updates = {c: rng.uniform(-1e-3, 1e-3, words) for c in ids}
    k = default_neighbours(n)
    t_client = t_server = 0.0
    up: dict[str, int] = dict.fromkeys(ids, 0)

    t0 = time.process_time()
    clients = {c: SecAggClient(c, 1, idents[c]) for c in ids}
    adverts = [clients[c].advertise() for c in ids]
    for a in adverts:
        up[a.cid] += blob_bytes(a.to_plain())
    t_client += time.process_time() - t0
    t0 = time.process_time()
    srv = SecAggServer(1, threshold(k, fraction), k, seed)
    srv.take_adverts(adverts)
    xs = srv.xs()
    t_server += time.process_time() - t0
    t0 = time.process_time()
    shares = {c: clients[c].share_keys(srv.neighbour_adverts(c), trusted, xs, srv.t) for c in ids}
    for c, s in shares.items():
        up[c] += blob_bytes({to: b.hex() for to, b in s.items()})
    t_client += time.process_time() - t0
    t0 = time.process_time()
    srv.take_shares(shares)
    t_server += time.process_time() - t0
    dropped = set(rng.choice(ids, size=round(dropout * n), replace=False).tolist()) if dropout else set()
    scale = fixed_point_scale(1.0, n)
    for c in ids:
        if c in dropped:
            continue
        t0 = time.process_time()
        y = clients[c].masked(quantize(updates[c], scale), srv.inbox(c), srv.senders(c))
        t_client += time.process_time() - t0
        up[c] += y.nbytes
        t0 = time.process_time()
        srv.add(c, y)
        t_server += time.process_time() - t0
    t0 = time.process_time()
    answers = {c: clients[c].unmask(srv.uploaded, srv.dropped()) for c in srv.uploaded}
    t_client += time.process_time() - t0
    for c, a in answers.items():
        up[c] += blob_bytes(a)
    t0 = time.process_time()
    srv.unmask(answers)
    t_server += time.process_time() - t0

    t0 = time.process_time()  # the plain round's server work on the same vectors: a float32 running sum
    total = np.zeros(words, dtype=np.float32)
    for c in srv.uploaded:
        total += updates[c].astype(np.float32)
    t_plain = time.process_time() - t0
    survivors = len(srv.uploaded)
    return {"clients": n, "dropout": dropout, "neighbours": k, "t": srv.t, "words": words,
            "client_cpu_s_per_client": t_client / n, "server_cpu_s": t_server, "plain_server_cpu_s": t_plain,
            "secagg_cpu_s": t_client + t_server, "server_x_plain": t_server / max(t_plain, 1e-9),
            "bytes_up_per_client": sum(up[c] for c in srv.uploaded) / survivors, "plain_bytes_up": 4 * words}


def loss_arms(rounds: int, steps: int, clip: float, eval_batches: int, quant: str, clients: int = 8,
              rate: float = 1.0) -> list[dict[str, Any]]:
    """Final eval loss of fedavg without DP and with central DP at epsilon 8, 4, 1 (delta 1e-5).

    ``clients = 8, rate = 1``: the quality benchmark's federation (8 clients by ChatterBot category), every
    client every round. Otherwise ``clients`` simulated clients holding an iid split of the same data, each
    round Poisson-sampled with probability ``rate`` under DP (the accountant charges that sampling); the
    no-DP arm samples the same expected number of clients, ``round(rate * clients)``, uniformly."""
    from quality import QUANT, base
    from sim_vs_flower import run_child

    common = [*base(rounds, steps, clients, eval_batches), *QUANT[quant], "strategy.name=fedavg"]
    if clients != 8:
        common.append("sim.partitioner=iid")
    expected = rate * clients
    rows = []
    for target in (None, 8.0, 4.0, 1.0):
        extra = [f"sim.clients_per_round={round(expected) if rate < 1 else 0}"]
        z = 0.0
        if target is not None:
            z = noise_for_epsilon(rate, rounds, 1e-5, target, "rdp")
            extra = ["sim.clients_per_round=0", "privacy.dp=central", "client.pipeline=[dp_clip]",
                     f"privacy.clip_norm={clip}", f"privacy.sample_rate={rate}", f"privacy.noise_multiplier={z}",
                     "privacy.delta=1e-5", "privacy.accountant=rdp"]
        res = run_child({"kind": "inproc", "threads": 1, "overrides": [*common, *extra]}, timeout=7200)
        row = {"target_epsilon": target, "noise_multiplier": z, "clip_norm": clip if target else None,
               "clients": clients, "sample_rate": rate, "expected_per_round": expected,
               "epsilon": epsilon(rate, z, rounds, 1e-5, "rdp") if target else None,
               "noise_std_of_mean": z * clip / expected, "before": res["before"]["eval_loss"],
               "after": res["after"]["eval_loss"], "wall_s": res["wall_s"]}
        print(f"epsilon {target}: z {z:.3f}, loss {row['before']:.4f} -> {row['after']:.4f} "
              f"({row['wall_s']:.0f} s)", flush=True)
        rows.append(row)
    return rows


class _Clock:
    """CPU seconds of this process over each round: started when the driver asks for the round's clients,
    stopped when it applies the round's result (everything in between runs in this process)."""

    def __init__(self) -> None:
        self.t0, self.laps = 0.0, []

    def start(self) -> None:
        self.t0 = time.process_time()

    def stop(self) -> None:
        self.laps.append(time.process_time() - self.t0)


class _StateModel:
    """The round driver's model over plain tensors (no LLM): results replace the state."""

    def __init__(self, state: dict[str, Any], clock: _Clock) -> None:
        self.current, self.base_updates, self.clock = dict(state), [], clock

    def initial_state(self) -> dict[str, Any]:
        return dict(self.current)

    def restore(self, state: dict[str, Any], base_updates: list[Any]) -> None:
        self.current = dict(state)

    def apply(self, global_state: dict[str, Any], result: Any) -> dict[str, Any]:
        self.clock.stop()
        if result.applied:
            self.current = dict(result.state)
        return self.current

    def evaluate(self) -> dict[str, float]:
        return {}

    def full_model_bytes(self) -> int:
        return 0

    def save(self, run: Any, global_state: dict[str, Any]) -> None:
        pass


class _Dispatcher:
    """Clients answered in this process by their phase handlers, reply sizes from the wire codec; the clients
    in ``drop`` fail the phase ``last``. Each handler call's CPU seconds are added to ``client_s[cid]``."""

    def __init__(self, handle: Any, ids: list[str], drop: set[str], last: str, clock: _Clock) -> None:
        self.handle, self.ids, self.drop, self.last, self.clock = handle, ids, drop, last, clock
        self.client_s: dict[str, float] = {}

    def available(self, round: int) -> list[str]:
        self.clock.start()
        self.client_s = {}
        return list(self.ids)

    def client_index(self, client_id: str) -> int:
        return self.ids.index(client_id)

    def dispatch(self, round: int, phase: str, instructions: dict[str, Any]) -> Any:
        from fedtune.transport.loopback import send_instructions, send_reply
        from fedtune.types import failed_reply

        for cid, ins in instructions.items():
            ins, down = send_instructions(ins, "dense")
            if phase == self.last and cid in self.drop:
                reply = failed_reply(cid, round, "dropped out")
            else:
                t0 = time.process_time()
                reply, up = send_reply(self.handle(cid, ins), phase, "dense")
                self.client_s[cid] = self.client_s.get(cid, 0.0) + time.process_time() - t0
                reply.bytes_up = up
            reply.bytes_down = down
            yield reply

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        pass

    def close(self) -> None:
        pass


SMOLLM2_TRAIN = ["model.name=smollm2-135m", "quant.mode=nf4", "quant.compute_dtype=bf16", "adapter.r=8",
                 "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]", "train.lr=5e-3", "sim.partitioner=iid",
                 "eval.samples=0"]
"""The training arm's model and adapter: the quality benchmark's (SmolLM2-135M NF4, r = 8 on q and v), iid split."""


def train_setup(n: int, steps: int, batch: int, seq_len: int) -> tuple[list[str], Any, dict[str, list[Any]]]:
    """SmolLM2 loaded once and ``n`` clients' encoded examples (an iid split of the default data), for the arm
    whose clients really train: the overrides, the loaded model and each client's examples."""
    from fedtune.config import load_config
    from fedtune.data.partition import partition_clients
    from fedtune.models import load_model
    from fedtune.pipeline import encode, load_dataset

    overrides = [*SMOLLM2_TRAIN, f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.seq_len={seq_len}",
                 f"sim.num_clients={n}"]
    cfg = load_config(None, overrides)
    data = load_dataset(cfg)
    lm = load_model(cfg)
    parts = partition_clients(cfg, data.train_records)
    examples = {f"site-{i:03d}": encode([data.train_records[j] for j in p], lm.tokenizer, cfg)
                for i, p in enumerate(parts)}
    return overrides, lm, examples


def e2e_rounds(n: int, dropout: float, rounds: int, threshold_fraction: float,
               setup: tuple[list[str], Any, dict[str, list[Any]]] | None = None) -> list[dict[str, Any]]:
    """Seconds per round (wall and this process's CPU, median of ``rounds``) of plain fedavg and of secure
    aggregation, the two arms taking turns round by round. ``setup`` (``train_setup``): the clients really
    train SmolLM2 in both arms; without it local training is a fixed update. Each round also splits the CPU
    seconds into every client's handlers (its training apart) and the rest (the server's side)."""
    import io
    import tempfile

    import torch
    from rich.console import Console

    import fedtune.privacy.client as sa_client
    from fedtune.adapters import get_state
    from fedtune.client import phases
    from fedtune.client.phases import ClientContext, run_phase
    from fedtune.config import load_config
    from fedtune.privacy.wrap import with_privacy
    from fedtune.rounds import RoundPlan, run_rounds
    from fedtune.runs import RunDir
    from fedtune.strategies import StrategyConfig, make_strategy
    from fedtune.types import ClientReply

    train_s: dict[str, float] = {}

    def timed(fn: Any) -> Any:
        def run(ctx: Any, ins: Any) -> ClientReply:
            t0 = time.process_time()
            reply: ClientReply = fn(ctx, ins)
            train_s[ins.client_id] = train_s.get(ins.client_id, 0.0) + time.process_time() - t0
            return reply
        return run

    if setup is None:
        layers = [(f"l{i}.{m}.lora_{ab}.weight", shape) for i in range(30) for m, out in (("q", 576), ("v", 192))
                  for ab, shape in (("A", (8, 576)), ("B", (out, 8)))]
        start = {k: torch.zeros(shape) for k, shape in layers}
        overrides: list[str] = []
        lm, examples = None, {}

        def fixed(ctx: Any, ins: Any) -> ClientReply:  # a fixed small update (norm 0.5: under the clip bound)
            return ClientReply(ins.client_id, ins.round, {k: v + 7e-4 for k, v in ins.state.items()}, 10)

        train = timed(fixed)
    else:
        overrides, lm, examples = setup
        start = get_state(lm.model, trainable_only=True)
        train = timed(phases.train_phase)
    assert sum(v.numel() for v in start.values()) == SMOLLM2_ADAPTER

    ids = [f"site-{i:03d}" for i in range(n)]
    drop = set(np.random.default_rng(0).choice(ids, size=round(dropout * n), replace=False).tolist())
    arms = {}
    for secagg in (False, True):
        cfg = load_config(None, [*overrides, f"privacy.secagg={str(secagg).lower()}", "privacy.clip_norm=10.0",
                                 f"privacy.secagg_threshold={threshold_fraction}", "sim.clients_per_round=0"])
        # no agg_error diagnostics in either arm: plain is then just the running weighted sum
        strategy = with_privacy(make_strategy("fedavg", StrategyConfig(r=8, lora_alpha=16.0, compute_error=False)),
                                cfg)
        ctxs = {c: ClientContext(cfg, lm, examples.get(c, []), pipeline=[]) for c in ids}

        def handle(cid: str, ins: Any, ctxs: dict[str, Any] = ctxs) -> ClientReply:
            return train(ctxs[cid], ins) if ins.phase == "train" else run_phase(ctxs[cid], ins)

        clock = _Clock()
        arms[secagg] = (cfg, strategy, _Dispatcher(handle, ids, drop, "secagg_upload" if secagg else "train", clock),
                        clock, [], [])
    original = sa_client.train_phase
    sa_client.train_phase = train
    try:
        for _ in range(rounds):  # the arms take turns, one round each: load on the shared machine hits both
            for cfg, strategy, dispatcher, clock, records, splits in arms.values():
                train_s.clear()
                with tempfile.TemporaryDirectory() as tmp:
                    run = RunDir(Path(tmp))
                    run_rounds(RoundPlan(rounds=1, seed=1, train=cfg.train), run, _StateModel(start, clock),
                               strategy, dispatcher, Console(file=io.StringIO()))
                    records += [r for r in run.read_metrics() if r.get("round", 0) >= 1]
                served = dispatcher.client_s
                splits.append({"clients_s": sum(served.values()), "train_s": sum(train_s.values()),
                               "client_train_s": float(np.median([train_s.get(c, 0.0) for c in served])),
                               "client_extra_s": float(np.median([s - train_s.get(c, 0.0) for c, s in served.items()])),
                               "client_extra_max_s": max(s - train_s.get(c, 0.0) for c, s in served.items())})
    finally:
        sa_client.train_phase = original
    rows = []
    for secagg, (_, _, _, clock, records, splits) in arms.items():
        assert all(r["applied"] for r in records), [r.get("failures") for r in records]
        wall = sorted(r["seconds"] for r in records)
        mid = sorted(range(len(clock.laps)), key=lambda i: clock.laps[i])[len(clock.laps) // 2]  # the median round
        split = splits[mid]
        rows.append({"secagg": secagg, "clients": n, "dropout": dropout, "rounds": rounds,
                     "training": "fixed update" if setup is None else "SmolLM2 " + " ".join(
                         o for o in overrides if o.startswith("train.")),
                     "round_s": wall[len(wall) // 2], "all_round_s": wall,
                     "cpu_s": clock.laps[mid], "all_cpu_s": clock.laps, **split,
                     "server_s": clock.laps[mid] - split["clients_s"], "splits": splits,
                     "clients_ok": records[-1]["clients_ok"],
                     "bytes_up_per_survivor": records[-1]["bytes_up"] / records[-1]["clients_ok"]})
    return rows


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def e2e_tables(rows: list[dict[str, Any]]) -> None:
    """The ``--e2e`` tables from its rows (plain, secagg pairs), as run or read back with ``--report``.

    Besides the measured ratio of the median rounds, each arm's CPU seconds outside local training (the round
    minus its clients' training, median over rounds) give the protocol's own extra; "x plain, same training"
    adds that to plain's median round, so the training seconds, which vary from round to round on a busy
    machine, count once. The critical path: one client's training (plain's median client) with its arm's
    extra, and the server's side."""
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    for r in rows:
        r["outside_training_s"] = _median([lap - sp["train_s"] for lap, sp in zip(r["all_cpu_s"], r["splits"],
                                                                                   strict=True)])
    print_table(f"whole rounds through the driver, SmolLM2-135M adapter size ({SMOLLM2_ADAPTER:,} values), "
                f"CPU s of the round (median of {len(rows[0]['all_cpu_s'])} rounds per arm, the arms taking turns)",
                ["local training", "clients", "dropout", "plain CPU s", "secagg CPU s", "x plain (CPU)",
                 "x plain (wall)", "outside training s (plain / secagg)", "x plain, same training", "clients ok",
                 "up KiB per survivor (plain)"],
                [[s["training"], s["clients"], f"{s['dropout']:.0%}", f"{p['cpu_s']:.2f}", f"{s['cpu_s']:.2f}",
                  f"{s['cpu_s'] / p['cpu_s']:.2f}", f"{s['round_s'] / p['round_s']:.2f}",
                  f"{p['outside_training_s']:.2f} / {s['outside_training_s']:.2f}",
                  f"{(p['cpu_s'] + s['outside_training_s'] - p['outside_training_s']) / p['cpu_s']:.2f}",
                  s["clients_ok"], f"{s['bytes_up_per_survivor'] / 1024:.0f} ({p['bytes_up_per_survivor'] / 1024:.0f})"]
                 for p, s in pairs])
    print_table("the critical path: one client's training (plain's median client) and each arm's extra CPU s "
                "in the client's handlers (median client; secagg's slowest), and the server's side (the round's "
                "CPU s outside the clients' handlers), median round",
                ["local training", "clients", "dropout", "client train s", "client extra s (plain)",
                 "client extra s (secagg)", "secagg client extra max s", "client x plain", "server s (plain)",
                 "server s (secagg)"],
                [[s["training"], s["clients"], f"{s['dropout']:.0%}", f"{p['client_train_s']:.3f}",
                  f"{p['client_extra_s']:.3f}", f"{s['client_extra_s']:.3f}", f"{s['client_extra_max_s']:.3f}",
                  f"{(p['client_train_s'] + s['client_extra_s']) / (p['client_train_s'] + p['client_extra_s']):.2f}",
                  f"{p['server_s']:.2f}", f"{s['server_s']:.2f}"] for p, s in pairs])


def timed_steps() -> tuple[dict[str, list[float]], Any]:
    """Wrap the secure-aggregation steps (client and server) with CPU timers, in place; returns the
    ``{step: [seconds, calls]}`` they fill and a function that takes the wrappers off again."""
    import fedtune.privacy.client as sa_client
    import fedtune.privacy.secagg as sa

    spent: dict[str, list[float]] = {}
    steps = [(sa_client, "clipped_delta", "client: clip"), (sa_client, "quantize", "client: fixed point"),
             (sa.SecAggClient, "advertise", "client: advertise (X25519 keys, Ed25519 signature)"),
             (sa.SecAggClient, "share_keys", "client: share keys (verify, agree, Shamir, encrypt)"),
             (sa.Advert, "verify", "  of which Ed25519 verifies"),
             (sa.SecAggClient, "masked", "client: decrypt shares and add the masks"),
             (sa, "pair_mask_key", "  pair mask keys (X25519 + HKDF; server too)"),
             (sa.SecAggClient, "unmask", "client: unmask answer"),
             (sa.SecAggClient, "from_plain", "client: state restored between phases"),
             (sa.SecAggServer, "add", "server: add a masked vector"),
             (sa.SecAggServer, "unmask", "server: unmask (rebuild secrets, remove masks)")]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in steps]  # as defined (a classmethod stays one)

    def wrap(fn: Any, label: str) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cell = spent.setdefault(label, [0.0, 0])
                cell[0] += time.process_time() - t0
                cell[1] += 1
        return run

    for owner, name, label in steps:  # bound as the callers find it: a classmethod is called on the class
        fn = getattr(owner, name)
        setattr(owner, name, staticmethod(wrap(fn, label)) if isinstance(vars(owner)[name], classmethod)
                else wrap(fn, label))

    def restore() -> None:
        for owner, name, original in saved:
            setattr(owner, name, original)

    return spent, restore


def e2e(args: argparse.Namespace) -> None:
    """The ``--e2e`` tables: whole rounds, secure aggregation against plain, per training arm, size, dropout."""
    rows = []
    spent, restore = timed_steps() if args.breakdown else ({}, None)
    for arm in args.train.split(","):
        if arm not in ("fixed", "smollm2"):
            raise SystemExit(f"--train: unknown arm {arm!r} (fixed, smollm2)")
        for n in (int(c) for c in args.clients.split(",")):
            setup = train_setup(n, args.train_steps, args.train_batch, args.seq_len) if arm == "smollm2" else None
            for d in (float(x) for x in args.dropout.split(",")):
                plain, secagg = e2e_rounds(n, d, args.rounds, args.threshold, setup)
                rows += [plain, secagg]
                print(f"{plain['training']}: {n} clients, {d:.0%} dropout: CPU s {plain['cpu_s']:.2f} -> "
                      f"{secagg['cpu_s']:.2f} ({secagg['cpu_s'] / plain['cpu_s']:.2f}x), wall s "
                      f"{plain['round_s']:.2f} -> {secagg['round_s']:.2f}", flush=True)
    e2e_tables(rows)
    if restore is not None:
        restore()
        rounds = len(rows) // 2 * args.rounds
        print_table(f"secure aggregation's steps, CPU s per secagg round (averaged over all {rounds} secagg rounds run; "
                    "the timers add a little)", ["step", "s per round", "calls per round", "ms per call"],
                    [[label, f"{t / rounds:.3f}", f"{c / rounds:.0f}", f"{1e3 * t / c:.3f}"]
                     for label, (t, c) in spent.items()])
    path = write_json("privacy_e2e.json", {"machine": machine_info(), "rows": rows, "argv": sys.argv[1:],
                                           "steps": {k: {"cpu_s": t, "calls": c} for k, (t, c) in spent.items()},
                                           "loadavg": list(os.getloadavg())})
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 50 clients, 1M words for the masks")
    parser.add_argument("--words", type=int, default=0, help="mask words (default 10M, 1M with --quick)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per mask cell, fastest kept")
    parser.add_argument("--threshold", type=float, default=1 / 3,
                        help="privacy.secagg_threshold (default 1/3: 30%% dropout out of O(log n) neighbours "
                             "leaves more than a third of every neighbourhood with high probability)")
    parser.add_argument("--loss", action="store_true", help="only the eval-loss-versus-epsilon arm (SmolLM2)")
    parser.add_argument("--rounds", type=int, default=3, help="--loss: rounds")
    parser.add_argument("--steps", type=int, default=2, help="--loss: local steps per round")
    parser.add_argument("--clip", type=float, default=1.0, help="--loss: privacy.clip_norm")
    parser.add_argument("--eval-batches", type=int, default=4, help="--loss: held-out batches of 8 scored")
    parser.add_argument("--quant", choices=["nf4", "bf16"], default="nf4", help="--loss: quantization")
    parser.add_argument("--loss-clients", type=int, default=8, help="--loss: simulated clients (8: the quality "
                        "benchmark's federation by category; otherwise an iid split of the same data)")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="--loss: Poisson sampling rate q under DP "
                        "(the no-DP arm samples round(q x clients) each round)")
    parser.add_argument("--e2e", action="store_true", help="only whole rounds through the driver: secagg vs plain")
    parser.add_argument("--clients", default="100", help="--e2e: clients (comma-separated: one row set each)")
    parser.add_argument("--dropout", default="0.3", help="--e2e: fractions dropping out (comma-separated)")
    parser.add_argument("--breakdown", action="store_true", help="--e2e: time each secure-aggregation step")
    parser.add_argument("--report", default="", help="print the --e2e tables of an earlier run's JSON (its rows)")
    parser.add_argument("--train", default="fixed", help="--e2e: local training, comma-separated arms: fixed (a fixed "
                        "update, the protocol-only worst case), smollm2 (the clients really train SmolLM2 NF4)")
    parser.add_argument("--train-steps", type=int, default=1, help="--e2e smollm2: local steps per round")
    parser.add_argument("--train-batch", type=int, default=1, help="--e2e smollm2: examples per step")
    parser.add_argument("--seq-len", type=int, default=64, help="--e2e smollm2: tokens per example (32 leaves "
                        "no answer token after the chat template)")
    args = parser.parse_args()
    if args.report:
        e2e_tables(json.loads(Path(args.report).read_text())["rows"])
        return
    if args.e2e:
        e2e(args)
        return
    if args.loss:
        rows = loss_arms(args.rounds, args.steps, args.clip, args.eval_batches, args.quant, args.loss_clients,
                         args.sample_rate)
        who = ("8 clients by category, every client every round" if args.loss_clients == 8 and args.sample_rate == 1
               else f"{args.loss_clients} clients (iid split), Poisson sampling q = {args.sample_rate:g} "
                    f"({args.sample_rate * args.loss_clients:g} expected a round)")
        print_table(f"final eval loss against epsilon (delta 1e-5): SmolLM2-135M {args.quant}, {who}, fedavg, "
                    f"{args.rounds} rounds x {args.steps} steps, clip {args.clip:g}",
                    ["epsilon", "noise multiplier", "noise std on the mean", "loss before", "loss after", "wall s"],
                    [["no DP" if r["target_epsilon"] is None else f"{r['epsilon']:.2f}", f"{r['noise_multiplier']:.3f}",
                      f"{r['noise_std_of_mean']:.4f}", f"{r['before']:.4f}", f"{r['after']:.4f}", f"{r['wall_s']:.0f}"]
                     for r in rows])
        name = "privacy_loss.json" if args.loss_clients == 8 else f"privacy_loss_{args.loss_clients}.json"
        path = write_json(name, {"machine": machine_info(), "rounds": args.rounds, "steps": args.steps,
                                 "clip": args.clip, "quant": args.quant, "clients": args.loss_clients,
                                 "sample_rate": args.sample_rate, "arms": rows, "argv": sys.argv[1:]})
        print(f"wrote {path}")
        return
    words = args.words or (1_000_000 if args.quick else 10_000_000)
    mask_rows = masks(words, args.repeat)
    print_table(f"mask generation: {words:,} 32-bit words (CPU s, best of {args.repeat})",
                ["generator", "seconds", "Mwords/s", "x Flower's"],
                [[r["generator"], f"{r['seconds']:.4f}", f"{r['words_per_s'] / 1e6:.0f}", f"{r['x_flower']:.2f}"]
                 for r in mask_rows])
    rounds = [secagg_round(n, d, SMOLLM2_ADAPTER, args.threshold) for n in ((10, 50) if args.quick else (10, 50, 100))
              for d in (0.0, 0.3)]
    print_table(f"secure aggregation round on the SmolLM2-135M adapter ({SMOLLM2_ADAPTER:,} values), CPU s",
                ["clients", "dropout", "k", "t", "client s (each)", "server s", "plain server s", "server x plain",
                 "up KiB/client", "plain up KiB"],
                [[r["clients"], f"{r['dropout']:.0%}", r["neighbours"], r["t"], f"{r['client_cpu_s_per_client']:.3f}",
                  f"{r['server_cpu_s']:.2f}", f"{r['plain_server_cpu_s']:.3f}", f"{r['server_x_plain']:.0f}",
                  f"{r['bytes_up_per_client'] / 1024:.0f}", f"{r['plain_bytes_up'] / 1024:.0f}"] for r in rounds])
    path = write_json("privacy_quick.json" if args.quick else "privacy.json",
                      {"machine": machine_info(), "masks": mask_rows, "rounds": rounds, "words": words})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
