"""``fedlinear stop-superlink``: stop the SuperLink ``flwr run`` starts for a ``:local:`` connection."""

from __future__ import annotations

import argparse
import os


def cmd_stop_superlink(args: argparse.Namespace) -> int:
    """Stop the SuperLink ``flwr run`` started for a ``:local:`` connection, and what it spawned, by PID."""
    from fedlinear.scripts.local.processes import stop_superlink

    print(stop_superlink(args.port))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedlinear stop-superlink``."""
    stop = sub.add_parser(
        "stop-superlink",
        help="stop the SuperLink `flwr run` starts for a :local: connection (and everything it spawned), by PID",
    )
    stop.add_argument(
        "--port", type=int, default=int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")),
        help="its port on 127.0.0.1 (default: Flower's, 39091, or $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT)",
    )  # fmt: skip
    stop.set_defaults(func=cmd_stop_superlink)
