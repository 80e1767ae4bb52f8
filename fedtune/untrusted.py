"""Text that came from the network, made safe to keep and to show.

A peer chooses every byte of a node name, an error message, a metric name or a tensor name. Before such a
string is stored, logged, written to ``metrics.jsonl`` or printed it goes through one of these functions:

- ``clean(text, limit)``: at most ``limit`` characters (plus a note of how many were cut), every control
  character (C0, DEL, C1, line and paragraph separators, bidirectional overrides) written as a visible
  ``\\xNN`` / ``\\uNNNN`` escape, so a peer can neither forge log lines nor drive the operator's terminal.
  For logs, JSON records and ``console.print(..., markup=False)``.
- ``shown(text, limit)``: ``clean`` and then rich-markup escaped, for places that render markup (table
  cells, progress-bar fields, ``console.print`` with markup on): ``[/x]`` prints as ``[/x]``, never raises
  ``MarkupError`` and never styles anything.

- ``failure(exc)``: an exception for the log, its traceback as usual but every message ``clean``ed (a
  message may quote what a peer sent), instead of ``log.exception``.

Limits are chosen by the kind of field, not by what arrived: the constants below.
"""

from __future__ import annotations

import re
import traceback

from rich.markup import escape

MAX_NAME = 64
"""Characters of a node name (``fedtune.names``) or a metric key kept or shown."""
MAX_ERROR = 1000
"""Characters of a node's error message (or any other free text from a peer) kept or shown."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(text: object, limit: int = MAX_ERROR) -> str:
    """``text`` cut to ``limit`` characters, control characters made visible; never raises."""
    s = text if isinstance(text, str) else str(text)
    over = len(s) - limit
    if over > 0:
        s = s[:limit]
    s = _CONTROL.sub(_visible, s)
    return f"{s}... ({over} more characters)" if over > 0 else s


def shown(text: object, limit: int = MAX_ERROR) -> str:
    """``clean(text, limit)`` escaped for rich markup: safe in tables, progress fields and markup prints."""
    # rich drops one backslash before a "[" that opens no tag ("\\[" renders "["), which escape() leaves alone
    return _LONE_BRACKET.sub(r"\\\g<0>", escape(clean(text, limit)))


_LONE_BRACKET = re.compile(r"(?<=\\)\[(?![a-z#/@][^[]*?\])")


MAX_CHAINED = 4
"""Exceptions of a chain (``raise ... from``, or raised while handling another) that ``failure`` shows."""


def failure(exc: BaseException) -> str:
    """``exc`` as a log's traceback: the frames (this program's own code) as Python prints them, each message
    bounded and escaped by ``clean``; the exceptions it was raised from first, at most ``MAX_CHAINED``."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < MAX_CHAINED:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return "\n".join("Traceback (most recent call last):\n" + "".join(traceback.format_tb(x.__traceback__))
                     + f"{type(x).__qualname__}: {clean(x)}" for x in reversed(chain))
