"""The federation subcommands: ``fedtune server``, ``client``, ``status`` and ``keys``.

``fedtune.cli`` registers them with ``register(subparsers, COMMANDS)``; each command is a plain function
``(args) -> exit code``. This module does not import ``fedtune.cli`` (what both need is ``cli_common``). Exit codes: 0 done, 1 the federation failed (too few clients, server gone for
good: ``client.max_retry_s``), 2 bad input or a connection that cannot work as configured (host, TLS), 3 this node was refused by the server (unknown key, revoked, config mismatch).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3


def _config(args: argparse.Namespace, extra: list[str]) -> Any:
    from fedtune.cli_common import config_from_args

    return config_from_args(argparse.Namespace(config=args.config, overrides=[*args.overrides, *extra]))


def cmd_server(args: argparse.Namespace) -> int:
    """Coordinate a federation over gRPC: wait for clients, run the rounds, write the run folder."""
    from fedtune.cli_common import console
    from fedtune.server import FederationError, run_server
    from fedtune.transport import InsecureTransportError

    cfg = _config(args, (["server.insecure=true"] if args.insecure else [])
                  + (["server.no_node_auth=true"] if args.no_node_auth else []))
    if args.address:
        from fedtune.config import ConfigError
        from fedtune.sections import address_problem

        if problem := address_problem("--address", args.address, any_port=True):
            raise ConfigError([problem])
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, address=args.address))
    from fedtune.rounds import has_checkpoint
    from fedtune.runs import claim_run_folder

    if args.overwrite or not has_checkpoint(cfg):  # a checkpoint: a restarted server resumes from it
        claim_run_folder(cfg.out, overwrite=args.overwrite)
    try:
        run_server(cfg, console())
    except (FederationError, InsecureTransportError) as e:
        print(f"fedtune server: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """Join a federation as one site: train on local data when asked, send only adapter updates."""
    from fedtune.cli_common import console
    from fedtune.client.node import NodeMisconfigured, NodeRefused, ServerUnreachable, run_client
    from fedtune.transport import InsecureTransportError

    cfg = _config(args, ["client.insecure=true"] if args.insecure else [])
    try:
        run_client(cfg, console())
    except NodeRefused as e:
        print(f"fedtune client: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (InsecureTransportError, NodeMisconfigured) as e:
        print(f"fedtune client: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServerUnreachable as e:
        print(f"fedtune client: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show a running server's round, phase and connected clients with when each was last seen."""
    from pathlib import Path

    from rich.table import Table

    from fedtune.cli_common import console
    from fedtune.names import check_name
    from fedtune.server.coordinator import OBSERVER
    from fedtune.transport import Backoff, FederationClient, TransportError
    from fedtune.untrusted import MAX_NAME, shown

    check_name(args.name)
    kw: dict[str, Any] = {"insecure": args.insecure}
    if args.keys_dir:
        keys = Path(args.keys_dir)
        kw["key"] = keys / "nodes" / f"{args.name}.key"
        if not Path(kw["key"]).is_file():
            raise FileNotFoundError(f"--keys-dir {keys}: no nodes/{args.name}.key (choose the key with --name)")
        if not args.insecure:
            kw["ca_file"] = keys / "ca.pem"
    try:
        with FederationClient(args.address, args.name, fingerprint=OBSERVER, heartbeat=False,
                              backoff=Backoff(initial_s=0.2, max_attempts=2), **kw) as fc:
            st, seen = fc.status()
    except TransportError as e:
        print(f"fedtune status: {args.address}: {e.reason}", file=sys.stderr)
        return EXIT_FAILED
    out = console()
    d = st.detail
    # everything below came from the server: shown escaped and bounded (fedtune.untrusted)
    out.print(f"server {shown(args.address)}: round {st.round}/{shown(d.get('rounds', '?'), 12)}, "
              f"phase {shown(st.phase, MAX_NAME)}"
              + (f", deadline in {shown(d['deadline_in_s'], 12)} s" if d.get("deadline_in_s") else "")
              + (f", waiting for {shown(d['waiting_for'])}" if d.get("waiting_for") else ""), highlight=False)
    participants = set(filter(None, d.get("clients", "").split(",")))
    table = Table(title="nodes with a session")
    for col in ("node", "role", "last seen"):
        table.add_column(col)
    for node, ago in sorted(seen.items()):
        if node == args.name and node not in participants:
            continue  # this very status call
        role = "client" if node in participants else "silent" if ago > 10 else "observer"
        table.add_row(shown(node, MAX_NAME), role, f"{ago:.1f} s ago ({time.strftime('%H:%M:%S', time.localtime(time.time() - ago))})")
    out.print(table)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Create the federation's CA, server certificate and node keys, or revoke a node (--revoke)."""
    from pathlib import Path

    from fedtune.transport import create_keys, revoke_node

    out = Path(args.out_dir)
    if args.revoke:
        revoke_node(out / "allowlist.txt", args.revoke)
        print(f"{args.revoke} revoked in {out / 'allowlist.txt'}: refused from its next call on")
        return 0
    nodes = [n.strip() for n in (args.nodes or "").split(",") if n.strip()]
    observers = [args.operator] if args.operator else []
    if not nodes and (out / "ca.key").exists() and not observers:
        raise ValueError("--nodes: name the nodes to add (comma-separated)")
    hosts = [h.strip() for arg in args.server_host or [] for h in arg.split(",") if h.strip()] or None
    from fedtune.transport.keys import certificate_hosts

    before = certificate_hosts(out / "server.pem") if (out / "server.pem").is_file() else None
    create_keys(out, nodes, hosts, loopback=not args.no_loopback, observers=observers, peers=args.peers)
    after = certificate_hosts(out / "server.pem")
    cert = ("unchanged" if before is not None and set(before) == set(after)
            else "re-issued, valid" if before is not None else "valid")
    print(f"keys in {out}:\n"
          f"  server only : server.pem, server.key ({cert} for {', '.join(after)}), allowlist.txt "
          f"(ca.key: keep offline)\n"
          + "".join(f"  node {n:<8}: sites/{n}/ (ca.pem, nodes/{n}.key): give to that site only, its "
                    f"client.keys_dir\n" for n in nodes)
          + (f"  gossip peers: sites/<name>/ also holds peers/<name>.pem and .key and allowlist.txt (its "
             f"gossip.keys_dir), certificates valid for {', '.join(after)}\n" if args.peers else "")
          + (f"  `fedtune status` uses nodes/{args.operator}.key (--name {args.operator})" if args.operator else ""))
    return 0


def cmd_flower_app(args: argparse.Namespace) -> int:
    """Write a Flower App folder that runs this federation inside an existing Flower deployment (`flwr run`)."""
    from pathlib import Path

    from fedtune.flower.template import write_app

    folder = Path(args.app_dir)
    files = write_app(folder, _config(args, []))
    print(f"Flower App in {folder} ({len(files)} files; fedtune config: {folder / 'fedtune_app' / 'fedtune.toml'}).\n"
          f"Start each SuperNode with --node-config \"client-name='site-a' partition-id=0 data-path='/data/a.jsonl'\", "
          f"then: flwr run {folder} <your-superlink-connection> --stream")
    return 0


def cmd_gossip(args: argparse.Namespace) -> int:
    """Run one gossip peer: train with its neighbours in gossip.peers, no server (decentralized LoRA)."""
    from rich.console import Console

    from fedtune.gossip.peer import run_peer
    from fedtune.transport import InsecureTransportError

    cfg = _config(args, ["gossip.insecure=true"] if args.insecure else [])
    try:
        run_peer(cfg, Console(), overwrite=args.overwrite)
    except InsecureTransportError as e:
        print(f"fedtune gossip: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def register(subparsers: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``server``, ``client``, ``status`` and ``keys`` to ``fedtune``'s subparsers and ``commands``."""

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", nargs="?", help="TOML or YAML config file (optional)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.rounds=5 client.name=site-a")
        return p

    p = subparsers.add_parser("server", help=cmd_server.__doc__, description=(cmd_server.__doc__ or "") + (
        " Listens on server.address with TLS and the node allow-list of server.keys_dir; resumes from the last "
        "completed round when out= holds a checkpoint of the same run."))
    p.add_argument("--address", help="host:port to listen on (overrides server.address)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC off loopback (server.insecure=true)")
    p.add_argument("--no-node-auth", action="store_true",
                   help="off loopback without server.keys_dir: let anyone join as any node (server.no_node_auth=true)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out= folder that holds a run "
                   "(without it, a folder with a checkpoint is resumed and any other run is refused)")
    with_config(p)
    p = subparsers.add_parser("client", help=cmd_client.__doc__, description=(cmd_client.__doc__ or "") + (
        " Connects to client.server as client.name with keys from client.keys_dir (ca.pem, nodes/<name>.key)."))
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC off loopback (client.insecure=true)")
    with_config(p)
    p = subparsers.add_parser("gossip", help=cmd_gossip.__doc__, description=(cmd_gossip.__doc__ or "") + (
        " This peer is gossip.name of gossip.peers (\"name@host:port\", the same list on every peer); mutual TLS "
        "with the certificates of gossip.keys_dir (`fedtune keys DIR --nodes ... --peers`); resumes from its "
        "checkpoint and re-joins the others when out= holds one."))
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC off loopback (gossip.insecure=true)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out= folder that holds a run "
                   "(without it, a folder with a checkpoint is resumed and any other run is refused)")
    with_config(p)
    p = subparsers.add_parser("status", help=cmd_status.__doc__, description=cmd_status.__doc__)
    p.add_argument("address", help="host:port of the server")
    p.add_argument("--keys-dir", help="keys folder with ca.pem and nodes/<name>.key (omit for plaintext loopback)")
    p.add_argument("--name", default="operator", help="key to authenticate with (default: operator)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC off loopback")
    p = subparsers.add_parser("keys", help=cmd_keys.__doc__, description=(cmd_keys.__doc__ or "") + (
        " Run again with more --nodes to add sites, or other --server-host names for a new server certificate; "
        "the CA and existing keys are kept."))
    p.add_argument("out_dir", help="keys folder (created)")
    p.add_argument("--nodes", help="comma-separated node names, e.g. site-a,site-b,site-c")
    p.add_argument("--server-host", action="append",
                   help="hostname or IP the server certificate is valid for, besides localhost and 127.0.0.1 "
                        "(repeat or comma-separate; a run with other names issues a new server certificate)")
    p.add_argument("--no-loopback", action="store_true",
                   help="leave localhost and 127.0.0.1 out of the server certificate")
    p.add_argument("--operator", default="operator",
                   help="also make a key for `fedtune status` under this name, marked observer in the allow-list: it lists "
                        "every node and cannot train ('' for none; default operator)")
    p.add_argument("--peers", action="store_true",
                   help="also issue each of --nodes a gossip peer certificate (mutual TLS for `fedtune gossip`), "
                        "valid for the --server-host names too")
    p.add_argument("--revoke", metavar="NAME", help="revoke this node in OUT_DIR/allowlist.txt")
    p = subparsers.add_parser("flower-app", help=cmd_flower_app.__doc__, description=(cmd_flower_app.__doc__ or "")
                              + " The federation's config (file and overrides) goes into the app folder.")
    p.add_argument("app_dir", help="folder to create the app in (must not hold a pyproject.toml)")
    with_config(p)
    commands.update(server=cmd_server, client=cmd_client, status=cmd_status, keys=cmd_keys, gossip=cmd_gossip)
    commands["flower-app"] = cmd_flower_app


def main(argv: list[str] | None = None) -> int:
    """``python -m fedtune.cli_federation COMMAND ...``: these four commands with ``fedtune``'s error handling."""
    from fedtune.cli_common import parse, run_command

    parser = argparse.ArgumentParser(prog="fedtune", description="fedtune federation commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}
    register(sub, commands)
    return run_command(commands, parse(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
