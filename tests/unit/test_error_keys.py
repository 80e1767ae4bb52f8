"""Every config key an error message names is a key the user can set (issue 17, item 6).

The messages are collected from the source: every string in a ``raise``, a problem list's ``append`` /
``extend``, a ``print`` or a log warning, in every module of ``fedtune``. A dotted word ``section.key`` in them
must be a key of the config reference (``fedtune config``), a file name, or a name listed below as not a key.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fedtune.config import describe, load_config

PACKAGE = Path(__file__).parents[2] / "fedtune"
TOKEN = re.compile(r"(?<![\w./`-])([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)(?![\w(/])")
FILE_SUFFIXES = {"json", "jsonl", "toml", "txt", "pem", "key", "pt", "png", "safetensors", "gguf", "py"}
NOT_KEYS = {"e.g", "grpc.ssl_target_name_override"}  # prose and a gRPC channel option
# filled in from other sections by ``strategies.strategy_config``: a message must name the key the user sets
DERIVED = {"strategy.quantized_base", "strategy.r", "strategy.lora_alpha", "strategy.use_rslora"}


def _message_strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target: ast.AST = node.exc
        elif isinstance(node, ast.Call) and (
                isinstance(node.func, ast.Attribute) and node.func.attr in ("append", "extend", "print", "warning",
                                                                             "error")
                or isinstance(node.func, ast.Name) and node.func.id in ("print", "ConfigError")):
            target = node
        else:
            continue
        for sub in ast.walk(target):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                yield node.lineno, sub.value


def named_keys() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_proto" in path.parts:
            continue
        for line, text in _message_strings(ast.parse(path.read_text())):
            for m in TOKEN.finditer(text):
                if m.group(2) not in FILE_SUFFIXES and m.group(0) not in NOT_KEYS:
                    found.setdefault(m.group(0), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return found


def test_every_key_named_in_a_message_is_a_real_config_key():
    keys = {row[0] for row in describe()} - DERIVED
    found = named_keys()
    assert len(found) > 50  # the scan sees the messages (config, strategies, data, client, server)
    wrong = {k: where for k, where in found.items() if k not in keys}
    assert not wrong, "messages name keys that do not exist:\n" + "\n".join(
        f"  {k}: {', '.join(where)}" for k, where in sorted(wrong.items()))


def test_the_scan_catches_the_names_issue_17_found():
    tree = ast.parse('raise ValueError("lower simulation.num_clients or partition.alpha")\n'
                     'p.append(f"strategy.quantized_base: {x}")\n')
    texts = " ".join(t for _, t in _message_strings(tree))
    assert {m.group(0) for m in TOKEN.finditer(texts)} == {"simulation.num_clients", "partition.alpha",
                                                          "strategy.quantized_base"}


def test_fedex_on_a_4bit_base_names_quant_mode_before_anything_loads():
    import pytest

    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match=r"quant\.mode: strategy\.name=fedex .* nf4 base .* quant\.mode = \"none\""):
        load_config(None, ["strategy.name=fedex", "quant.mode=nf4"])
    load_config(None, ["strategy.name=fedex", "quant.mode=none"])


def test_help_has_no_restructuredtext_markup():
    """``fedtune COMMAND --help`` is read in a terminal: no ``literal`` or :role:`x` markup (issue 17, item 9)."""
    import argparse

    from fedtune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in {"fedtune": parser, **sub.choices}.items():
        text = p.format_help()
        assert not re.search(r"``|:[a-z]+:`", text), f"{name} --help:\n{text}"
