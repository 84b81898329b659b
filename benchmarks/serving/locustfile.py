"""Locust user for the serving benchmark: POSTs one payload file to one path, as fast as it can.

``FEDLINEAR_BENCH_PAYLOAD`` (a JSON file) and ``FEDLINEAR_BENCH_PATH`` (e.g. ``/v1/models/m:predict``)
say what; every answer is checked to be 200 with the expected number of predictions.
"""

import json
import os

from locust import FastHttpUser, constant, task

PAYLOAD = open(os.environ["FEDLINEAR_BENCH_PAYLOAD"], "rb").read()
ROWS = len(json.loads(PAYLOAD)["instances"])
PATH = os.environ["FEDLINEAR_BENCH_PATH"]


class Predictor(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        with self.client.post(PATH, data=PAYLOAD, headers={"content-type": "application/json"},
                              name="predict", catch_response=True) as response:  # fmt: skip
            if response.status_code != 200 or len(response.json().get("predictions", ())) != ROWS:
                response.failure(f"HTTP {response.status_code}")
