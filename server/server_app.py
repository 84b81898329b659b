"""fedlinear's ServerApp: FedAvg rounds, centralized evaluation, checkpoints and the SavedModel.

One run, in order:

1. parse the run config once; open the run directory (``run-dir``, local or ``s3://``);
2. wait (bounded by ``node-wait-timeout``) for ``min-available-nodes`` nodes (:mod:`server.nodes`);
3. ask every node about its shard (Flower's ``query`` message): feature count, size, fingerprint,
   and, unless privacy or ``reference = "none"`` says otherwise, its sufficient statistics for the
   pooled least-squares optimum. Nodes whose shard cannot be read are left out and reported; shards
   that disagree on the number of features stop the run, naming the nodes;
4. ``strategy = fedols``: solve exactly in one round (:mod:`server.fedols`); any other strategy: run
   ``num-server-rounds`` rounds of it (:mod:`server.rounds`, resuming after the last checkpoint),
   evaluating the global model on the server's test set after each round (:mod:`server.evaluation`),
   writing history and a checkpoint (:mod:`server.resume`);
5. export the SavedModel and write ``manifest.json`` (:mod:`server.finish`).

Every privacy rule of the server is in :mod:`server.privacy`; what crosses the wire is named in
:mod:`common.protocol`. Progress lines start with ``[fedlinear]`` (:mod:`server.progress`) so a
launcher can pick them out of Flower's log stream.
"""

from __future__ import annotations

import contextlib
import sys
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlinear.common import exporter
from fedlinear.common.config import RunConfig
from fedlinear.common.csvio import load_csv
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.common.runstore import RunStore
from fedlinear.server import exchange, fedols, nodes, privacy, progress, yardstick
from fedlinear.server.rounds import Rounds

app = ServerApp()


def run(grid: Grid, context: Context, store: RunStore, cfg: RunConfig) -> None:
    """One run over ``grid``, writing to ``store``; errors a user can fix are FedLinearError."""
    started = time.monotonic()
    store.write_status("running", run_id=context.run_id)
    store.hold_reserve()  # a full disk still gets its `failed` status.json, naming the file it could not write
    cfg = privacy.resolve_noise(cfg)  # dp-target-epsilon: the noise multiplier that spends it
    connected = nodes.wait_for_nodes(grid, cfg)
    progress.say(f"{len(connected)} nodes connected; querying shards")
    parties = nodes.query_nodes(grid, cfg, connected)
    yardstick.gather(grid, cfg, parties)  # the stable optimum from R factors, when the statistics flow
    num_features = parties.num_features
    exporter.prepare(num_features, cfg.fit_intercept)  # no template for this shape yet: made while the rounds run
    test = load_csv(cfg.test_uri, cfg.target_column, cfg.header) if cfg.test_uri else None
    if test is not None and test.num_features != num_features:
        raise FedLinearError(
            f"{cfg.test_uri}: test set has {test.num_features} features but the shards have {num_features}"
        )
    if cfg.strategy == "fedols":  # exact least squares in one round: no training rounds, no checkpoints
        fedols.run(grid, context, store, cfg, parties, test, started)
        return
    Rounds(grid, context, store, cfg, parties, test, started).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: errors a user can fix end the run with one line in status.json."""
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        store = RunStore(cfg.resolved_run_dir(context.run_id), background=True)
        progress.say(f"run {context.run_id}: writing to {store.run_dir}")
        previous = store.read_status()
        if previous is not None and previous.get("status") == "completed":
            # refused before anything is written: the completed run's files stay as they are
            raise FedLinearError(
                f"{store.run_dir} already holds a completed run (status.json); choose another run-dir or remove it"
            )
    except FedLinearError as exc:
        progress.say(f"error: {one_line(exc)}")
        raise SystemExit(1) from None
    try:
        # TensorFlow imports in another process while the rounds run; inside Flower's simulation engine
        # the GIL changes hands sooner (server/exchange.py)
        with exporter.for_run(progress.say), exchange.engine_scheduling(grid):
            run(grid, context, store, cfg)
    except FedLinearError as exc:
        message = one_line(exc)
        progress.say(f"error: {message}")
        with contextlib.suppress(Exception):
            store.write_status("failed", message, run_id=context.run_id)
        raise SystemExit(1) from None
    except BaseException as exc:
        with contextlib.suppress(Exception):
            store.write_status("failed", one_line(exc), run_id=context.run_id)
        raise
    finally:
        sys.stdout.flush()
