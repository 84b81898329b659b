"""``fedlinear certs``, ``preflight``, ``superlink`` and ``node``: multi-machine federations (see docs/deploy.md).

    fedlinear certs     --out DIR [--address HOST_OR_IP ...] [--party NAME ...] [--days N] | --rotate NAME
    fedlinear preflight [--ca CA.crt] [--cert SERVER.crt [--server-key KEY]] [--address HOST ...]
                        [--node-key NAME.key ...] [--public-key NAME.pub ...] [--flwr-config FILE]
                        [--superlink HOST:PORT] [--probe]
    fedlinear superlink --certs DIR [--host 0.0.0.0] [--port 9092] [--control-port 9093] [--address ...]
    fedlinear node      --superlink HOST:PORT --ca ca.crt --key NAME.key --data-uri URI [--max-retries N]

These wrap stock Flower 1.42 (``flower-superlink``, ``flower-supernode``); ``flwr run`` and
``flwr supernode register/list`` are used as they are, against the SuperLink's loopback address.

The work is done in :mod:`fedlinear.scripts.deploy`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.deploy import node, pki, preflight, superlink
from fedlinear.scripts.deploy.superlink import DEFAULT_CONTROL_PORT, DEFAULT_FLEET_PORT


def fail(problems: list[str]) -> None:
    """Print every problem but the last as an error line, raise the last (the CLI prints it)."""
    if not problems:
        return
    for line in problems[:-1]:
        print(f"fedlinear: error: {line}", file=sys.stderr)
    raise FedLinearError(problems[-1])


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def cmd_certs(args: argparse.Namespace) -> int:
    if args.rotate:
        if args.address or args.party:
            raise FedLinearError("--rotate replaces party keys; give --address / --party in another call")
        lines = []
        for name in args.rotate:
            lines += pki.rotate_party(_abs(args.out), name)
        print("\n".join(lines))
        return 0
    if not args.address and not args.party and os.path.exists(os.path.join(_abs(args.out), pki.CA_CERT)):
        raise FedLinearError(
            f"{os.path.join(_abs(args.out), pki.CA_CERT)} already exists; refusing to overwrite it "
            "(give --address or --party to add to this CA)"
        )
    for line in pki.make_credentials(_abs(args.out), args.address or [], args.party or [], days=args.days):
        print(line)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    problems: list[str] = []
    checked: list[str] = []
    ca = _abs(args.ca) if args.ca else None
    if ca:
        problems += preflight.check_ca(ca)
        checked.append(f"CA {ca}")
    if args.cert:
        cert = _abs(args.cert)
        hosts = [pki.split_host(a) for a in (args.address or [])]
        problems += preflight.check_certificate(cert, ca, hosts, what="server certificate")
        if args.server_key:
            problems += preflight.check_server_key(cert, _abs(args.server_key))
        checked.append(f"server certificate {cert}" + (f" for {', '.join(hosts)}" if hosts else ""))
    for key in args.node_key or []:
        problems += preflight.check_node_key(_abs(key))
        checked.append(f"SuperNode key {_abs(key)}")
    for pub in args.public_key or []:
        problems += preflight.check_public_key(_abs(pub))
        checked.append(f"public key {_abs(pub)}")
    if args.flwr_config:
        problems += preflight.check_flwr_config(_abs(args.flwr_config), probe=args.probe)
        checked.append(f"Flower connections in {_abs(args.flwr_config)}")
    if args.superlink:
        try:
            preflight.probe_tls(args.superlink, ca, timeout=args.timeout)
        except FedLinearError as exc:
            problems.append(str(exc))
        checked.append(f"TLS handshake with {args.superlink}")
    if not checked:
        raise FedLinearError("nothing to check: give --ca, --cert, --node-key, --public-key, --flwr-config or --superlink")
    fail(problems)
    for line in checked:
        print(f"ok: {line}")
    return 0


def _cert_files(args: argparse.Namespace) -> tuple[str, str, str]:
    certs = _abs(args.certs) if args.certs else None
    ca = _abs(args.ca) if args.ca else (os.path.join(certs, pki.CA_CERT) if certs else None)
    cert = _abs(args.cert) if args.cert else (os.path.join(certs, pki.SERVER_CERT) if certs else None)
    key = _abs(args.key) if args.key else (os.path.join(certs, pki.SERVER_KEY) if certs else None)
    if not (ca and cert and key):
        raise FedLinearError("give --certs DIR (ca.crt, server.crt, server.key) or all of --ca, --cert, --key")
    return ca, cert, key


def cmd_superlink(args: argparse.Namespace) -> int:
    ca, cert, key = _cert_files(args)
    fail(superlink.check_superlink(ca, cert, key, args.host, args.port, args.control_port, args.address))
    database = _abs(args.database) if args.database else None
    return superlink.serve_superlink(
        ca, cert, key, args.host, args.port, args.control_port, _abs(args.workdir), database, args.startup_timeout,
        limits=front_limits(args), key_dir=os.path.dirname(ca),
    )


def front_limits(args: argparse.Namespace):
    """The Fleet front's limits from ``fedlinear superlink``'s options (each checked, one line)."""
    from fedlinear.scripts.deploy.fleetfront import FrontLimits, default_body_limits

    for name in ("max_connections", "max_per_peer", "header_timeout", "max_object_mib"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise FedLinearError(f"--{name.replace('_', '-')} must be positive, got {value}")
    limits = FrontLimits()
    if args.max_connections is not None:
        limits.max_connections = args.max_connections
    if args.max_per_peer is not None:
        limits.max_per_peer = args.max_per_peer
    if args.header_timeout is not None:
        limits.header_timeout = args.header_timeout
    if args.max_object_mib is not None:
        limits.body_limits = default_body_limits(max_object=int(args.max_object_mib * 1024 * 1024))
    return limits


def node_config(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.data_uri:
        values["data-uri"] = args.data_uri
    if args.partition_id is not None:
        values["partition-id"] = args.partition_id
    if args.num_partitions is not None:
        values["num-partitions"] = args.num_partitions
    for item in args.set or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise FedLinearError(f"--set expects key=value, got '{item}'")
        values[name.strip()] = _typed(text.strip())
    return values


def _typed(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def cmd_node(args: argparse.Namespace) -> int:
    ca, key = _abs(args.ca), _abs(args.key)
    problems = preflight.check_ca(ca) + preflight.check_node_key(key)
    fail(problems)
    preflight.probe_tls(args.superlink, ca, timeout=args.connect_timeout)
    values = node_config(args)
    if "data-uri" not in values:
        raise FedLinearError("--data-uri is required: this party's shard (a local path or s3:// URI)")
    if "://" not in values["data-uri"]:
        values["data-uri"] = _abs(values["data-uri"])
        if not os.path.exists(values["data-uri"]):
            raise FedLinearError(f"--data-uri {values['data-uri']}: no such file")

    return node.serve_node(
        args.superlink, ca, key, values, _abs(args.workdir), args.max_retries, args.max_wait_time,
        args.clientappio_port, args.verbose,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedlinear certs``, ``preflight``, ``superlink`` and ``node``."""
    certs = sub.add_parser("certs", help="CA, SuperLink TLS certificate and SuperNode keys (see docs/deploy.md)")
    certs.add_argument("--out", required=True, help="directory for the files (created; existing files are never overwritten)")
    certs.add_argument("--address", action="append", metavar="HOST_OR_IP",
                       help="an address or name the SuperLink is dialled on (repeatable; 127.0.0.1 is always added)")  # fmt: skip
    certs.add_argument("--party", action="append", metavar="NAME", help="make NAME.key/NAME.pub for a party (repeatable)")
    certs.add_argument("--rotate", action="append", metavar="NAME",
                       help="replace party NAME's key pair (the old one is kept as NAME.revoked-<time>.*; repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity of the CA and the server certificate")
    certs.set_defaults(func=cmd_certs)

    pre = sub.add_parser("preflight", help="check certificates, keys and Flower connections before Flower does")
    pre.add_argument("--ca", help="the CA certificate that parties trust")
    pre.add_argument("--cert", help="the SuperLink's certificate (checked against --ca and --address)")
    pre.add_argument("--server-key", help="the SuperLink's private key (must match --cert)")
    pre.add_argument("--address", action="append", metavar="HOST", help="an address the SuperLink is dialled on")
    pre.add_argument("--node-key", action="append", metavar="FILE", help="a SuperNode private key")
    pre.add_argument("--public-key", action="append", metavar="FILE", help="a SuperNode public key (for register)")
    pre.add_argument("--flwr-config", metavar="FILE", help="a Flower config.toml ($FLWR_HOME/config.toml)")
    pre.add_argument("--probe", action="store_true", help="with --flwr-config: TLS handshake with each connection")
    pre.add_argument("--superlink", metavar="HOST:PORT", help="TLS handshake with this address, trusting --ca")
    pre.add_argument("--timeout", type=float, default=5.0)
    pre.set_defaults(func=cmd_preflight)

    link = sub.add_parser("superlink", help="a SuperLink for remote parties: TLS, node auth, only the Fleet API exposed")
    link.add_argument("--certs", help="directory with ca.crt, server.crt, server.key (from 'fedlinear certs')")
    link.add_argument("--ca")
    link.add_argument("--cert")
    link.add_argument("--key")
    link.add_argument("--host", default="0.0.0.0", help="address the Fleet front listens on (default 0.0.0.0)")
    link.add_argument("--port", type=int, default=DEFAULT_FLEET_PORT, help="Fleet front port (parties dial it)")
    link.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                      help="the SuperLink's own port on 127.0.0.1 (Control + Runtime + Fleet; this host only)")  # fmt: skip
    link.add_argument("--address", action="append", metavar="HOST", help="an address parties dial (SAN check)")
    link.add_argument("--database", help="SuperLink state file (default: in memory)")
    link.add_argument("--workdir", default="fedlinear-superlink", help="logs and the private FLWR_HOME")
    link.add_argument("--startup-timeout", type=float, default=60.0)
    link.add_argument("--max-connections", type=int,
                      help="Fleet front: connections at once (default: half the open-file limit left, at most 4096)")
    link.add_argument("--max-per-peer", type=int, help="Fleet front: connections at once from one address (default 32)")
    link.add_argument("--header-timeout", type=float,
                      help="Fleet front: seconds for the TLS handshake and the request headers, in total (default 10)")
    link.add_argument("--max-object-mib", type=float,
                      help="Fleet front: largest push-object body in MiB (default 8: Flower's 5 MiB array chunks)")
    link.set_defaults(func=cmd_superlink)

    node = sub.add_parser("node", help="a party's SuperNode: TLS, its own key and shard, bounded retries")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the Fleet front's address")
    node.add_argument("--ca", required=True, help="the federation's CA certificate")
    node.add_argument("--key", required=True, help="this party's private key (NAME.key from 'fedlinear certs')")
    node.add_argument("--data-uri", help="this party's shard (local path or s3:// URI)")
    node.add_argument("--partition-id", type=int)
    node.add_argument("--num-partitions", type=int)
    node.add_argument("--set", action="append", metavar="KEY=VALUE", help="another node config entry (repeatable)")
    node.add_argument("--max-retries", type=int, default=5, help="reconnection attempts before giving up")
    node.add_argument("--max-wait-time", type=float, default=120.0, help="seconds of reconnecting before giving up")
    node.add_argument("--connect-timeout", type=float, default=10.0, help="the preflight TLS handshake's bound")
    node.add_argument("--clientappio-port", type=int, help="SuperNode's local ClientAppIo port (default: a free one)")
    node.add_argument("--workdir", default="fedlinear-node", help="log and the private FLWR_HOME")
    node.add_argument("--verbose", action="store_true", help="print flower-supernode's output as well as logging it")
    node.set_defaults(func=cmd_node)
