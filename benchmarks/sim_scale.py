"""How fedtune's one-process simulation scales with the number of virtual clients.

8, 32 and 128 virtual clients (iid split of ChatterBot), 4 sampled per round, 2 rounds of 2 local steps, on the
tiny random Llama and on SmolLM2-135M NF4. Each run is a child process; the peak is its resident memory (the
process tree, sampled every 0.1 s, and the kernel's VmHWM). Memory should grow only by per-client state
(the client's tokenized share and, with sim.keep_optimizer_state, its optimizer state), never by a model.

    .venv/bin/python benchmarks/sim_scale.py [--quick]
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
          "sim.partitioner=iid", "sim.clients_per_round=4", "sim.rounds=2", "eval.samples=0", "eval.max_batches=1",
          "eval.batch_size=4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama only, 8 and 32 clients")
    args = ap.parse_args()
    sizes = [8, 32] if args.quick else [8, 32, 128]
    models = ["tiny-llama"] if args.quick else list(MODELS)
    load_before = os.getloadavg()
    runs = []
    for model in models:
        for n in sizes:
            spec = {"kind": "inproc", "overrides": [*MODELS[model], *COMMON, f"sim.num_clients={n}"], "threads": 1}
            res = run_child(spec)
            res.update(model=model, num_clients=n, loadavg_after=os.getloadavg())
            runs.append(res)
            print(f"{model} N={n}: rounds {[round(x, 1) for x in res['round_s']]} s, "
                  f"peak {res['peak_tree_bytes'] / 2**20:.0f} MiB (VmHWM {res['vmhwm_bytes'] / 2**20:.0f} MiB)",
                  flush=True)
    rows, growth = [], {}
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        base = mine[0]
        for r in mine:
            extra = r["num_clients"] - base["num_clients"]
            per = (r["vmhwm_bytes"] - base["vmhwm_bytes"]) / extra if extra else 0.0
            rows.append([f"{model} N={r['num_clients']}", f"{sum(r['round_s']) / len(r['round_s']):.1f}",
                         f"{r['peak_tree_bytes'] / 2**20:.0f}", f"{r['vmhwm_bytes'] / 2**20:.0f}",
                         f"{per / 2**10:.1f}" if extra else "-"])
        last = mine[-1]
        growth[model] = (last["vmhwm_bytes"] - base["vmhwm_bytes"]) / (last["num_clients"] - base["num_clients"])
    load = os.getloadavg()
    print_table(f"sim_scale: 4 clients sampled per round, 2 rounds x 2 steps (load avg {load[0]:.1f})",
                ["run", "s/round", "peak tree MiB", "VmHWM MiB", "KiB per extra client"], rows)
    path = write_json("sim_scale_quick.json" if args.quick else "sim_scale.json", {
        "common": COMMON, "models": {m: MODELS[m] for m in models}, "runs": runs,
        "bytes_per_extra_client": growth, "loadavg_before": load_before, "loadavg": load,
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"bytes per extra client: { {m: round(v) for m, v in growth.items()} }; wrote {path}")


if __name__ == "__main__":
    main()
