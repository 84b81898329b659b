"""Model and data, the way Flower's quickstart-tensorflow ``task.py`` does it.

The model is built and compiled on every call, and each task re-reads its shard: what a user writes
after the quickstart, and exactly the costs fedlinear is designed to avoid.
"""

import os

import keras
import numpy as np

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def load_model(num_features: int, learning_rate: float = 0.05) -> keras.Model:
    model = keras.Sequential([keras.Input(shape=(num_features,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mean_squared_error")
    return model


def load_data(context) -> tuple[np.ndarray, np.ndarray]:
    """This node's shard: --node-config data-uri (deployment) or the run config's template."""
    uri = str(context.node_config.get("data-uri") or context.run_config["data-uri"])
    uri = uri.replace("{partition-id}", str(context.node_config["partition-id"]))
    data = np.loadtxt(uri, delimiter=",", ndmin=2, dtype=np.float32)
    return data[:, :-1], data[:, -1:]
