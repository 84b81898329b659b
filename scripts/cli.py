"""The ``fedlinear`` command line.

    fedlinear data synth  --out DIR --clients N --samples-per-client n --features d --noise s --seed S
                          [--feature-scales LO:HI] [--feature-offsets LO:HI] [--condition-number K]
                          [--target-offset B]
    fedlinear data split  INPUT.csv --clients N --out DIR --seed S [--test-fraction f]
    fedlinear data upload DIR s3://bucket/prefix/
    fedlinear run         [--data DIR] [--clients N] [--rounds R] --out RUN_DIR [--mode processes|simulation]
                          [--set key=value ...] [--isolation auto|netns|none]
    fedlinear predict     --model RUN_DIR/model --input FILE.csv [--output FILE]
    fedlinear bench       [--quick] [--only ...] [--out DIR]   (see docs/benchmarks.md)

``DIR``/``RUN_DIR`` may be local paths or ``s3://`` URIs. Errors a user can fix print one line
(``fedlinear: error: ...``) and exit with status 1; Ctrl-C stops every process the command started.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from typing import Any

from common import storage
from common.config import RunConfig, parse_assignments
from common.errors import FedLinearError, one_line

CLIENT_FILE = "client-{i}.csv"
CLIENT_PATTERN = re.compile(r"client-(\d+)\.csv$")
APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abs(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def write_shards(out: str, shards, test) -> list[str]:
    from common.data import to_csv_bytes

    written = []
    for i, shard in enumerate(shards):
        uri = storage.join(out, CLIENT_FILE.format(i=i))
        storage.write_bytes(uri, to_csv_bytes(shard.x, shard.y))
        written.append(uri)
    storage.write_bytes(storage.join(out, "test.csv"), to_csv_bytes(test.x, test.y))
    return written


def cmd_data_synth(args: argparse.Namespace) -> int:
    from common.data import make_synthetic

    out = _abs(args.out)
    hard = {
        "feature_scales": getattr(args, "feature_scales", None),
        "feature_offsets": getattr(args, "feature_offsets", None),
        "condition_number": getattr(args, "condition_number", None),
        "target_offset": getattr(args, "target_offset", None),
    }
    shards, test, truth = make_synthetic(
        args.clients, args.samples_per_client, args.features, args.noise, args.seed, args.test_samples, **hard
    )
    write_shards(out, shards, test)
    storage.write_text(storage.join(out, "truth.json"), truth.to_json() + "\n")
    print(
        f"wrote {args.clients} shards x {args.samples_per_client} samples, d={args.features}, "
        f"test.csv ({args.test_samples}) and truth.json to {out}"
    )
    if truth.options:
        shown = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in truth.options.items())
        print(f"hard data: {shown}; realised correlation condition number {truth.condition_number:.4g}")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from common.data import load_csv, split_iid

    data = load_csv(args.input, target_column=args.target_column, header=args.header)
    shards, test = split_iid(data, args.clients, args.seed, args.test_fraction)
    out = _abs(args.out)
    write_shards(out, shards, test)
    sizes = [s.num_examples for s in shards]
    print(
        f"split {data.num_examples} samples ({data.num_features} features) into {args.clients} shards "
        f"({min(sizes)}-{max(sizes)} each) and test.csv ({test.num_examples}) in {out}"
    )
    return 0


def cmd_data_upload(args: argparse.Namespace) -> int:
    if not storage.is_s3(args.dest):
        raise FedLinearError(f"destination must be an s3:// URI, got '{args.dest}'")
    files = storage.list_uris(_abs(args.source))
    for path in files:
        uri = storage.join(args.dest, os.path.basename(path))
        with open(path, "rb") as handle:
            storage.write_bytes(uri, handle.read())
        print(f"{path} -> {uri}")
    print(f"uploaded {len(files)} files to {args.dest}")
    return 0


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------


def find_shards(data: str) -> list[str]:
    """Client shards in a data directory/prefix, ordered by client index."""
    found = {}
    for uri in storage.list_uris(data if data.endswith("/") or not storage.is_s3(data) else data + "/"):
        match = CLIENT_PATTERN.search(uri.rsplit("/", 1)[-1])
        if match:
            found[int(match.group(1))] = uri
    if not found:
        raise FedLinearError(f"{data}: no client-<i>.csv shards (make some with 'fedlinear data synth')")
    missing = [i for i in range(len(found)) if i not in found]
    if missing:
        raise FedLinearError(f"{data}: shards are not numbered 0..{len(found) - 1}: client-{missing[0]}.csv is missing")
    return [found[i] for i in range(len(found))]


def summary_table(history: dict[str, Any]) -> str:
    """Per-round table: the columns that have values in this run."""
    rows = history["rounds"]
    cols = [
        ("round", "round", "{:>5d}"),
        ("train-loss", "train loss", "{:>11.6g}"),
        ("test-mse", "test MSE", "{:>11.6g}"),
        ("test-mse-ratio", "MSE / LS", "{:>9.5f}"),
        ("excess-train-mse", "excess MSE", "{:>11.4g}"),
        ("weight-distance", "|w - w*|", "{:>10.4g}"),
        ("epsilon", "epsilon", "{:>9.4g}"),
        ("clients-ok", "clients", "{:>7d}"),
        ("elapsed-s", "elapsed s", "{:>9.1f}"),
    ]
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]
    widths = [max(len(label), int(re.search(r">(\d+)", fmt).group(1))) for _, label, fmt in cols]
    lines = ["  ".join(f"{label:>{w}}" for (_, label, _), w in zip(cols, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = []
        for (key, _, fmt), width in zip(cols, widths, strict=True):
            value = row.get(key)
            cells.append(f"{fmt.format(value):>{width}}" if value is not None else " " * width)
        lines.append("  ".join(cells))
    return "\n".join(lines)


def comparison_line(history: dict[str, Any]) -> str:
    final = history["rounds"][-1]
    ref = history.get("reference", {})
    if final.get("test-mse") is not None and ref.get("test-mse"):
        ratio = final["test-mse"] / ref["test-mse"]
        return (
            f"final test MSE {final['test-mse']:.6g} = {ratio:.5f} x the pooled least-squares optimum's "
            f"{ref['test-mse']:.6g} (the best a linear model fit to the pooled training data can do)"
        )
    if final.get("test-mse") is not None:
        return f"final test MSE {final['test-mse']:.6g} (no least-squares reference: reference = none)"
    if final.get("train-mse") is not None:
        return f"final pooled train MSE {final['train-mse']:.6g} vs least squares {ref['train-mse']:.6g}"
    return "no evaluation configured (no test set, reference = none)"


def resolve_data(args: argparse.Namespace, out: str, overrides: dict[str, Any]) -> tuple[list[str], str | None, str]:
    """(explicit shard URIs, a {partition-id} template or None, test URI or "") for ``fedlinear run``."""
    template = overrides.pop("data-uri", None)
    if args.test and "test-uri" in overrides:
        raise FedLinearError("give the test set one way: --test or --set test-uri, not both")
    test_uri = _abs(args.test) if args.test else overrides.pop("test-uri", "")
    if args.shard:
        if args.data or template:
            raise FedLinearError("give the shards one way: --shard, --data or --set data-uri=TEMPLATE")
        return [_abs(uri) for uri in args.shard], None, test_uri
    if template:
        if args.data:
            raise FedLinearError("give the shards one way: --data or --set data-uri=TEMPLATE")
        if not args.clients:
            raise FedLinearError("--set data-uri=TEMPLATE needs --clients N")
        shards = [template.replace("{partition-id}", str(i)) for i in range(args.clients)]
        return shards, template, test_uri
    if args.data:
        data = _abs(args.data)
    else:
        data = storage.join(out, "data")
        print(f"no --data given: writing synthetic data (d=10, 1000 samples per client, noise 0.1) to {data}")
        cmd_data_synth(
            argparse.Namespace(
                out=data, clients=args.clients or 10, samples_per_client=1000, features=10, noise=0.1,
                seed=int(overrides.get("seed", RunConfig.seed)), test_samples=2000,
            )
        )  # fmt: skip
    shards = find_shards(data)
    if not test_uri and storage.exists(storage.join(data, "test.csv")):
        test_uri = storage.join(data, "test.csv")
    return shards, storage.join(data, "client-{partition-id}.csv"), test_uri


def write_local_statistics(shards: list[str], uri: str, cfg: RunConfig) -> str:
    """Pooled statistics of the shards this machine holds, written to ``uri`` (the yardstick under privacy)."""
    import numpy as np

    from common.data import load_csv
    from common.scaling import PooledStats

    parts = [load_csv(shard, cfg.target_column, cfg.header) for shard in shards]
    PooledStats.of(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])).save(uri)
    return uri


def cmd_run(args: argparse.Namespace) -> int:
    if args.clients is not None and args.clients < 1:
        raise FedLinearError(f"--clients must be >= 1, got {args.clients}")
    if args.rounds < 1:
        raise FedLinearError(f"--rounds must be >= 1, got {args.rounds}")
    from common.runstore import RunStore
    from scripts.launcher import LaunchSpec, launch

    out = _abs(args.out)
    overrides = parse_assignments(args.set)
    shards, template, test_uri = resolve_data(args, out, overrides)
    clients = args.clients or len(shards)
    if shards and clients > len(shards):
        raise FedLinearError(f"--clients {clients} but only {len(shards)} shards were given")
    shards = shards[:clients]
    run_config: dict[str, Any] = {
        "num-server-rounds": args.rounds,
        "min-available-nodes": clients,
        "run-dir": out,
    }
    if test_uri:
        run_config["test-uri"] = test_uri
    node_configs = None
    if args.mode == "simulation":
        if template is None:
            raise FedLinearError(
                "simulation mode locates shards by partition id: use --data DIR (client-<i>.csv) or "
                "--set data-uri=TEMPLATE with {partition-id}, not --shard"
            )
        run_config["data-uri"] = template
    else:
        if not shards:
            raise FedLinearError("processes mode needs the shards: --data DIR or --shard URI (one per client)")
        node_configs = [
            {"partition-id": i, "num-partitions": clients, "data-uri": uri} for i, uri in enumerate(shards)
        ]
    run_config.update(overrides)
    cfg = RunConfig.from_run_config(run_config)  # fail here, with a clear message, not in the ServerApp
    store = RunStore(cfg.run_dir)
    previous = store.read_status()
    if previous is not None and previous.get("status") == "completed":
        raise FedLinearError(
            f"{out} already holds a completed run (status.json); choose another --out or remove it"
        )
    if cfg.private and not cfg.statistics_uri and shards:
        # Under privacy no node sends statistics: this machine holds every shard, so it computes the
        # pooled statistics itself, for the yardstick (and for standardization if declared public).
        run_config["statistics-uri"] = write_local_statistics(shards[:clients], store.uri("statistics.npz"), cfg)
        print(f"privacy on: pooled statistics for the yardstick computed here from the shards -> {run_config['statistics-uri']}")
    workdir = os.path.join(out, "logs") if not storage.is_s3(out) else tempfile.mkdtemp(prefix="fedlinear-logs-")
    spec = LaunchSpec(
        app_dir=_abs(args.app) if args.app else APP_DIR,
        mode=args.mode,
        num_nodes=clients,
        run_config=run_config,
        workdir=workdir,
        node_configs=node_configs,
        run_timeout=args.timeout,
        client_cpus=args.client_cpus,
        ray_cpus=args.ray_cpus,
        ray_address=args.ray_address,
        isolation=args.isolation,
    )
    print(f"fedlinear: {clients} clients, {args.rounds} rounds, {args.mode} mode; run dir {out}; logs {workdir}")
    started = time.monotonic()
    launch(spec, on_progress=lambda line: print(line, flush=True))
    wall = time.monotonic() - started
    status = store.read_status() if not args.app else {"status": "completed"}
    if status is None or status.get("status") != "completed":
        reason = (status or {}).get("message") or f"the run did not complete; see {workdir}/flwr-run.log"
        raise FedLinearError(reason)
    if not args.app:
        history = store.read_history()
        print()
        print(summary_table(history))
        print()
        print(comparison_line(history))
        print(f"model: {store.uri('model')}  (serving_default: x float32 [None, d] -> y [None, 1])")
    print(f"wall time {wall:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from common.data import load_matrix
    from common.export import load_savedmodel

    matrix, _, _ = load_matrix(_abs(args.input) if not storage.is_s3(args.input) else args.input, args.header)
    predict, num_features = load_savedmodel(_abs(args.model))
    width = matrix.shape[1]
    if width == num_features:
        x, y = matrix, None
    elif width == num_features + 1:
        x, y = matrix[:, :-1], matrix[:, -1]
    else:
        raise FedLinearError(
            f"{args.input}: has {width} columns; the model takes {num_features} features "
            f"(give {num_features} feature columns, optionally followed by the target)"
        )
    pred = predict(x).reshape(-1)
    text = "\n".join(f"{v:.9g}" for v in pred) + "\n"
    if args.output:
        storage.write_text(_abs(args.output), text)
        print(f"wrote {len(pred)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if y is not None:
        print(f"MSE against the last column: {float(np.mean((pred - y) ** 2)):.6g}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlinear", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

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
    synth.set_defaults(func=cmd_data_synth)

    split = data.add_parser("split", help="shard an existing CSV (IID) and hold out a test split")
    split.add_argument("input", help="CSV file or s3:// object")
    split.add_argument("--clients", type=int, required=True)
    split.add_argument("--out", required=True)
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--target-column", type=int, default=-1)
    split.add_argument("--header", choices=("auto", "yes", "no"), default="auto")
    split.set_defaults(func=cmd_data_split)

    upload = data.add_parser("upload", help="put local shards into a bucket, one object per file")
    upload.add_argument("source", help="local directory of shards")
    upload.add_argument("dest", help="s3://bucket/prefix/")
    upload.set_defaults(func=cmd_data_upload)

    run = sub.add_parser("run", help="run a whole local federation")
    run.add_argument("--data", help="directory or s3:// prefix with client-<i>.csv (+ test.csv); default: synthetic")
    run.add_argument("--shard", action="append", metavar="URI", help="one client's shard (repeatable; processes mode)")
    run.add_argument("--test", metavar="URI", help="held-out test set (default: DATA/test.csv if present)")
    run.add_argument("--clients", type=int, help="number of clients (default: all shards, or 10 synthetic)")
    run.add_argument("--rounds", type=int, default=20)
    run.add_argument("--out", required=True, help="run directory (local path or s3:// URI)")
    run.add_argument("--mode", choices=("processes", "simulation"), default="processes")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run config key (repeatable)")
    run.add_argument("--timeout", type=float, default=3600.0, help="upper bound on the whole run, seconds")
    run.add_argument("--client-cpus", type=int, default=1, help="simulation: CPUs reserved per virtual client")
    run.add_argument("--ray-cpus", type=int, default=None,
                     help="simulation: CPUs the local Ray instance hands out (Flower's init-args-num-cpus; default: "
                     "the machine's); with --client-cpus it sets how many clients run at a time")  # fmt: skip
    run.add_argument(
        "--ray-address", metavar="HOST:PORT", help="simulation: run the virtual clients on this Ray cluster (ray start)"
    )
    run.add_argument(
        "--isolation", choices=("auto", "netns", "none"), default="auto",
        help="netns: run the federation in a private network namespace (loopback only), so no other user or "
        "program on this machine can reach its SuperLink; auto (default): netns where the platform allows it "
        "and the run needs no outside network (no s3:// URI, no --ray-address), else none with a warning",
    )  # fmt: skip
    run.add_argument("--app", help=argparse.SUPPRESS)  # another Flower app dir (benchmarks)
    run.set_defaults(func=cmd_run)

    predict = sub.add_parser("predict", help="predict with an exported SavedModel")
    predict.add_argument("--model", required=True, help="RUN_DIR/model (local or s3://)")
    predict.add_argument("--input", required=True, help="CSV of d features (a trailing target column is allowed)")
    predict.add_argument("--output", help="write predictions here instead of stdout")
    predict.add_argument("--header", choices=("auto", "yes", "no"), default="auto")
    predict.set_defaults(func=cmd_predict)

    from scripts import bench

    bench.add_parser(sub)

    from scripts import deploy

    deploy.add_parser(sub)

    from scripts import sweep

    sweep.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedLinearError as exc:
        first, _, detail = str(exc).partition("\n")
        print(f"fedlinear: error: {one_line(FedLinearError(first))}", file=sys.stderr)
        if detail.strip():
            print(detail.rstrip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedlinear: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except OSError as exc:  # an unwritable --out, a full disk: one line, not a traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"fedlinear: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
