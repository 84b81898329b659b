"""The central baselines, each measured as a process of its own (so TensorFlow never loads into the
benchmark itself): ``python -m fedlinear.scripts.experiments.bench.worker --central-worker lstsq|keras
--data DIR --clients N --rounds R --out DIR`` writes ``OUT/central.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def central_worker(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    import numpy as np

    from fedlinear.common import model as lm
    from fedlinear.common.csvio import load_csv

    parts = [load_csv(os.path.join(args.data, f"client-{i}.csv")) for i in range(args.clients)]
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    test = load_csv(os.path.join(args.data, "test.csv"))
    t_loaded = time.monotonic()
    result: dict[str, Any] = {"load-s": t_loaded - t_start, "samples": len(x)}
    if args.central_worker == "lstsq":
        t0 = time.monotonic()
        weights = lm.lstsq_fit(x, y)
        result["fit-s"] = time.monotonic() - t0
        result["import-s"] = 0.0
    else:
        t0 = time.monotonic()
        import keras

        result["import-s"] = time.monotonic() - t0
        t0 = time.monotonic()
        keras.utils.set_random_seed(42)
        model = keras.Sequential([keras.Input(shape=(x.shape[1],)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mean_squared_error")
        model.fit(x.astype(np.float32), y.astype(np.float32).reshape(-1, 1), epochs=args.rounds, batch_size=32,
                  shuffle=True, verbose=0)  # fmt: skip
        result["fit-s"] = time.monotonic() - t0
        kernel, bias = model.get_weights()
        weights = lm.LinearWeights(kernel=kernel, bias=bias)
    result["test-mse"] = lm.mse(weights, test.x, test.y)
    result["process-s"] = time.monotonic() - t_start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "central.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlinear.scripts.experiments.bench.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--central-worker", choices=("lstsq", "keras"), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--out", required=True)
    return central_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
