"""What ``fedtune server`` prints at the end: one row per round and where the run folder is."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedtune.simulation.report import round_table


def print_server_summary(console: Console, cfg: Any, result: Any) -> None:
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1]
    table = round_table(f"fedtune server: strategy={cfg.strategy.name}, {cfg.federation.rounds} rounds, "
                        f"min_clients={cfg.federation.min_clients}", rounds,
                        ["round", "eval_loss", "agg_error", "ok", "failed", "rejected", "up", "down", "s"])
    console.print(table)
    first = next((r for r in result.rounds if r.get("round") == 0), None)
    last = result.rounds[-1] if result.rounds else None
    if first and last and first.get("eval_loss") is not None and last.get("eval_loss") is not None:
        console.print(f"eval_loss: {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
    for msg in result.refused:
        console.print(f"refused at registration: {msg}", highlight=False)
    console.print(f"run folder: {result.run_dir} (config.toml, metrics.jsonl, adapter/, plot.png)", highlight=False)
