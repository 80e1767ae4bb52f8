"""Generated protobuf code is committed; it must be exactly what scripts/gen_protos.sh produces now."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "fedtune" / "transport" / "_proto"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in GENERATED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    stale = [n for n in names if not filecmp.cmp(tmp_path / n, GENERATED / n, shallow=False)]
    assert not stale, f"{stale} differ from protos/: run scripts/gen_protos.sh and commit the result"


def test_generated_code_uses_relative_imports():
    for path in GENERATED.glob("*.py"):
        assert "from fedtune.v1 import" not in path.read_text(), path.name


def test_protobuf_stays_inside_transport():
    """Protobuf types never leave fedtune/transport/ (DESIGN.md section 2)."""
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "fedtune").rglob("*.py")
        if "transport" not in p.relative_to(ROOT / "fedtune").parts
        and ("_pb2" in p.read_text() or "google.protobuf" in p.read_text())
    ]
    assert offenders == []
