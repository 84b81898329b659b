"""The quickstart-style ServerApp: Flower's FedAvg.start, then save the final Keras model.

Two additions to the quickstart, neither on the hot path: a timestamp per round (through
``evaluate_fn``) written to ``run-dir/history.json`` in fedlinear's format, and the final weights
saved to ``run-dir`` (absolute) instead of the current directory, so the benchmark can check accuracy.
"""

import json
import os
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchquickstart.task import load_model

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
            json.dump({"app": "quickstart"}, handle)

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        rounds.append({"round": server_round, "elapsed-s": time.monotonic() - started})

    model = load_model(int(cfg["num-features"]), cfg["learning-rate"])
    strategy = FedAvg(
        fraction_train=cfg["fraction-train"],
        fraction_evaluate=cfg["fraction-evaluate"],
        min_available_nodes=int(cfg["min-available-nodes"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.get_weights()),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=stamp,
    )
    ndarrays = result.arrays.to_numpy_ndarrays()
    model.set_weights(ndarrays)
    run_dir = run_dir or os.getcwd()
    model.save(os.path.join(run_dir, "final_model.keras"))
    np.savez(os.path.join(run_dir, "final-weights.npz"), kernel=ndarrays[0], bias=ndarrays[1])
    with open(os.path.join(run_dir, "history.json"), "w", encoding="utf-8") as handle:
        json.dump({"app": "quickstart", "rounds": rounds}, handle, indent=2)
