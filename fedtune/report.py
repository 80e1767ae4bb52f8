"""What a federated run shows: live progress bars, one line per round, ``plot.png`` and a summary table.

Shared by ``fedtune simulate`` and ``fedtune server`` (and anything else the round driver runs for).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.untrusted import MAX_NAME, clean, shown


class RunProgress:
    """Two live bars on a terminal: rounds done, and clients answered in the current round.

    Disabled (prints nothing) when the console is not a terminal; the per-round lines are printed either way.
    """

    def __init__(self, console: Console, total_rounds: int, done_rounds: int) -> None:
        self.progress = Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                                 disable=not console.is_terminal)
        self.rounds: TaskID = self.progress.add_task("rounds", total=total_rounds, completed=done_rounds, note="")
        self.clients: TaskID = self.progress.add_task("clients", total=0, note="")
        self._round, self._ok, self._failed = 0, 0, 0

    def __enter__(self) -> Self:
        self.progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(kind, exc, tb)

    def start_round(self, rnd: int, num_clients: int) -> None:
        self._round, self._ok, self._failed = rnd, 0, 0
        self.progress.update(self.clients, total=num_clients, completed=0, note=f"round {rnd}")

    def client_done(self, cid: str, error: str | None) -> None:
        """Count one client of the round as answered (``error`` None) or failed."""
        self._ok += error is None
        self._failed += error is not None
        self.progress.update(self.clients, advance=1,
                             note=f"round {self._round}: {self._ok} replied, {self._failed} failed (last: {shown(cid, MAX_NAME)})")

    def end_round(self, eval_loss: float | None) -> None:
        note = "" if eval_loss is None else f"eval_loss {eval_loss:.4f}"
        self.progress.update(self.rounds, advance=1, note=note)


def write_plot(history: list[dict[str, Any]], path: Path) -> None:
    """Eval loss (or accuracy) and cumulative bytes per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in history if "round" in r and "client" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    key = "accuracy" if any("accuracy" in r for r in rounds) else "eval_loss"
    pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    if pts:
        ax1.plot(*zip(*pts, strict=True), marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel(key)
    ax1.set_title(f"global {key}")
    cum, total = [], 0.0
    for r in rounds:
        total += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
        cum.append((r["round"], total / 2**20))
    if cum:
        ax2.plot(*zip(*cum, strict=True), marker="o")
    ax2.set_xlabel("round")
    ax2.set_ylabel("MiB (up + down, cumulative)")
    ax2.set_title("communication")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# (header, metrics.jsonl key, format, divisor): the per-round columns every summary table draws from
COLUMNS = {
    "round": ("round", "round", "d", 1), "eval_loss": ("eval_loss", "eval_loss", ".4f", 1),
    "accuracy": ("accuracy", "accuracy", ".3f", 1), "agg_error": ("agg_error", "agg_error", ".2e", 1),
    "ok": ("ok", "clients_ok", "d", 1), "failed": ("failed", "clients_failed", "d", 1),
    "rejected": ("rejected", "rejected", "d", 1), "up": ("MiB up", "bytes_up", ".2f", 2**20),
    "down": ("MiB down", "bytes_down", ".2f", 2**20), "s": ("s", "seconds", ".1f", 1),
    "ratio": ("x fp32", "compression_ratio", ".1f", 1),
}


def round_table(title: str, rounds: list[dict[str, Any]], columns: list[str]) -> Table:
    """One row per round record, the chosen ``COLUMNS``; missing values show as ``-``."""
    rows = []
    for r in rounds:
        cells = []
        for name in columns:
            _, key, spec, div = COLUMNS[name]
            v = r.get(key)
            cells.append("-" if v is None else format(v / div if div != 1 else v, spec))
        rows.append(cells)
    # no vertical rules and every column at least as wide as its widest value: on a narrow terminal the
    # headers fold, a value is never cut ("1.22e-…") or split
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for i, name in enumerate(columns):
        table.add_column(COLUMNS[name][0], justify="right", overflow="fold",
                         min_width=max([len(row[i]) for row in rows], default=1))
    for cells in rows:
        table.add_row(*cells)
    return table


def round_line(record: dict[str, Any], total_rounds: int) -> str:
    """The line printed after each round: eval loss, clients, aggregation error, bytes and time."""
    loss, err = record.get("eval_loss"), record.get("agg_error")
    rejected = f"rejected={record['rejected']} " if "rejected" in record else ""
    eps = f"epsilon={record['epsilon']:.3f} " if record.get("epsilon") is not None else ""
    return (f"round {record['round']}/{total_rounds}: eval_loss={'-' if loss is None else f'{loss:.4f}'} "
            f"ok={record['clients_ok']} failed={record['clients_failed']} {rejected}"
            f"{'' if record.get('applied', True) else '(not applied) '}"
            f"agg_error={'-' if err is None else f'{err:.2e}'} {eps}"
            f"up={record['bytes_up'] / 2**20:.2f} MiB down={record['bytes_down'] / 2**20:.2f} MiB "
            f"{record['seconds']:.1f} s")


def print_summary(console: Console, title: str, result: Any) -> None:
    """A table of the run's rounds, eval before -> after, bytes against full-model FedAvg, sample answers.

    ``result`` is a ``fedtune.rounds.RunResult`` (``rounds``, ``before``, ``after``, ``run_dir``, ``prompts``,
    ``samples_before``, ``samples_after``, ``notes``). A column shows when any round has its value.
    """
    rounds = [r for r in result.rounds if r.get("round", 0) >= 1 and "client" not in r and not r.get("local_only_mean")]
    optional = {"accuracy": "accuracy", "agg_error": "agg_error", "rejected": "rejected", "ratio": "compression_ratio"}
    columns = [c for c in ("round", "eval_loss", "accuracy", "agg_error", "ok", "failed", "rejected", "up", "down",
                           "ratio", "s")
               if c not in optional or any(optional[c] in r for r in rounds)]
    console.print(round_table(title, rounds, columns))
    for key in ("eval_loss", "accuracy"):
        if result.before.get(key) is not None and result.after.get(key) is not None:
            console.print(f"{key}: {result.before[key]:.4f} -> {result.after[key]:.4f}")
    spent = [r for r in rounds if r.get("epsilon") is not None]
    if spent:
        console.print(f"privacy: epsilon {spent[-1]['epsilon']:.3f} at delta {spent[-1].get('delta'):g} after "
                      f"{spent[-1].get('dp_rounds', len(spent)):.0f} DP rounds (privacy.json)", highlight=False)
    up = sum(r.get("bytes_up") or 0 for r in rounds)
    down = sum(r.get("bytes_down") or 0 for r in rounds)
    full = sum(r.get("full_model_bytes") or 0 for r in rounds)
    if full:
        console.print(f"communication: {(up + down) / 2**20:.1f} MiB in total; full-model FedAvg would have sent "
                      f"{full / 2**20:.0f} MiB ({full / max(1.0, up + down):.0f}x more)")
    dense = sum(r.get("dense_fp32_bytes") or 0 for r in rounds)
    if dense and up + down:
        console.print(f"compression: {dense / (up + down):.1f}x fewer bytes than dense fp32 adapters "
                      f"({dense / 2**20:.2f} MiB)")
    for prompt, b, a in zip(result.prompts, result.samples_before, result.samples_after, strict=False):
        console.print(f"[bold]Q:[/] {escape(prompt)}\n  [dim]before:[/] {escape(b)}\n  [green]after:[/]  {escape(a)}")
    for note in result.notes:
        console.print(clean(note), highlight=False, markup=False)
    console.print(f"run folder: {result.run_dir} (config.toml, metrics.jsonl, adapter/, plot.png)", highlight=False)
