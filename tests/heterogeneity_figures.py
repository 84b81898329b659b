"""The figures of docs/how-to/heterogeneous-parties.md: FedAvg on each kind of heterogeneity, in-process.

    .venv/bin/python -m tests.heterogeneity_figures [--rounds 20] [--clients 10]

Writes each data set with ``fedlinear data synth`` (the default data of ``fedlinear run``: d = 10,
1000 samples a party, noise 0.1, seed 42, plus one option), runs the real ServerApp and ClientApp
handlers in this process (tests/inprocess.py: no SuperLink, so the figures do not depend on the
machine's load) and prints the final test MSE over the pooled least-squares optimum's, the
distance of the federated weights to the pooled least-squares weights, and the heterogeneity summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

CASES = [
    ("IID (default)", []),
    ("quantity skew", ["--quantity-alpha", "0.3"]),
    ("covariate shift", ["--covariate-shift", "1"]),
    ("concept shift", ["--concept-spread", "0.5"]),
    ("label-noise skew", ["--noise-skew", "1"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    opts = parser.parse_args()
    from fedlinear.common import shards as layout
    from fedlinear.scripts import cli
    from tests.inprocess import run_in_process

    print(f"| data ({opts.clients} parties, {opts.rounds} rounds) | heterogeneity (summary line) | LS test MSE "
          "| FedAvg MSE / LS | weight distance | s |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CASES:
            data = os.path.join(tmp, name.split()[0])
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                cli.main(["data", "synth", "--out", data, "--clients", str(opts.clients), "--seed", "42", *extra])
            shards = [os.path.join(data, f"client-{i}.csv") for i in range(opts.clients)]
            started = time.monotonic()
            status, manifest = run_in_process(
                shards, os.path.join(tmp, "run-" + name.split()[0]),
                **{"num-server-rounds": opts.rounds, "test-uri": os.path.join(data, "test.csv")},
            )  # fmt: skip
            wall = time.monotonic() - started
            summary = layout.data_heterogeneity(data)
            shown = layout.heterogeneity_line(summary) if summary else "none"
            if status["status"] != "completed":
                print(f"| {name} | {shown} | | failed: {status.get('message')} | | {wall:.1f} |")
                continue
            final = manifest["final"]
            label = f"{name} `{' '.join(extra)}`" if extra else name
            print(f"| {label} | {shown} | {manifest['reference']['test-mse']:.4g} | {final['test-mse-ratio']:.4f} | "
                  f"{final['weight-distance']:.3g} | {wall:.1f} |")  # fmt: skip
    print(json.dumps({"rounds": opts.rounds, "clients": opts.clients}))


if __name__ == "__main__":
    main()
