"""Heterogeneous parties at defaults: public tables x the project's partitioners x 5 parties.

Three statsmodels tables (macrodata 203 x 13, star98 303 x 21, anes96 944 x 10; columns from ~1 to
~1e4 side by side) are each split into 5 parties three ways with :mod:`common.partition`: quantity
skew (Dirichlet sizes), covariate bins (``--by-column`` with 5 equal-width bins of one feature) and
target bins (5 equal-width bins of the target). Each cell is trained by the real ServerApp and
ClientApp code in one process (tests/inprocess.py) for 40 rounds, and the final (exported) model's
test MSE is divided by the pooled least-squares optimum's.

    .venv/bin/python -m tests.heterogeneity_table [--rounds 40] [--set key=value ...] [--label NAME]

prints one markdown row per cell; ``--set`` overrides config keys (e.g. ``batch-size=32``) to measure
an alternative to the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from fedlinear.common import partition
from fedlinear.common.csvio import to_csv_bytes
from fedlinear.common.dataset import Dataset

PARTIES = 5
# table -> (target column, the covariate whose bins make the covariate split)
TABLES = {"macrodata": ("realgdp", "year"), "star98": ("LOWINC", "PERHISP"), "anes96": ("TVnews", "age")}
SPLITS = ("quantity", "covariate", "target")


def table(name: str) -> tuple[Dataset, list[str]]:
    """The table as a Dataset (target last) and its column names (features then target)."""
    import statsmodels.api as sm

    frame = getattr(sm.datasets, name).load_pandas().data
    target, _ = TABLES[name]
    frame = frame.drop(columns=[target]).join(frame[target]).astype(float)
    values = frame.to_numpy()
    return Dataset(x=values[:, :-1].copy(), y=values[:, -1].copy()), list(frame.columns)


def split(name: str, how: str, seed: int = 0) -> tuple[list[Dataset], Dataset]:
    """``PARTIES`` shards and the test set of table ``name`` split ``how`` (one of :data:`SPLITS`)."""
    data, columns = table(name)
    width = len(columns)
    if how == "quantity":
        shards, test, _ = partition.split_quantity(data, PARTIES, seed, 0.2, alpha=0.5)
    elif how == "covariate":
        column = columns.index(TABLES[name][1])
        shards, test, _ = partition.split_by_column(data, column, width, width - 1, seed, 0.2, bins=PARTIES)
    else:
        shards, test, _ = partition.split_by_column(data, width - 1, width, width - 1, seed, 0.2, bins=PARTIES)
    return shards, test


def write(shards: list[Dataset], test: Dataset, root: str) -> tuple[list[str], str]:
    uris = []
    for i, shard in enumerate(shards):
        uri = os.path.join(root, f"client-{i}.csv")
        with open(uri, "wb") as handle:
            handle.write(to_csv_bytes(shard.x, shard.y))
        uris.append(uri)
    test_uri = os.path.join(root, "test.csv")
    with open(test_uri, "wb") as handle:
        handle.write(to_csv_bytes(test.x, test.y))
    return uris, test_uri


def cell(name: str, how: str, rounds: int, overrides: dict, root: str) -> dict:
    """Train one cell in-process; the manifest's final row and how the run chose its local work."""
    from tests.inprocess import run_in_process

    shards, test = split(name, how)
    os.makedirs(root, exist_ok=True)
    uris, test_uri = write(shards, test, root)
    status, manifest = run_in_process(
        uris, os.path.join(root, "run"), **{"num-server-rounds": rounds, "test-uri": test_uri, **overrides}
    )
    sizes = [s.num_examples for s in shards]
    if manifest is None:
        return {"ratio": None, "status": status.get("message", status["status"])[:120], "sizes": sizes}
    exported = manifest["exported-weights"]
    return {
        "ratio": test_mse(test, exported["kernel"], exported["bias"]) / optimum_test_mse(shards, test),
        "how": manifest["learning-rate"]["how"] + "; " + manifest.get("local-work", {}).get("how", ""),
        "sizes": sizes,
    }


def optimum_test_mse(shards: list[Dataset], test: Dataset) -> float:
    """Test MSE of the pooled least-squares fit, solved stably (centred, unit-scaled columns, SVD),
    independently of the run's own yardstick."""
    x = np.concatenate([s.x for s in shards])
    y = np.concatenate([s.y for s in shards])
    mx, my = x.mean(axis=0), y.mean()
    sx = x.std(axis=0)
    sx[sx == 0] = 1.0
    beta, *_ = np.linalg.lstsq((x - mx) / sx, y - my, rcond=None)
    kernel = beta / sx
    return test_mse(test, kernel, float(my - mx @ kernel))


def test_mse(test: Dataset, kernel, bias: float) -> float:
    residual = test.x @ np.asarray(kernel, np.float64).ravel() + float(bias) - test.y
    return float(np.mean(residual * residual))


def synthetic_iid(rounds: int, overrides: dict, root: str) -> float:
    """The README's default run (5 clients x 1000 synthetic samples, d = 10, noise 0.1, seed 42) in-process:
    the manifest's final test MSE ratio."""
    from tests.inprocess import run_in_process, write_synthetic_shards

    uris, test_uri = write_synthetic_shards(root, 5, 1000, 10, 42, 2000)
    status, manifest = run_in_process(
        uris, os.path.join(root, "run"), **{"num-server-rounds": rounds, "test-uri": test_uri, **overrides}
    )
    return float("nan") if manifest is None else manifest["final"]["test-mse-ratio"]


def main(argv: list[str] | None = None) -> int:
    from fedlinear.common.config import parse_assignments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--label", default="defaults")
    parser.add_argument("--only", help="comma-separated tables")
    parser.add_argument("--synthetic-rounds", type=int, default=5, help="rounds of the synthetic IID row (0: skip)")
    args = parser.parse_args(argv)
    overrides = parse_assignments(args.set)
    names = args.only.split(",") if args.only else list(TABLES)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_rounds:
            ratio = synthetic_iid(args.synthetic_rounds, overrides, os.path.join(tmp, "synthetic"))
            print(f"| {args.label} | synthetic IID x {args.synthetic_rounds} rounds | iid | [1000] x 5 | {ratio:.5f} | |")
        for name in names:
            for how in SPLITS:
                result = cell(name, how, args.rounds, overrides, os.path.join(tmp, name, how))
                ratio = result["ratio"]
                worst = max(worst, ratio if ratio is not None else float("inf"))
                shown = "failed: " + result["status"] if ratio is None else f"{ratio:.5f}"
                print(f"| {args.label} | {name} | {how} | {result['sizes']} | {shown} | {result.get('how', '')} |", flush=True)
    print(f"worst {worst:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
