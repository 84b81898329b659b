"""A minimal ServerApp: Flower's Message-API FedAvg for num-server-rounds, no evaluate tasks.

The only addition is a timestamp per round (through ``evaluate_fn``, which FedAvg calls before the
first round and after each one), written to ``run-dir/history.json`` in fedlinear's format so the
benchmark reads per-round times the same way for every app.
"""

import json
import os
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    started = time.monotonic()
    rounds: list[dict] = []
    run_dir = str(cfg["run-dir"])
    if run_dir:  # tells the benchmark when the ServerApp started (fedlinear's status.json does the same)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "serverapp-started.json"), "w", encoding="utf-8") as handle:
            json.dump({"app": "noop"}, handle)

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        rounds.append({"round": server_round, "elapsed-s": time.monotonic() - started})

    d = int(cfg["num-features"])
    initial = ArrayRecord([np.zeros((d, 1), np.float32), np.zeros(1, np.float32)])  # kernel, bias
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_available_nodes=int(cfg["min-available-nodes"]),
    )
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=stamp)
    if run_dir:
        with open(os.path.join(run_dir, "history.json"), "w", encoding="utf-8") as handle:
            json.dump({"app": "noop", "rounds": rounds}, handle, indent=2)
