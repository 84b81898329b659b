"""``fedlinear data synth | split | upload``: make, split and upload client shards (layout: :mod:`common.shards`)."""

from __future__ import annotations

import argparse
import json
import os

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError
from fedlinear.common.shards import SPLIT_SUMMARY, heterogeneity_line, write_shards, write_synthetic
from fedlinear.scripts.cli.options import abs_uri, add_heterogeneity_args, heterogeneity_of


def cmd_data_synth(args: argparse.Namespace) -> int:
    out = abs_uri(args.out)
    hard = {
        "feature_scales": getattr(args, "feature_scales", None),
        "feature_offsets": getattr(args, "feature_offsets", None),
        "condition_number": getattr(args, "condition_number", None),
        "target_offset": getattr(args, "target_offset", None),
    }
    het = heterogeneity_of(args)
    lines = write_synthetic(
        out, args.clients, args.samples_per_client, args.features, args.noise, args.seed, args.test_samples, het,
        **hard,
    )  # fmt: skip
    for line in lines:
        print(line)
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from fedlinear.common.csvio import load_csv
    from fedlinear.common.partition import split_iid
    from fedlinear.common.partition import split_by_column, split_quantity

    by_column = getattr(args, "by_column", None)
    alpha = getattr(args, "quantity_alpha", None)
    if by_column is None and (args.bins is not None or args.drop_by_column):
        raise FedLinearError("--bins and --drop-by-column go with --by-column K")
    if by_column is not None and alpha is not None:
        raise FedLinearError("--quantity-alpha and --by-column are two different splits: give one")
    if alpha is None and args.quantity_seed is not None:
        raise FedLinearError("--quantity-seed goes with --quantity-alpha")
    if by_column is None and args.clients is None:
        raise FedLinearError("data split needs --clients N (or --by-column K: one shard per value)")
    het = heterogeneity_of(args)  # validates --quantity-alpha, --min-samples, --quantity-seed
    data = load_csv(args.input, target_column=args.target_column, header=args.header)
    summary = None
    if by_column is not None:
        width = data.num_features + 1
        target = args.target_column % width
        names = None
        if data.columns is not None:
            names = list(data.columns[:-1])
            names.insert(target, data.columns[-1])
        minimum = het.min_samples if args.min_samples is not None else 1
        shards, test, summary = split_by_column(
            data, by_column, width, target, args.seed, args.test_fraction,
            bins=args.bins, drop=args.drop_by_column, min_samples=minimum, names=names,
        )  # fmt: skip
        if args.clients is not None and args.clients != len(shards):
            raise FedLinearError(
                f"--by-column {by_column} gives {len(shards)} shards (one per value), but --clients is {args.clients}"
            )
    elif alpha is not None:
        shards, test, summary = split_quantity(
            data, args.clients, args.seed, args.test_fraction, het.quantity_alpha, het.min_samples, het.quantity_seed
        )
    else:
        shards, test = split_iid(data, args.clients, args.seed, args.test_fraction)
    out = abs_uri(args.out)
    digests = [] if summary is not None else None
    write_shards(out, shards, test, digests)
    sizes = [s.num_examples for s in shards]
    print(
        f"split {data.num_examples} samples ({data.num_features} features) into {len(shards)} shards "
        f"({min(sizes)}-{max(sizes)} each) and test.csv ({test.num_examples}) in {out}"
    )
    if summary is not None:
        summary = {"input": args.input if storage.is_s3(args.input) else abs_uri(args.input), **summary, "shards": digests}
        for entry, label in zip(digests, summary.get("values", []), strict=False):
            entry["value"] = label
        storage.write_text(storage.join(out, SPLIT_SUMMARY), json.dumps(summary, indent=2) + "\n")
        print(f"heterogeneous parties: {heterogeneity_line(summary)} (details in {SPLIT_SUMMARY})")
    return 0


def cmd_data_upload(args: argparse.Namespace) -> int:
    if not storage.is_s3(args.dest):
        raise FedLinearError(f"destination must be an s3:// URI, got '{args.dest}'")
    files = storage.list_uris(abs_uri(args.source))
    for path in files:
        uri = storage.join(args.dest, os.path.basename(path))
        with open(path, "rb") as handle:
            storage.write_bytes(uri, handle.read())
        print(f"{path} -> {uri}")
    print(f"uploaded {len(files)} files to {args.dest}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedlinear data`` and its sub-commands."""
    data = sub.add_parser("data", help="make, split and upload client shards").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="synthetic shards with known true weights")
    synth.add_argument("--out", required=True, help="output directory or s3:// prefix")
    synth.add_argument("--clients", type=int, default=10)
    synth.add_argument("--samples-per-client", type=int, default=1000)
    synth.add_argument("--features", type=int, default=10)
    synth.add_argument("--noise", type=float, default=0.1, help="standard deviation of the label noise")
    synth.add_argument("--seed", type=int, default=42)
    synth.add_argument("--test-samples", type=int, default=2000)
    hard = synth.add_argument_group("hard data on purpose (all off by default; a negative LO needs --opt=LO:HI)")
    hard.add_argument(
        "--feature-scales",
        metavar="LO:HI",
        help="per-feature scales, log-spaced from LO (first) to HI (last), e.g. 1e-3:1e4",
    )
    hard.add_argument("--feature-offsets", metavar="LO:HI", help="per-feature offsets, evenly spaced from LO to HI")
    hard.add_argument(
        "--condition-number", metavar="K", help="correlated features: correlation eigenvalues geometric, max/min = K"
    )
    hard.add_argument("--target-offset", metavar="B", help="add B to every target, e.g. 1e5")
    add_heterogeneity_args(synth)
    synth.set_defaults(func=cmd_data_synth)

    split = data.add_parser("split", help="shard an existing CSV (IID) and hold out a test split")
    split.add_argument("input", help="CSV file or s3:// object")
    split.add_argument("--clients", type=int, help="number of shards (required unless --by-column)")
    split.add_argument("--out", required=True)
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--target-column", type=int, default=-1)
    split.add_argument("--header", choices=("auto", "yes", "no"), default="auto")
    add_heterogeneity_args(split, synth=False)
    split.add_argument("--by-column", type=int, metavar="K",
                       help="one shard per distinct value of CSV column K (0-based, negative from the end)")
    split.add_argument("--bins", type=int, metavar="B", help="with --by-column: B equal-width bins of the column")
    split.add_argument("--drop-by-column", action="store_true", help="with --by-column: leave column K out of the shards")
    split.set_defaults(func=cmd_data_split)  # fmt: skip

    upload = data.add_parser("upload", help="put local shards into a bucket, one object per file")
    upload.add_argument("source", help="local directory of shards")
    upload.add_argument("dest", help="s3://bucket/prefix/")
    upload.set_defaults(func=cmd_data_upload)
