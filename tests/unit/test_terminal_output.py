"""Tables read whole on an 80-column terminal (issue 17, item 9)."""

from __future__ import annotations

from rich.console import Console

from fedtune.data.partition import render_partition_table
from fedtune.report import COLUMNS, round_table


def render(table, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text().splitlines()


def test_summary_values_are_never_cut_at_80_columns():
    rounds = [{"round": r, "eval_loss": 2.123456, "accuracy": 0.5, "agg_error": 1.2345e-3, "clients_ok": 8,
               "clients_failed": 0, "rejected": 0, "bytes_up": 123456789, "bytes_down": 98765432, "seconds": 12.34}
              for r in range(3)]
    lines = render(round_table("summary", rounds, list(COLUMNS)))
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    assert "…" not in text
    for value in ("2.1235", "0.500", "1.23e-03", "117.74", "94.19", "12.3"):
        assert text.count(value) == 3, value  # whole, on each round's line


def test_clients_x_categories_is_transposed_when_categories_outnumber_clients():
    cats = [f"category-{k:02d}" for k in range(21)]  # as ChatterBot's 21 files
    labels = [c for c in cats for _ in range(5)]
    parts = [list(range(i, len(labels), 4)) for i in range(4)]
    lines = render(render_partition_table(parts, labels, title="clients x categories"))
    assert all(len(line) <= 80 for line in lines), max(len(line) for line in lines)
    text = "\n".join(lines)
    assert "…" not in text and "a row per category" in text
    assert all(c in text for c in cats)
    assert text.splitlines()[-2].strip("│ ").split()[-1] == "105"  # the grand total


def test_few_categories_keep_a_row_per_client():
    lines = render(render_partition_table([[0, 1], [2, 3]], ["a", "b", "a", "b"]))
    assert "a row per category" not in "\n".join(lines)


def test_a_table_wider_than_the_console_is_split_not_squeezed():
    """30 clients and 19 categories: no orientation fits 80 columns, so the table comes in parts, each with
    every value whole (squeezed, rich printed some columns zero characters wide and their counts vanished)."""
    cats = [f"category-{name}" for name in ("ai", "botprofile", "computers", "conversations", "emotion", "food",
                                            "gossip", "greetings", "health", "history", "humor", "literature",
                                            "money", "movies", "politics", "psychology", "science", "sports", "trivia")]
    labels = [cats[(7 * i) % len(cats)] for i in range(1200)]
    parts = [list(range(i, 1200, 30)) for i in range(30)]
    lines = render(render_partition_table(parts, labels, title="clients x categories"))
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    assert "part 1 of" in text and "…" not in text
    for cat in cats:  # each category's row, name whole, in every part
        assert sum(cat in line for line in lines) == text.count("part "), cat
    cells = [cell.strip() for line in lines if line.startswith("│") for cell in line.strip("│").split("│")]
    # every count, the row and column totals and the grand total, each printed once
    assert "1200" in cells and sum(int(c) for c in cells if c.isdigit()) == 4 * 1200
