"""``fedlinear soak``: a long processes-mode run, watching the long-lived processes' RSS
(:mod:`fedlinear.scripts.experiments.soak`)."""

from __future__ import annotations

import argparse

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.experiments import soak


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fedlinear soak`` on the CLI's subparsers."""
    p = subparsers.add_parser("soak", help="long processes-mode run watching the processes' RSS", description=soak.__doc__.split("\n")[0])
    soak.add_arguments(p)
    p.set_defaults(func=cmd_soak)
    return p


def cmd_soak(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.rounds < 2:
        raise FedLinearError(f"soak needs --nodes >= 1 and --rounds >= 2, got {args.nodes} and {args.rounds}")
    return soak.soak(args)
