"""What ``fedtune server`` prints at the end: one row per round and where the run folder is."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_server_summary(console: Console, cfg: Any, result: Any) -> None:
    table = Table(title=f"fedtune server: strategy={cfg.strategy.name}, {cfg.federation.rounds} rounds, "
                        f"min_clients={cfg.federation.min_clients}")
    for col in ("round", "eval_loss", "agg_error", "ok", "failed", "rejected", "MiB up", "MiB down", "s"):
        table.add_column(col, justify="right")

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in result.rounds:
        if r.get("round", 0) < 1:
            continue
        table.add_row(str(r["round"]), fmt(r.get("eval_loss"), ".4f"), fmt(r.get("agg_error"), ".2e"),
                      fmt(r.get("clients_ok"), "d"), fmt(r.get("clients_failed"), "d"), fmt(r.get("rejected"), "d"),
                      fmt((r.get("bytes_up") or 0) / 2**20, ".2f"), fmt((r.get("bytes_down") or 0) / 2**20, ".2f"),
                      fmt(r.get("seconds"), ".1f"))
    console.print(table)
    first = next((r for r in result.rounds if r.get("round") == 0), None)
    last = result.rounds[-1] if result.rounds else None
    if first and last and first.get("eval_loss") is not None and last.get("eval_loss") is not None:
        console.print(f"eval_loss: {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
    for msg in result.refused:
        console.print(f"refused at registration: {msg}", highlight=False)
    console.print(f"run folder: {result.run_dir} (config.toml, metrics.jsonl, adapter/, plot.png)", highlight=False)
