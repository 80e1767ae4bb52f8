"""The optional ``privacy`` extra (dp-accounting) is needed only by a run that asks for DP (found building the
Docker images, which install no extras: `fedtune server` failed at start with ModuleNotFoundError)."""

from __future__ import annotations

import subprocess
import sys

WITHOUT_DP_ACCOUNTING = "import sys; sys.modules['dp_accounting'] = None\n"  # import dp_accounting now fails


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_DP_ACCOUNTING + code], capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_server_without_dp_accounting_wraps_its_strategy_and_dp_says_what_to_install() -> None:
    p = run("from fedtune.privacy.wrap import with_privacy\n"
            "from fedtune.server.loop import run_server\n"
            "from fedtune.privacy.accounting import epsilon\n"
            "try:\n    epsilon(0.1, 1.0, 10, 1e-5)\nexcept ImportError as e:\n    print(e)\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "privacy.dp=central needs dp-accounting: pip install 'fedtune[privacy]'"
