"""The README's one-machine federation, run verbatim (issue 17, item 2): keys, a TLS server, two sites."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).parents[2]


def readme_trial() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run a real federation (gRPC)"):]
    return re.search(r"A trial on one machine.*?```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_the_block_is_the_one_machine_trial():
    lines = readme_trial().splitlines()
    assert lines[0].startswith("source .venv/bin/activate")
    assert lines[1].startswith("fedtune keys keys --nodes site-a,site-b --server-host coord.example.org")
    assert any("client.keys_dir=keys/sites/site-a" in line for line in lines)


def test_readme_federation_runs_verbatim_on_loopback(tmp_path: Path):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 7070)) == 0:
            pytest.skip("127.0.0.1:7070 (server/server.toml's address) is in use on this machine")
    for kit in ("server", "client"):
        shutil.copytree(ROOT / kit, tmp_path / kit)
    # the block activates the clone's .venv: this one's, or a stand-in that puts this interpreter first on PATH
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").is_file():
        (tmp_path / ".venv").symlink_to(venv)
    else:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / ".venv" / "bin" / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    (tmp_path / "trial.sh").write_text("set -e\n" + readme_trial())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "trial.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "keys" / "sites" / "site-a" / "nodes" / "site-a.key").is_file()
    run = tmp_path / "runs" / "federation"
    rounds = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"round"' in line]
    assert len(rounds) == 4, out[-4000:]  # round 0 (before) and server/server.toml's 3 rounds
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert out.count("the federation is done") == 2, out[-4000:]
    assert "TLS, allow-list" in " ".join(out.split())
