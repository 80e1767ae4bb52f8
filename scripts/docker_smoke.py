#!/usr/bin/env python3
"""Build the Docker kit's two images and run a one-round federation of a server and two site containers.

    python scripts/docker_smoke.py [--engine podman|docker] [--base-image IMAGE] [--host-pip] [--keep]

What it does, as a user of ``docker/`` would: builds ``docker/Dockerfile.server`` and ``docker/Dockerfile.client``
(from the repository root, ``BASE_IMAGE`` as given), makes the keys with ``fedtune keys`` inside the server
image (certificate valid for the host name ``server``), writes a small JSONL file for each site, starts the
server and two sites on a private container network with the mounts ``docker/compose.yaml`` uses
(``server/server.toml`` and ``client/client.toml`` as /config, TLS and node signatures on), waits for every
container to exit, and checks that all three exited 0 and that the run's ``metrics.jsonl`` holds round 1 with
both sites' updates. Containers and the network are removed afterwards (``--keep`` leaves them and the work
folder for a look).

``--host-pip`` (podman only: ``docker build`` cannot mount folders) builds with this machine's pip settings:
its configuration file, certificate bundle, local indexes and wheel folders are mounted read-only into the
build, and torch comes from them (``TORCH_INDEX`` empty), for a machine that reaches no registry.
``--base-image`` replaces ``python:3.11-slim``, e.g. a Debian made with ``debootstrap`` and ``podman import``
(see ``docker/README.md``).

Exit status 0 when the federation ran; 1 with the failing step and the containers' logs otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-1", "site-2")
QA = [("What is a federation?", "Sites that train one model together without sharing their data."),
      ("What does a site send?", "Only its adapter update, never its records."),
      ("Who aggregates the updates?", "The coordinator, once every round."),
      ("What is LoRA?", "Low-rank adapters trained on top of a frozen base model.")]


class SmokeFailed(RuntimeError):
    pass


def run(cmd: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise SmokeFailed(f"{cmd[0]} {cmd[1]} exited {p.returncode}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p


def pick_engine(name: str | None) -> str:
    for engine in ([name] if name else ["podman", "docker"]):
        if shutil.which(engine):
            return engine
    raise SmokeFailed(f"no container engine found ({name or 'podman or docker'} not on PATH)")


def engine_problem(engine: str, image: str) -> str | None:
    """Why ``engine`` cannot run ``image`` here (None: it can): no daemon, no runtime, no image."""
    try:
        p = run([engine, "run", "--rm", "--entrypoint", "python3", image, "-c", "print(1)"], timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return f"{engine} run {image} did not finish within 300 s"
    if p.returncode != 0 or p.stdout.strip() != "1":
        return f"{engine} run {image} failed: {(p.stderr or p.stdout).strip()[-500:]}"
    return None


def _pip_settings() -> dict[str, str]:
    """This machine's pip settings (``pip config list``: files and PIP_* variables), key -> value."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=False).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    return settings


def host_pip_options(work: Path) -> list[str]:
    """``podman build`` options that give the build this machine's pip settings (see the module docstring)."""
    settings = _pip_settings()
    mounts: set[str] = set()
    conf = ["[global]"]
    for key in ("index-url", "extra-index-url", "find-links", "constraint"):
        values = settings.get(key, "").split()
        if not values:
            continue
        for v in values:
            local = Path(v.removeprefix("file://"))
            if local.is_absolute():  # an index's pages link to files beside it: mount the folder above it
                mounts.add(str(local.parent if "index-url" in key or not local.is_dir() else local))
        conf.append(f"{key} = {' '.join(values)}")
    if settings.get("cert"):
        conf.append("cert = /etc/pip-host/ca.crt")
    (work / "pip.conf").write_text("\n".join(conf) + "\n")
    opts = ["--build-arg", "TORCH_INDEX=", "-v", f"{work / 'pip.conf'}:/etc/pip.conf:ro"]
    if settings.get("cert"):
        opts += ["-v", f"{settings['cert']}:/etc/pip-host/ca.crt:ro"]
    for m in sorted(mounts):
        opts += ["-v", f"{m}:{m}:ro"]
    return opts


def build(engine: str, base: str | None, extra: list[str], tag: str) -> dict[str, str]:
    images = {}
    for kind in ("server", "client"):
        image = f"fedtune-{kind}:{tag}"
        args = ["--build-arg", f"BASE_IMAGE={base}"] if base else []
        start = time.monotonic()
        run([engine, "build", "-f", f"docker/Dockerfile.{kind}", "-t", image, *args, *extra, str(ROOT)], timeout=3600)
        print(f"built {image} in {time.monotonic() - start:.0f} s", flush=True)
        images[kind] = image
    return images


def federation(engine: str, images: dict[str, str], work: Path, keep: bool, timeout: float) -> dict:
    """One round: the server and two sites on a private network; returns the run's round-1 record."""
    net = f"fedtune-smoke-{os.getpid()}"
    names = {"server": f"{net}-server", **{s: f"{net}-{s}" for s in SITES}}
    run([engine, "run", "--rm", "-v", f"{work}:/w", "--entrypoint", "fedtune", images["server"], "keys", "/w/keys",
         "--nodes", ",".join(SITES), "--server-host", "server"])
    for site in SITES:
        (work / "data" / site).mkdir(parents=True)
        (work / "state" / site).mkdir(parents=True)
        lines = [json.dumps({"prompt": q, "response": f"{a} ({site}, {i})"}) for i in range(3) for q, a in QA]
        (work / "data" / site / "train.jsonl").write_text("\n".join(lines) + "\n")
    (work / "runs").mkdir()
    run([engine, "network", "create", net])
    try:
        run([engine, "run", "-d", "--name", names["server"], "--network", net, "--network-alias", "server",
             "-v", f"{work / 'keys'}:/keys:ro", "-v", f"{ROOT / 'server'}:/config:ro", "-v", f"{work / 'runs'}:/runs",
             images["server"], "/config/server.toml", "server.address=0.0.0.0:7443", "server.bulk_port=7444",
             "server.keys_dir=/keys", "out=/runs/federation", "federation.rounds=1", "federation.min_clients=2"])
        for site in SITES:
            run([engine, "run", "-d", "--name", names[site], "--network", net,
                 "-v", f"{work / 'keys' / 'sites' / site}:/keys:ro", "-v", f"{ROOT / 'client'}:/config:ro",
                 "-v", f"{work / 'data' / site}:/data:ro", "-v", f"{work / 'state' / site}:/state",
                 images["client"], "/config/client.toml", f"client.name={site}", "client.server=server:7443",
                 "client.keys_dir=/keys", "data.path=/data/train.jsonl", "out=/state"])
        codes = {}
        try:
            for role, name in names.items():
                codes[role] = int(run([engine, "wait", name], timeout=timeout).stdout.split()[-1])
        except subprocess.TimeoutExpired:
            codes["timeout"] = -1
        logs = {role: run([engine, "logs", name], check=False) for role, name in names.items()}
        for role, p in logs.items():
            print(f"--- {role} (exit {codes.get(role, 'still running')})\n{(p.stdout + p.stderr)[-4000:]}", flush=True)
        if any(codes.get(role) != 0 for role in names):
            raise SmokeFailed(f"exit codes {codes}")
    finally:
        if not keep:
            for name in names.values():
                run([engine, "rm", "-f", name], check=False)
            run([engine, "network", "rm", net], check=False)
    rows = [json.loads(line) for line in (work / "runs" / "federation" / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in rows if r["round"] == 1]
    if last["clients_ok"] != 2 or not last["applied"]:
        raise SmokeFailed(f"round 1 did not aggregate both sites: {last}")
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", help="podman or docker (default: the first found)")
    ap.add_argument("--base-image", help="BASE_IMAGE build argument (default: the Dockerfiles' python:3.11-slim)")
    ap.add_argument("--host-pip", action="store_true", help="build with this machine's pip indexes (podman only)")
    ap.add_argument("--keep", action="store_true", help="leave the containers, network and work folder")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the federation to finish")
    args = ap.parse_args()
    try:
        engine = pick_engine(args.engine)
        if args.host_pip and Path(engine).name != "podman":
            raise SmokeFailed("--host-pip mounts folders into the build: podman only")
        probe = args.base_image or "python:3.11-slim"
        if problem := engine_problem(engine, probe):
            raise SmokeFailed(problem)
        work = Path(tempfile.mkdtemp(prefix="fedtune-docker-"))
        try:
            images = build(engine, args.base_image, host_pip_options(work) if args.host_pip else [], "smoke")
            record = federation(engine, images, work, args.keep, args.timeout)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    except SmokeFailed as e:
        print(f"docker smoke test failed: {e}", file=sys.stderr)
        return 1
    print(f"one round over containers: clients_ok={record['clients_ok']}, eval_loss={record.get('eval_loss')}, "
          f"seconds={record['seconds']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
