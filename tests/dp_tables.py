"""The DP acceptance table: 3 statsmodels tables with mixed scales and the default data, 4 parties
(``--parties``), 40 rounds, DP-FedAvg central (``dp = central-server-clip``) with fixed and with adaptive
clipping, every other key at its default; the real ServerApp driving the real ClientApp handlers in one
process (tests/inprocess.py). Prints whether each run completed, the test MSE of the exported raw-space
model over that of numpy's least squares on the pooled shards, ε, and which standardization applied.

    .venv/bin/python -m tests.dp_tables [--only macrodata,star98,fair,default] [--parties 4] [--set key=value]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

from fedlinear.common.config import parse_assignments
from fedlinear.scripts.cli import main as cli
from tests.inprocess import run_in_process
from tests.integration.test_secure_stats import optimum_ratio
from tests.secure_tables import TABLES

MODES = {"fixed": {"dp": "central-server-clip", "dp-clipping": "fixed"},
         "adaptive": {"dp": "central-server-clip", "dp-clipping": "adaptive"}}  # fmt: skip


def make_data(name: str, root: str, parties: int) -> tuple[list[str], str]:
    """``parties`` shards and a test split of table ``name`` (or fedlinear's default synthetic data)."""
    data = os.path.join(root, "data")
    if name == "default":
        assert cli(["data", "synth", "--out", data, "--clients", str(parties), "--samples-per-client",
                    str(4000 // parties), "--features", "10", "--noise", "0.1", "--test-samples", "2000"]) == 0  # fmt: skip
    else:
        import statsmodels.api as sm

        frame = getattr(sm.datasets, name).load_pandas().data
        frame.drop(columns=[TABLES[name]]).join(frame[TABLES[name]]).to_csv(os.path.join(root, "t.csv"), index=False)
        assert cli(["data", "split", os.path.join(root, "t.csv"), "--clients", str(parties), "--out", data]) == 0
    return [os.path.join(data, f"client-{i}.csv") for i in range(parties)], os.path.join(data, "test.csv")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join([*TABLES, "default"]))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    extra = parse_assignments(args.set)
    print("| data | clipping | status | exported test MSE / numpy LS | ε | standardization | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.only.split(","):
        root = tempfile.mkdtemp(prefix=f"dp-{name}-")
        shards, test = make_data(name, root, args.parties)
        for mode in args.modes.split(","):
            config = {"num-server-rounds": args.rounds, "test-uri": test, **MODES[mode], **extra}
            started = time.monotonic()
            status, manifest = run_in_process(shards, os.path.join(root, f"run-{mode}"), **config)
            wall = time.monotonic() - started
            if manifest is None:
                print(f"| {name} | {mode} | {status['status']}: {status.get('message', '')[:90]} | | | | {wall:.0f} |", flush=True)
                continue
            ratio, _ = optimum_ratio(manifest, shards, test)
            privacy = manifest.get("privacy", {})
            stats = privacy.get("statistics", manifest["standardization"]["kind"])
            print(f"| {name} | {mode} | completed | {ratio:.4g} | {privacy.get('epsilon', float('nan')):.4g} | "
                  f"{stats if isinstance(stats, str) else stats.get('source')} | {wall:.0f} |", flush=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
