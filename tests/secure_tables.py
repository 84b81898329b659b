"""The secure-aggregation acceptance table: 3 statsmodels tables with mixed scales and the default data,
4 parties, 40 rounds at defaults with only ``secure-aggregation = true``, the real ServerApp driving the
real ClientApp handlers in one process (tests/integration/test_secure.py's SecureGrid). Prints the test
MSE of the exported raw-space model over that of numpy's least squares on the pooled shards.

    .venv/bin/python -m tests.secure_tables [--only macrodata,star98,fair,default]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

from fedlinear.common.csvio import load_csv
from fedlinear.scripts.cli import main as cli
from tests.inprocess import drive
from tests.integration.test_secure import SecureGrid
from tests.integration.test_secure_stats import optimum_ratio

TABLES = {"macrodata": "realgdp", "star98": "NABOVE", "fair": "affairs"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join([*TABLES, "default"]))
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    import statsmodels.api as sm

    print("| data | rows x features | standardize | exported test MSE / numpy LS | run's own ratio | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.only.split(","):
        root = tempfile.mkdtemp(prefix=f"secure-{name}-")
        data = os.path.join(root, "data")
        if name == "default":  # fedlinear run's default data, 4 clients
            assert cli(["data", "synth", "--out", data, "--clients", "4", "--samples-per-client", "1000",
                        "--features", "10", "--noise", "0.1", "--test-samples", "2000"]) == 0  # fmt: skip
        else:
            frame = getattr(sm.datasets, name).load_pandas().data
            frame.drop(columns=[TABLES[name]]).join(frame[TABLES[name]]).to_csv(os.path.join(root, "t.csv"), index=False)
            assert cli(["data", "split", os.path.join(root, "t.csv"), "--clients", "4", "--out", data]) == 0
        shards = [os.path.join(data, f"client-{i}.csv") for i in range(4)]
        test = os.path.join(data, "test.csv")
        config = {"run-dir": os.path.join(root, "run"), "min-available-nodes": 4, "num-server-rounds": 40,
                  "test-uri": test, "secure-aggregation": True}  # fmt: skip
        started = time.monotonic()
        manifest = drive(SecureGrid(shards, config), config).read_manifest()
        wall = time.monotonic() - started
        ratio, _ = optimum_ratio(manifest, shards, test)
        rows = sum(load_csv(uri).num_examples for uri in [*shards, test])
        print(f"| {name} | {rows} x {len(manifest['weights']['kernel'])} | {manifest['standardization']['kind']} | "
              f"{ratio:.4f} | {manifest['final']['test-mse-ratio']:.4f} | {wall:.0f} |", flush=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
