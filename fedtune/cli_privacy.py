"""``fedtune privacy plan``: the epsilon of a DP-FedAvg run, or the noise a target epsilon needs, before
anything runs (``fedtune.privacy.accounting``, i.e. dp-accounting's RDP and PLD accountants)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def cmd_privacy(args: argparse.Namespace) -> int:
    """Plan client-level DP: epsilon from clients, sample rate, rounds, noise and delta, or the noise for a
    target epsilon (--target-epsilon)."""
    from rich.console import Console
    from rich.table import Table

    from fedtune.privacy.accounting import epsilon, noise_for_epsilon
    from fedtune.privacy.dp import update_noise_multiplier

    problems = []
    if args.clients < 1:
        problems.append(f"--clients: got {args.clients}, must be >= 1")
    if not 0 < args.rate <= 1:
        problems.append(f"--rate: got {args.rate}, must be in (0, 1] (each client joins a round with this probability)")
    if args.rounds < 1:
        problems.append(f"--rounds: got {args.rounds}, must be >= 1")
    if not 0 < args.delta < 1:
        problems.append(f"--delta: got {args.delta}, must be in (0, 1)")
    if (args.noise is None) == (args.target_epsilon is None):
        problems.append("give exactly one of --noise (to get epsilon) or --target-epsilon (to get the noise)")
    elif args.noise is not None and args.noise <= 0:
        problems.append(f"--noise: got {args.noise}, must be > 0")
    elif args.target_epsilon is not None and args.target_epsilon <= 0:
        problems.append(f"--target-epsilon: got {args.target_epsilon}, must be > 0")
    if args.count_noise is not None and args.count_noise <= 0:
        problems.append(f"--count-noise: got {args.count_noise}, must be > 0")
    if problems:
        raise ValueError("; ".join(problems))
    kinds = ["pld", "rdp"] if args.accountant == "both" else [args.accountant]
    table = Table(title=f"DP-FedAvg plan: {args.clients:,} clients, sample rate {args.rate:g} "
                        f"(~{args.rate * args.clients:,.0f} a round), {args.rounds} rounds, delta {args.delta:g}")
    for col in ("accountant", "noise multiplier", "epsilon", "noise std on the mean (x clip_norm)"):
        table.add_column(col, justify="right" if col != "accountant" else "left")
    adaptive = []
    for kind in kinds:
        z = args.noise if args.noise is not None else noise_for_epsilon(args.rate, args.rounds, args.delta,
                                                                        args.target_epsilon, kind)
        eps = epsilon(args.rate, z, args.rounds, args.delta, kind)
        table.add_row(kind, f"{z:.4f}", f"{eps:.3f}", f"{z / (args.rate * args.clients):.3g}")
        if args.adaptive:
            sigma_b = args.count_noise or args.rate * args.clients / 20
            try:
                z_update = update_noise_multiplier(z, sigma_b)
            except ValueError:
                raise ValueError(f"--count-noise: {sigma_b:g} must exceed the noise multiplier / 2 = {z / 2:g} "
                                 "(with --adaptive; default: the expected clients per round / 20)") from None
            adaptive.append(f"adaptive clipping ({kind}): count noise {sigma_b:.4g} (privacy.clip_count_noise), the "
                            f"update keeps noise multiplier {z_update:.4f} (noise std on the mean "
                            f"{z_update / (args.rate * args.clients):.3g} x clip_norm); epsilon as above")
    if args.noise is not None and args.rate < 1:
        eps = epsilon(1.0, args.noise, args.rounds, args.delta, "rdp")
        table.add_row("rdp, no sampling amplification", f"{args.noise:.4f}", f"{eps:.3f}", "-")
    Console().print(table)
    for line in adaptive:
        print(line)
    print("set privacy.dp=central (or distributed, with privacy.secagg=true), privacy.sample_rate, "
          "privacy.noise_multiplier, privacy.delta (and client.pipeline=[\"dp_clip\"]) to run it")
    return 0


def register(subparsers: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``privacy`` (with its ``plan`` action) to ``fedtune``'s subparsers and ``commands``."""
    p = subparsers.add_parser("privacy", help=cmd_privacy.__doc__, description=cmd_privacy.__doc__)
    p.add_argument("action", choices=["plan"], help="plan: epsilon or noise before a run")
    p.add_argument("--clients", type=int, required=True, help="clients in the federation")
    p.add_argument("--rate", type=float, required=True, help="probability each client joins a round "
                                                             "(privacy.sample_rate)")
    p.add_argument("--rounds", type=int, required=True, help="rounds of the run")
    p.add_argument("--delta", type=float, default=1e-5, help="delta (privacy.delta; default 1e-5)")
    p.add_argument("--noise", type=float, help="noise multiplier (privacy.noise_multiplier): report epsilon")
    p.add_argument("--target-epsilon", type=float, help="report the smallest noise multiplier within this epsilon")
    p.add_argument("--accountant", choices=["pld", "rdp", "both"], default="both", help="default: both")
    p.add_argument("--adaptive", action="store_true", help="also the update's share of the noise with adaptive "
                                                            "clipping (privacy.clip=adaptive)")
    p.add_argument("--count-noise", type=float, help="with --adaptive: privacy.clip_count_noise (default: the "
                                                     "expected clients per round / 20)")
    commands["privacy"] = cmd_privacy
