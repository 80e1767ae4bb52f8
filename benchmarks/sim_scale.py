"""How fedtune's one-process simulation scales with the number of virtual clients.

8, 32 and 128 virtual clients (iid split of ChatterBot), 4 sampled per round, 2 rounds of 2 local steps, on the
tiny random Llama and on SmolLM2-135M NF4. Each run is a child process; the peak is its resident memory (the
process tree, sampled every 0.1 s, and the kernel's VmHWM). Memory should grow only by per-client state
(the client's tokenized share and, with sim.keep_optimizer_state, its optimizer state), never by a model.

``--many`` runs the large arm instead: 32 and 1,024 virtual clients with 32 sampled per round, each count
trained one client at a time (``sim.batch_clients=1``) and in batches (``sim.batch_clients=auto``: all 32 in
one pass when memory allows). ChatterBot's 1,056 training records leave most of the 1,024 clients one example.

    .venv/bin/python benchmarks/sim_scale.py [--quick] [--many] [--models tiny-llama] [--sizes 32,1024] [--arms batched]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info, print_table, write_json
from sim_vs_flower import run_child

MODELS = {
    "tiny-llama": ["model.name=tiny-llama", "quant.mode=none", "quant.compute_dtype=fp32", "adapter.r=8"],
    "smollm2-135m": ["model.name=smollm2-135m", "quant.mode=nf4", "quant.compute_dtype=bf16", "adapter.r=8"],
}
COMMON = ["adapter.target_modules=[q_proj,v_proj]", "train.max_steps=2", "train.batch_size=4", "train.seq_len=64",
          "sim.partitioner=iid", "sim.rounds=2", "eval.samples=0", "eval.max_batches=1",
          "eval.batch_size=4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama only, 8 and 32 clients (--many: 32 and 1,024)")
    ap.add_argument("--many", action="store_true", help="32 and 1,024 clients, 32 sampled, one by one and batched")
    ap.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)} (default: all; --quick: tiny-llama)")
    ap.add_argument("--sizes", help="comma-separated numbers of virtual clients (default 8,32,128; --quick 8,32; "
                                    "--many 32,1024)")
    ap.add_argument("--arms", help="--many: comma-separated, of one-by-one, batched (default: both)")
    args = ap.parse_args()
    sizes = [32, 1024] if args.many else [8, 32] if args.quick else [8, 32, 128]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    sampled = 32 if args.many else 4
    if min(sizes) < sampled:
        ap.error(f"--sizes: every size needs at least the {sampled} clients sampled per round")
    arms = {"one by one": ["sim.batch_clients=1"], "batched": ["sim.batch_clients=auto"]} if args.many else {"": []}
    if args.arms:
        if not args.many:
            ap.error("--arms needs --many (the default runs have one arm)")
        wanted = [a.strip().replace("-", " ") for a in args.arms.split(",")]
        if unknown := [a for a in wanted if a not in arms]:
            ap.error(f"--arms: unknown {', '.join(unknown)} (choose from one-by-one, batched)")
        arms = {a: arms[a] for a in wanted}
    models = args.models.split(",") if args.models else ["tiny-llama"] if args.quick else list(MODELS)
    load_before = os.getloadavg()
    runs = []
    for model in models:
        for n in sizes:
            for arm, extra in arms.items():
                overrides = [*MODELS[model], *COMMON, f"sim.clients_per_round={sampled}", f"sim.num_clients={n}",
                             *extra]
                res = run_child({"kind": "inproc", "overrides": overrides, "threads": 1})
                res.update(model=model, num_clients=n, arm=arm, loadavg_after=os.getloadavg(),
                           mean_round_s=sum(res["round_s"]) / len(res["round_s"]))
                runs.append(res)
                print(f"{f'{model} N={n} {arm}'.rstrip()}: rounds {[round(x, 1) for x in res['round_s']]} s, peak "
                      f"{res['peak_tree_bytes'] / 2**20:.0f} MiB (VmHWM {res['vmhwm_bytes'] / 2**20:.0f} MiB)",
                      flush=True)
    rows, growth = [], {}
    for model in models:
        for arm in arms:
            mine = [r for r in runs if r["model"] == model and r["arm"] == arm]
            base = mine[0]
            for r in mine:
                extra = r["num_clients"] - base["num_clients"]
                per = (r["vmhwm_bytes"] - base["vmhwm_bytes"]) / extra if extra else 0.0
                rows.append([f"{model} N={r['num_clients']} {arm}".rstrip(),
                             f"{r['mean_round_s']:.1f}", f"{r['round_s'][-1]:.1f}",
                             f"{r['peak_tree_bytes'] / 2**20:.0f}", f"{r['vmhwm_bytes'] / 2**20:.0f}",
                             f"{per / 2**10:.1f}" if extra else "-"])
            last = mine[-1]
            if last["num_clients"] != base["num_clients"]:
                growth[f"{model} {arm}".rstrip()] = ((last["vmhwm_bytes"] - base["vmhwm_bytes"])
                                                     / (last["num_clients"] - base["num_clients"]))
    load = os.getloadavg()
    print_table(f"sim_scale: {sampled} clients sampled per round, 2 rounds x 2 steps (load avg {load[0]:.1f})",
                ["run", "mean s/round", "last round s", "peak tree MiB", "VmHWM MiB", "KiB per extra client"], rows)
    name = "sim_scale" + ("_many" if args.many else "") + ("_quick" if args.quick else "") + ".json"
    path = write_json(name, {
        "common": COMMON, "sampled": sampled, "arms": arms, "models": {m: MODELS[m] for m in models}, "runs": runs,
        "bytes_per_extra_client": growth, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"bytes per extra client: { {m: round(v) for m, v in growth.items()} }; wrote {path}")


if __name__ == "__main__":
    main()
