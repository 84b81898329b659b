"""``fedlinear run``: a whole local federation (:mod:`fedlinear.scripts.local`), then its summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
import time
from typing import Any

import fedlinear
from fedlinear.common import storage
from fedlinear.common import target as targets
from fedlinear.common.config import RunConfig, parse_assignments
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.privacy import secure_statistics
from fedlinear.common.runstore import wall_time_text
from fedlinear.common.shards import CLIENT_FILE, attach_heterogeneity, find_shards, heterogeneity_line
from fedlinear.scripts.cli.options import HETEROGENEITY_OPTIONS, abs_uri, add_heterogeneity_args, heterogeneity_of
from fedlinear.scripts.cli.preflight import (
    SYNTH_FEATURES, SyntheticData, refuse_completed, refuse_other_checkpoint, refuse_over_budget,
)  # fmt: skip
from fedlinear.scripts.local.lock import lock_run_dir

APP_DIR = fedlinear.app_dir()


def summary_table(history: dict[str, Any]) -> str:
    """Per-round table: the columns that have values in this run."""
    rows = history["rounds"]
    cols = [
        ("round", "round", "{:>5d}"),
        ("train-loss", "train loss", "{:>11.6g}"),
        ("test-mse", "test MSE", "{:>11.6g}"),
        ("test-mse-ratio", "MSE / LS", "{:>9.5f}"),
        ("excess-train-mse", "excess train MSE", "{:>11.4g}"),
        ("excess-test-mse", "excess test MSE", "{:>11.4g}"),
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


def resolve_data(
    args: argparse.Namespace, out: str, overrides: dict[str, Any]
) -> tuple[list[str], str | None, str, SyntheticData | None]:
    """(explicit shard URIs, a {partition-id} template or None, test URI or "", the synthetic data to write
    or None) for ``fedlinear run``. Nothing is written here: synthetic data is written into ``out`` by
    :meth:`SyntheticData.publish` once every check has passed."""
    template = overrides.pop("data-uri", None)
    if args.test and "test-uri" in overrides:
        raise FedLinearError("give the test set one way: --test or --set test-uri, not both")
    test_uri = abs_uri(args.test) if args.test else overrides.pop("test-uri", "")
    if args.shard:
        if args.data or template:
            raise FedLinearError("give the shards one way: --shard, --data or --set data-uri=TEMPLATE")
        return [abs_uri(uri) for uri in args.shard], None, test_uri, None
    if template:
        if args.data:
            raise FedLinearError("give the shards one way: --data or --set data-uri=TEMPLATE")
        if not args.clients:
            raise FedLinearError("--set data-uri=TEMPLATE needs --clients N")
        shards = [template.replace("{partition-id}", str(i)) for i in range(args.clients)]
        return shards, template, test_uri, None
    if not args.data:
        seed = int(overrides.get("seed", RunConfig.seed))
        synth = SyntheticData(storage.join(out, "data"), args.clients or 10, seed, heterogeneity_of(args))
        return synth.shards, synth.template, test_uri or synth.test_uri, synth
    data = abs_uri(args.data)
    shards = find_shards(data)
    if not test_uri and storage.exists(storage.join(data, "test.csv")):
        test_uri = storage.join(data, "test.csv")
    return shards, storage.join(data, "client-{partition-id}.csv"), test_uri, None


def write_local_statistics(shards: list[str], uri: str, cfg: RunConfig) -> str:
    """Pooled statistics of the shards this machine holds, written to ``uri`` (the yardstick under privacy)."""
    import numpy as np

    from fedlinear.common.csvio import load_csv
    from fedlinear.common.scaling import PooledStats
    from fedlinear.common.yardstick import local_factors

    parts = [load_csv(shard, cfg.target_column, cfg.header) for shard in shards]
    x, y = np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    PooledStats.of(x, y).save(uri, local_factors(x, y))  # with the R factors: the yardstick solved stably
    return uri


def last_round_text(store) -> str:
    pointer = store.uri("checkpoints", "latest.json")
    if not storage.exists(pointer):
        return "no round was checkpointed"
    return f"last checkpoint: round {json.loads(storage.read_text(pointer))['round']}"


def mark_interrupted(store, exc: BaseException) -> FedLinearError:
    """After a run that ended without finishing (status.json still ``running``): record ``failed`` with
    the reason and how to resume, and return that as the error to report."""
    text = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
    first, _, detail = text.partition("\n")
    reason = one_line(FedLinearError(first))
    try:
        status = store.read_status()
    except Exception:  # noqa: BLE001 - an unreadable status must not hide the real error
        status = None
    from fedlinear.scripts.local.spec import RunInterrupted

    # the ServerApp may have noted the stop this CLI caused (as a KeyboardInterrupt): the cause is ours
    stopped_by_us = isinstance(exc, PartyLeftOut | RunInterrupted | KeyboardInterrupt)
    state = (status or {}).get("status")
    if state is None or state == "completed" or (state != "running" and not stopped_by_us):
        return exc if isinstance(exc, FedLinearError) else FedLinearError(text)
    hint = "run the same command again to resume"
    if not isinstance(exc, PartyLeftOut) and hint not in reason:
        reason = f"{reason}; {last_round_text(store)}: {hint}"
    try:
        store.write_status("failed", reason, run_id=status.get("run_id"))
    except Exception as unwritten:  # noqa: BLE001 - e.g. a full disk: the line says so, status.json cannot
        reason = f"{reason} (status.json still says running: {one_line(unwritten)})"
    return FedLinearError(reason + (f"\n{detail}" if detail.strip() else ""))


# The ServerApp's progress line for a party it could not use (server/server_app.py query_nodes).
LEFT_OUT = re.compile(r"^node (\S+) left out: (.*)$")


class PartyLeftOut(FedLinearError):
    """A local run lost a party (its shard could not be read): every shard is the user's, so it is an error."""


class Progress:
    """Prints the ServerApp's progress lines; in a local run a party left out ends the run at once
    (``--allow-missing-parties`` lets it go on without it)."""

    def __init__(self, allow_missing: bool) -> None:
        self.allow_missing = allow_missing

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        match = LEFT_OUT.match(line)
        if match and not self.allow_missing:
            raise PartyLeftOut(
                f"{match.group(2)} (node {match.group(1)}: a local run needs every party; "
                "--allow-missing-parties goes on without it)"
            )


def parties_line(history: dict[str, Any], clients: int) -> str:
    """``parties: 9 of 10 took part; node 7 left out: ...`` (from the shard query's failures)."""
    failures = history.get("query-failures") or []
    line = f"parties: {clients - len(failures)} of {clients} took part"
    return "; ".join([line, *(f"node {f.get('node-id')} left out: {f.get('reason')}" for f in failures)])


def target_config(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """``--target R`` / ``--stop-at-target`` as run config keys (``target-mse-ratio``, ``stop-at-target``)."""
    out: dict[str, Any] = {}
    for given, key, value in (
        (getattr(args, "target", None) is not None, "target-mse-ratio", getattr(args, "target", None)),
        (getattr(args, "stop_at_target", False), "stop-at-target", "true"),
    ):
        if not given:
            continue
        if key in overrides:
            option = "--target" if key == "target-mse-ratio" else "--stop-at-target"
            raise FedLinearError(f"give {key} one way: {option} or --set {key}, not both")
        out.update(parse_assignments([f"{key}={value}"]))
    return out


def cmd_run(args: argparse.Namespace) -> int:
    if args.clients is not None and args.clients < 1:
        raise FedLinearError(f"--clients must be >= 1, got {args.clients}")
    if args.rounds < 1:
        raise FedLinearError(f"--rounds must be >= 1, got {args.rounds}")
    heterogeneity_of(args).check(args.clients or 10, 1000, 0.1)  # the synthetic options, before anything is written
    from fedlinear.common.runstore import RunStore
    from fedlinear.scripts.local.launch import launch
    from fedlinear.scripts.local.spec import LaunchSpec

    out = abs_uri(args.out)
    publish_base = abs_uri(args.publish) if args.publish else None
    overrides = parse_assignments(args.set)
    given = [f"--{name.replace('_', '-')}" for name in HETEROGENEITY_OPTIONS if getattr(args, name, None) is not None]
    if given and (args.shard or args.data or "data-uri" in overrides):
        raise FedLinearError(f"{given[0]} shapes the synthesised data: it cannot be used with --data, --shard or data-uri")
    shards, template, test_uri, synth = resolve_data(args, out, overrides)
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
    if args.mode == "inline" and not shards:
        raise FedLinearError("inline mode needs the shards: --data DIR, --shard URI or --set data-uri=TEMPLATE")
    if args.mode == "inline":  # the simulation engine's node configs, with each node's shard (as processes mode)
        if template is not None:
            run_config["data-uri"] = template
        node_configs = [
            {"partition-id": i, "num-partitions": clients, "data-uri": uri} for i, uri in enumerate(shards)
        ]
    elif args.mode == "simulation":
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
    run_config.update(target_config(args, overrides))
    # Every check that can refuse, before the first byte is written into the run directory (preflight.py)
    cfg = RunConfig.from_run_config(run_config)  # fail here, with a clear message, not in the ServerApp
    refuse_over_budget(cfg)
    store = RunStore(cfg.run_dir)
    refuse_completed(store, out)
    refuse_other_checkpoint(store, cfg, synth and SYNTH_FEATURES, None if synth else shards, cfg.test_uri)
    if synth is not None:
        synth.stage()  # refuses a data/ that holds other data
    try:
        locked = [lock_run_dir(out)]  # kept to the end (the watchdog inherits it)
        previous = refuse_completed(store, out)  # again, under the lock: a run may have finished meanwhile
    except BaseException:
        if synth is not None:
            synth.discard()
        raise
    if synth is not None:
        synth.publish()
    if previous is not None and previous.get("status") == "running":
        # nobody holds the lock, so the run that wrote this was killed before it could say so
        print(f"fedlinear: the last run in {out} was interrupted ({last_round_text(store)}); it resumes from there")
    if cfg.private and not secure_statistics(cfg.dp, cfg.secure_aggregation) and not cfg.statistics_uri and shards:
        # Under DP no node sends statistics: this machine holds every shard, so it computes the
        # pooled statistics itself, for the yardstick (and for standardization if declared public).
        # Under secure aggregation alone the nodes sum them through SecAgg+ (server/securestats.py).
        run_config["statistics-uri"] = write_local_statistics(shards[:clients], store.uri("statistics.npz"), cfg)
        print(f"privacy on: pooled statistics for the yardstick computed here from the shards -> {run_config['statistics-uri']}")
    workdir = os.path.join(out, "logs") if not storage.is_s3(out) else tempfile.mkdtemp(prefix="fedlinear-logs-")
    ray_cpus = args.ray_cpus
    if ray_cpus is None and args.mode == "simulation" and not args.ray_address and not args.app:
        from fedlinear.scripts.local.ray_env import one_actor_suffices

        if one_actor_suffices(shards, clients, cfg.engine, cfg.local_epochs, cfg.secure_aggregation):
            ray_cpus = args.client_cpus  # exactly one actor: a second would buy memory only (ray_env.py)
    spec = LaunchSpec(
        app_dir=abs_uri(args.app) if args.app else APP_DIR,
        mode=args.mode,
        num_nodes=clients,
        run_config=run_config,
        workdir=workdir,
        node_configs=node_configs,
        run_timeout=args.timeout,
        client_cpus=args.client_cpus,
        ray_cpus=ray_cpus,
        ray_address=args.ray_address,
        isolation=args.isolation,
        flower_without_tf=not args.app,  # fedlinear's own app needs no TensorFlow in Flower's engine (not the floor's)
        ray_tuning=not args.app,  # another app (the benchmarks' floor) runs on Flower's engine as Flower starts it
        warm_clientapps=not args.app,  # ... and on Flower's deployment runtime as Flower starts it
        pool=getattr(args, "pool", "auto"),
        workers=getattr(args, "workers", None),
    )
    print(f"fedlinear: {clients} clients, {args.rounds} rounds, {args.mode} mode; run dir {out}; logs {workdir}")
    if ray_cpus is not None and args.ray_cpus is None:
        print("simulation: one Ray actor serves this small run (few clients, small shards); --ray-cpus N for more")
    started = time.monotonic()
    progress = Progress(allow_missing=args.allow_missing_parties or bool(args.app))
    try:
        launch(spec, on_progress=progress, keep_open=locked)
    except FedLinearError as exc:
        raise mark_interrupted(store, exc) from None
    except BaseException as exc:  # Ctrl-C: status.json must not say "running" for a run that is not
        mark_interrupted(store, exc)
        raise
    wall = time.monotonic() - started
    status = store.read_status() if not args.app else {"status": "completed"}
    if status is not None and status.get("status") == "running":
        raise mark_interrupted(store, FedLinearError("the ServerApp ended without finishing the run"))
    if status is None or status.get("status") != "completed":
        reason = (status or {}).get("message") or f"the run did not complete; see {workdir}/flwr-run.log"
        if "cannot write (" in reason and "run the same command again" not in reason:  # e.g. a full disk
            reason += f"; {last_round_text(store)}: fix that (free space), then run the same command again to resume"
        raise FedLinearError(reason)
    if not args.app:
        history = store.read_history()
        print()
        print(summary_table(history))
        print()
        print(comparison_line(history))
        for line in targets.summary_lines(history, cfg.num_server_rounds):
            print(line)
        print(parties_line(history, clients))
        print(f"model: {store.uri('model')}  (serving_default: x float32 [None, d] -> y [None, 1])")
        if template is not None and template.endswith("/" + CLIENT_FILE.format(i="{partition-id}")):
            summary = attach_heterogeneity(store, template.rsplit("/", 1)[0])
            if summary is not None:
                note = "" if summary["shards_match"] is not False else " (WARNING: it does not match the shards trained on)"
                print(f"data heterogeneity: {heterogeneity_line(summary)}; in manifest.json{note}")
    if publish_base is not None:
        from fedlinear.common.modelrepo import publish_run

        version, uri = publish_run(out, publish_base)
        print(f"published: {uri} (version {version} of {publish_base}; `fedlinear serve {publish_base}` picks it up)")
    print(wall_time_line(None if args.app else store, wall))
    return 0


def wall_time_line(store, wall: float) -> str:
    """The run's wall time as ``fedlinear report`` shows it (manifest.json ``wall-time-s``), then how long
    this command took in all (start-up and shutdown of the SuperLink and nodes included)."""
    total = f"fedlinear run {wall:.1f} s in all, start-up and shutdown included"
    with contextlib.suppress(Exception):  # no manifest (another app): the command's own time only
        recorded = store.read_manifest()["wall-time-s"]
        return f"wall time {wall_time_text(float(recorded))}; {total}"
    return f"wall time: {total}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedlinear run``."""
    run = sub.add_parser("run", help="run a whole local federation")
    run.add_argument("--data", help="directory or s3:// prefix with client-<i>.csv (+ test.csv); default: synthetic")
    run.add_argument("--shard", action="append", metavar="URI", help="one client's shard (repeatable; processes mode)")
    run.add_argument("--test", metavar="URI", help="held-out test set (default: DATA/test.csv if present)")
    run.add_argument("--clients", type=int, help="number of clients (default: all shards, or 10 synthetic)")
    run.add_argument("--rounds", type=int, default=20)
    run.add_argument("--out", required=True, help="run directory (local path or s3:// URI)")
    run.add_argument("--mode", choices=("processes", "simulation", "inline"), default="processes",
                     help="processes: a SuperLink and one SuperNode per client; simulation: Flower's simulation engine "
                     "(Ray); inline: the same apps in this process without Flower's runtime, every message through "
                     "Flower's serialization (the fastest way to run experiments on one machine)")
    run.add_argument("--pool", choices=("auto", "serial", "threads", "processes"), default="auto",
                     help="inline: how the clients run (default auto: see docs/how-to/scaling.md)")
    run.add_argument("--workers", type=int, default=None,
                     help="inline: clients run at a time with --pool threads/processes (default: the cores this process may use)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run config key (repeatable)")
    run.add_argument("--timeout", type=float, default=3600.0, help="upper bound on the whole run, seconds")
    run.add_argument("--client-cpus", type=int, default=1, help="simulation: CPUs reserved per virtual client")
    run.add_argument("--ray-cpus", type=int, default=None,
                     help="simulation: CPUs the local Ray instance hands out (Flower's init-args-num-cpus; default: "
                     "the machine's, or --client-cpus (one actor) for a small run: docs/how-to/scaling.md); with "
                     "--client-cpus it sets how many clients run at a time")  # fmt: skip
    run.add_argument(
        "--ray-address", metavar="HOST:PORT", help="simulation: run the virtual clients on this Ray cluster (ray start)"
    )
    run.add_argument(
        "--isolation", choices=("auto", "netns", "none"), default="auto",
        help="netns: run the federation in a private network namespace (loopback only), so no other user or "
        "program on this machine can reach its SuperLink; auto (default): netns where the platform allows it "
        "and the run needs no outside network (no s3:// URI, no --ray-address), else none with a warning",
    )  # fmt: skip
    add_heterogeneity_args(run)  # for the synthesised default data only
    run.add_argument(
        "--allow-missing-parties", action="store_true",
        help="go on without a party whose shard cannot be read (default: a local run stops with that error)",
    )  # fmt: skip
    run.add_argument("--target", metavar="R",
                     help="target test MSE / the pooled least-squares optimum's (>= 1; config key target-mse-ratio): "
                     "the summary says at which round it was reached")
    run.add_argument("--stop-at-target", action="store_true",
                     help="with --target: end the run after the first round that reaches it (its model is the "
                     "result)")  # fmt: skip
    run.add_argument("--publish", metavar="BASE",
                     help="after the run, publish its model as the next version BASE/N (TF Serving's layout, local "
                     "or s3://; atomic) for `fedlinear serve BASE`")
    run.add_argument("--app", help=argparse.SUPPRESS)  # another Flower app dir (benchmarks)
    run.set_defaults(func=cmd_run)
