"""Network text made safe to keep and show (fedtune.untrusted), and the one node-name rule (fedtune.names)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from fedtune.cli_federation import main as federation_cli
from fedtune.config import ConfigError, load_config
from fedtune.names import check_name, name_problem
from fedtune.report import RunProgress
from fedtune.transport.keys import create_keys, read_allowlist, revoke_node
from fedtune.untrusted import MAX_ERROR, clean, shown

CONTROL = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x202E, 0x2066)]


@given(st.text(alphabet=st.sampled_from([*"[]/\\@#=x ab", *CONTROL]), max_size=200), st.integers(1, 300))
@example("\\[", 2)  # a backslash before a "[" that opens no tag: rich dropped it
def test_shown_text_renders_as_its_cleaned_self(text: str, limit: int) -> None:
    out = clean(text, limit)
    # never a MarkupError, never a style (rich doubles a trailing backslash, so it cannot escape what follows)
    assert Text.from_markup(shown(text, limit)).plain.rstrip("\\") == out.rstrip("\\")
    assert not any(c in out for c in CONTROL)
    assert len(out) <= 6 * limit + 40  # each control character becomes at most a 6-character escape


def test_clean_bounds_and_makes_controls_visible() -> None:
    assert clean("a\nb\x1b[2J\u202e") == "a\\x0ab\\x1b[2J\\u202e"
    big = clean("x" * 10 * MAX_ERROR)
    assert big == "x" * MAX_ERROR + f"... ({9 * MAX_ERROR} more characters)"
    assert shown("[/x] [bold]") == "\\[/x] \\[bold]"


def test_progress_bars_at_a_terminal_show_a_markup_node_name() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with RunProgress(console, 2, 0) as bars:
        bars.start_round(1, 2)
        bars.client_done("[/x]\x1b[2J", "boom [/x]")
        console.print("round 1 done", highlight=False)
    assert "[/x]\\x1b[2J" in out.getvalue()


@pytest.mark.parametrize("name", ["site-a", "client-0", "A.b_c", "x" * 64])
def test_valid_node_names(name: str) -> None:
    assert name_problem(name) is None and check_name(name) == name


@pytest.mark.parametrize("name", ["", "a#b", "a b", "x[/x]", ".hidden", "-a", "a/b", "a,b", "é", "x" * 65, "a\n"])
def test_invalid_node_names_say_what_a_name_may_hold(name: str) -> None:
    with pytest.raises(ValueError, match="is not valid: use 1-64 letters, digits"):
        check_name(name)


def test_keys_refuse_a_bad_name_before_writing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert federation_cli(["keys", str(tmp_path / "k"), "--nodes", "a#b"]) == 2
    assert "node name 'a#b' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
    keys = create_keys(tmp_path / "k", ["site-a", "site_b.2"])
    assert sorted(read_allowlist(keys / "allowlist.txt")) == ["site-a", "site_b.2"]
    with pytest.raises(ValueError, match="'a#b' is not valid"):
        create_keys(keys, ["site-c", "a#b"])
    assert not (keys / "nodes" / "site-c.key").exists()  # none of the batch was added
    with pytest.raises(ValueError, match="is not valid"):
        revoke_node(keys / "allowlist.txt", "a b")


def test_an_allowlist_with_a_bad_name_is_refused_naming_the_line(tmp_path: Path) -> None:
    keys = create_keys(tmp_path / "k", ["site-a"])
    allow = keys / "allowlist.txt"
    line = allow.read_text().splitlines()[-1]
    allow.write_text(allow.read_text() + line.replace("site-a", "x[/x]") + "\n")
    with pytest.raises(ValueError, match=r"allowlist.txt:3: node name 'x\[/x\]' is not valid"):
        read_allowlist(allow)


def test_client_name_follows_the_rule() -> None:
    with pytest.raises(ConfigError, match="client.name: node name 'a#b' is not valid"):
        load_config(None, ["client.name=a#b"])


def test_the_summary_prints_sample_answers_holding_markup() -> None:
    from types import SimpleNamespace

    from fedtune.report import print_summary

    out = io.StringIO()
    result = SimpleNamespace(rounds=[], before={}, after={}, run_dir="run", prompts=["say [/INST]"],
                             samples_before=["[/x] before"], samples_after=["[bold]after"], notes=["[/y] note"])
    print_summary(Console(file=out, width=200), "t", result)
    text = out.getvalue()
    assert "say [/INST]" in text and "[/x] before" in text and "[bold]after" in text and "[/y] note" in text


def test_a_logged_failure_keeps_its_frames_and_bounds_every_message() -> None:
    from fedtune.untrusted import MAX_CHAINED, failure

    def raised_from_peer() -> None:
        try:
            raise ValueError("peer said \x1b[2J" + "p" * (4 << 20))
        except ValueError as e:
            raise RuntimeError("while handling " + "q" * (1 << 20)) from e

    try:
        raised_from_peer()
    except RuntimeError as e:
        text = failure(e)
    assert len(text) < 2 * MAX_ERROR + 2000 and "\x1b" not in text and "\\x1b[2J" in text
    assert text.index("ValueError: peer said") < text.index("RuntimeError: while handling")  # the cause first
    assert text.count("in raised_from_peer") == 2 and "more characters)" in text
    chain = None
    for i in range(10):  # a long chain shows its last MAX_CHAINED exceptions
        try:
            raise KeyError(i) from chain
        except KeyError as e:
            chain = e
    assert chain is not None and failure(chain).count("Traceback") == MAX_CHAINED


def test_the_server_logs_an_internal_error_bounded(caplog: pytest.LogCaptureFixture) -> None:
    from fedtune.transport import Backoff, FederationClient, TransportError, start_server
    from fedtune.transport.testing import StaticCoordinator

    class Broken(StaticCoordinator):
        def status(self, detail=True):  # an exception whose message quotes whatever a peer sent
            raise RuntimeError("bad value " + "v" * (1 << 20))

    server = start_server(Broken(), "127.0.0.1:0", bulk_port=None)
    try:
        with FederationClient(f"127.0.0.1:{server.port}", "a", heartbeat=False, backoff=Backoff(max_attempts=1)) as fc, \
                pytest.raises(TransportError, match="internal server error in Heartbeat"):
            fc.heartbeat()
    finally:
        server.stop(grace=None)
    (record,) = [r for r in caplog.records if "Heartbeat failed" in r.getMessage()]
    assert record.exc_info is None and len(record.getMessage()) < MAX_ERROR + 2000
    assert "RuntimeError: bad value vvv" in record.getMessage() and "in status" in record.getMessage()
