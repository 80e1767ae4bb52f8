"""``fedtune flower-app DIR``: a ready Flower App folder that runs fedtune inside an existing Flower deployment.

The folder holds ``pyproject.toml`` (the app's components and its one run-config key, ``overrides``), a
two-line ServerApp and ClientApp that point at ``fedtune.flower.app``, and the federation's fedtune config
(``fedtune_app/fedtune.toml``, with the run folder and the server's data made absolute). Every machine that
runs it needs fedtune installed (the SuperLink's ServerApp and each SuperNode's ClientApp import it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedtune.config import Config, save_config

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "fedtune federated finetuning as a Flower App"
license = "Apache-2.0"
dependencies = []  # fedtune must be installed where the SuperLink and the SuperNodes run

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune_app.server:app"
clientapp = "fedtune_app.client:app"

[tool.flwr.app.config]
# fedtune overrides on top of fedtune_app/fedtune.toml, e.g.
# flwr run . my-superlink -c 'overrides="federation.rounds=5 out=/srv/runs/x"'
overrides = ""
"""

SERVER = '''"""The ServerApp: fedtune's round driver over Flower's Grid (``fedtune.flower.app``)."""

from pathlib import Path

from fedtune.flower.app import make_server_app

app = make_server_app(Path(__file__).with_name("fedtune.toml"))
'''

CLIENT = '''"""The ClientApp: a fedtune node on this SuperNode's data (``fedtune.flower.app``)."""

from pathlib import Path

from fedtune.flower.app import make_client_app

app = make_client_app(Path(__file__).with_name("fedtune.toml"))
'''


def write_app(folder: Path, cfg: Config, name: str = "fedtune-app") -> list[Path]:
    """Write the app folder for ``cfg`` into ``folder`` (created); returns the files written.

    Raises:
        FileExistsError: ``folder`` already holds a ``pyproject.toml`` (nothing is overwritten).
    """
    if (folder / "pyproject.toml").exists():
        raise FileExistsError(f"{folder} already holds a pyproject.toml: choose an empty folder")
    data = dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve())) if cfg.data.path else cfg.data
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()), data=data)
    package = folder / "fedtune_app"
    package.mkdir(parents=True, exist_ok=True)
    files = {folder / "pyproject.toml": PYPROJECT.format(name=name), package / "__init__.py": "",
             package / "server.py": SERVER, package / "client.py": CLIENT}
    for path, text in files.items():
        path.write_text(text)
    save_config(cfg, package / "fedtune.toml")
    return [*files, package / "fedtune.toml"]
