"""Locust user for the serving benchmark: POSTs one payload file to one path, as fast as it can.

``FEDLINEAR_BENCH_PAYLOAD`` (a JSON file) and ``FEDLINEAR_BENCH_PATH`` (e.g. ``/v1/models/m:predict``)
say what; every answer is checked to be 200 with the expected number of predictions.
``FEDLINEAR_BENCH_REQUESTS`` (optional, > 0): the run sends exactly this many requests in all (over all
users) and stops once every one of them has been answered (a smoke run bounded by work, not time; the
``-t`` time limit then only bounds a hang).
``FEDLINEAR_BENCH_SUMMARY`` (a path): on quitting, the run's totals are written there as JSON. Locust's
``--csv`` files are rewritten once a second and not at the end, so they miss the last second's requests
(all of them, in a run shorter than a second); the summary is taken from the final statistics.
"""

import json
import os

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

PAYLOAD = open(os.environ["FEDLINEAR_BENCH_PAYLOAD"], "rb").read()
ROWS = len(json.loads(PAYLOAD)["instances"])
PATH = os.environ["FEDLINEAR_BENCH_PATH"]
REQUESTS = int(os.environ.get("FEDLINEAR_BENCH_REQUESTS") or 0)
SUMMARY = os.environ.get("FEDLINEAR_BENCH_SUMMARY")
_counts = {"sent": 0, "answered": 0}  # one process, gevent: no two users run this code at once


@events.quitting.add_listener
def _write_summary(environment, **_kwargs) -> None:
    if not SUMMARY:
        return
    total = environment.stats.total
    answered = total.num_requests > 0
    with open(SUMMARY, "w") as handle:
        json.dump({
            "requests": total.num_requests, "failures": total.num_failures,
            "rps": total.total_rps if answered else None,
            "p50": total.get_response_time_percentile(0.5) if answered else None,
            "p99": total.get_response_time_percentile(0.99) if answered else None,
        }, handle)  # fmt: skip


class Predictor(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        if REQUESTS and _counts["sent"] >= REQUESTS:
            raise StopUser()  # the others' requests in flight end the run
        _counts["sent"] += 1
        with self.client.post(PATH, data=PAYLOAD, headers={"content-type": "application/json"},
                              name="predict", catch_response=True) as response:  # fmt: skip
            if response.status_code != 200 or len(response.json().get("predictions", ())) != ROWS:
                response.failure(f"HTTP {response.status_code}")
        _counts["answered"] += 1
        if REQUESTS and _counts["answered"] >= REQUESTS:
            # every request sent has been answered and recorded: nothing is cut off in flight
            gevent.spawn(self.environment.runner.quit)
            raise StopUser()
