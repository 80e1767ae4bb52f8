"""The one rule for node names, checked wherever a name enters: ``fedtune keys``, the allow-list reader,
registration, ``client.name`` and ``fedtune status --name``.

A node name is 1 to 64 characters from letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a
digit. Such a name is one token in ``allowlist.txt`` (no ``#``, which starts a comment, no spaces), a file
name under ``nodes/`` (no slashes, no leading dot), an entry of the comma-separated lists in ``fedtune
status`` and a gRPC metadata value, and it prints the same everywhere (no markup, no control characters).
"""

from __future__ import annotations

import re

from fedtune.untrusted import MAX_NAME, clean

NODE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
RULE = (f"1-{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit "
        "(e.g. site-a, client-0)")


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid node name (the message quotes it, bounded), or None when it is."""
    if isinstance(name, str) and NODE_NAME.fullmatch(name):
        return None
    return f"node name {clean(name, MAX_NAME)!r} is not valid: use {RULE}"


def check_name(name: object) -> str:
    """``name`` when it is a valid node name.

    Raises:
        ValueError: it is not (the message says what a name may hold).
    """
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    assert isinstance(name, str)
    return name
