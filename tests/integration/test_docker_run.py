"""The Docker kit built and run for real (issue 17, item 8): both images, then a one-round federation of a
server and two site containers on a private network (``scripts/docker_smoke.py``).

It needs a container engine that can run a container here, and a base image: ``FEDTUNE_DOCKER_BASE_IMAGE``,
else the Dockerfiles' ``python:3.11-slim`` if the engine has it or can pull it, else
``localhost/fedtune-base:bookworm`` (made by ``scripts/docker_base.sh`` on a machine without a registry).
With a local base image and podman the build uses this machine's pip indexes (``--host-pip``), as does
``FEDTUNE_DOCKER_HOST_PIP=1``. Otherwise the test is skipped, naming what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.integration]
ROOT = Path(__file__).parents[2]
DEFAULT_BASE, LOCAL_BASE = "python:3.11-slim", "localhost/fedtune-base:bookworm"


def runs(engine: str, image: str) -> str | None:
    """Why ``engine`` cannot run ``image`` (None: it can)."""
    try:
        p = subprocess.run([engine, "run", "--rm", "--entrypoint", "python3", image, "-c", "print(1)"],
                           capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return f"{engine} run {image}: no answer within 300 s"
    return None if p.returncode == 0 and p.stdout.strip() == "1" else f"{engine} run {image}: {p.stderr.strip()[-300:]}"


def test_two_site_containers_and_a_server_container_run_a_round() -> None:
    engine = next((e for e in ("podman", "docker") if shutil.which(e)), None)
    if engine is None:
        pytest.skip("no container engine (podman or docker) on PATH")
    base = os.environ.get("FEDTUNE_DOCKER_BASE_IMAGE")
    problems = []
    for candidate in [base] if base else [DEFAULT_BASE, LOCAL_BASE]:
        problem = runs(engine, candidate)
        if problem is None:
            base = candidate
            break
        problems.append(problem)
    else:
        pytest.skip("no container can run here: " + "; ".join(problems)
                    + " (make a local base image with scripts/docker_base.sh, or set FEDTUNE_DOCKER_BASE_IMAGE)")
    host_pip = os.environ.get("FEDTUNE_DOCKER_HOST_PIP") == "1" or (engine == "podman" and base != DEFAULT_BASE)
    cmd = [sys.executable, str(ROOT / "scripts" / "docker_smoke.py"), "--engine", engine, "--timeout", "900",
           *(["--base-image", base] if base != DEFAULT_BASE else []), *(["--host-pip"] if host_pip else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=5400, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    assert "one round over containers: clients_ok=2" in p.stdout
    for role in ("server", "site-1", "site-2"):
        assert f"--- {role} (exit 0)" in p.stdout
    assert "node site-1: round 1 train" in p.stdout and "the federation is done after round 1" in p.stdout
