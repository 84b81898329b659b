"""What the launcher tells a local Ray through the environment, for Flower's simulation engine.

Flower 1.42 calls ``ray.init`` itself (``flwr/server/superlink/fleet/vce/backend/raybackend.py``,
``RayBackend.init_ray``) with the backend config's ``init_args``, and a run's federation config can
fill only four of them (``flwr/simulation/app.py``, ``_get_sim_settings``: ``init-args-num-cpus``,
``-num-gpus``, ``-logging-level``, ``-log-to-driver``); ``include_dashboard`` is already ``False``
there. Nothing else of ``ray.init`` (``_system_config``, the monitor, the log monitor) can be passed
without patching Flower, and fedlinear does not patch it. Ray's system config, however, reads every
entry from the environment as ``RAY_<name>`` (the C++ ``RayConfig``), and Ray's processes inherit
the environment of ``flwr-simulation``, which inherits the launcher's. So these are set there
(``setdefault``: a value the user exported wins):

- ``RAY_enable_worker_prestart=0``, ``RAY_prestart_worker_first_driver=0``: by default the raylet
  starts one idle worker per CPU when the driver connects, for tasks; Flower runs only actors, and
  every actor gets a worker of its own, so those workers did nothing and were killed again (2 extra
  Python processes, ~0.5 s of CPU and ~70 MiB each, during the start-up that is on the critical path).
- ``RAY_enable_metrics_collection=0``: no metrics pipeline (nothing reads a private local Ray's
  Prometheus metrics).
- ``RAY_USAGE_STATS_ENABLED=0``: no usage-stats reporting (the launcher runs offline:
  ``FLWR_DISABLE_UPDATE_CHECK`` likewise).

The launcher applies them to every simulation run of fedlinear's own app (``LaunchSpec.ray_tuning``).
Another app (``fedlinear run --app``: the benchmarks' no-op floor and quickstart-style app) runs on
Ray's defaults, as ``flwr run`` starts Flower's engine, so "below the floor" in ``fedlinear bench``
means below what Flower's engine costs as shipped; ``fedlinear bench --tuned-floor`` also measures the
floor with these settings (its speed-up is what they are worth to any app). A run on an existing
cluster (``--ray-address``) gets them too; they only matter to Ray processes started with them.
"""

from __future__ import annotations

import os

RAY_ENV = {
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def with_ray_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`RAY_ENV` where it does not set those variables already."""
    out = dict(env)
    for key, value in RAY_ENV.items():
        out.setdefault(key, value)
    return out


# One actor is enough for a local simulation of fedlinear's own app up to this many clients ...
SMALL_SIM_CLIENTS = 32
# ... whose shards (local CSV, bytes x local epochs) hold at most this much data: see one_actor_suffices.
SMALL_SIM_BYTES = 16 << 20


def one_actor_suffices(shards: list[str], num_clients: int, engine: str, local_epochs: int, secure: bool) -> bool:
    """True when a local simulation of fedlinear's own app needs no second Ray actor.

    Flower's engine paces a round by the ServerApp's polling (round times come in steps of ~0.1 s:
    0.11 or 0.21 s at 10 x 20 whether one actor or two serve them), and an actor costs ~0.17 GiB of RSS
    (Ray's worker, Flower's simulation imports: ``flwr.simulation.ray_transport.ray_actor`` alone is
    ~83 MiB; fedlinear's ClientApp adds ~2) and its start-up on the critical path. With few clients
    (``num_clients`` <= :data:`SMALL_SIM_CLIENTS`, a few ms of Flower's per-message cost each) on small
    shards (local files, ``size x local_epochs`` <= :data:`SMALL_SIM_BYTES` in all: well under a
    millisecond of NumPy per client and epoch) one actor serves a round within that step, so a second
    one buys nothing but memory. Measured at 10 x 20 (1000 x 10 per client), three runs each under load:
    peak RSS 1.40-1.42 GiB (1433-1455 MiB) with one actor against 1.56-1.57 (1596-1611 MiB) with two,
    the same CPU-seconds (16.0-20.1 against 16.6-21.9), rounds 2-20 in 3.7, 3.8, 10.8 s against 3.9,
    4.2, 12.9 s, round 1 reached sooner (9-58 s against 27-38 s, the load varied), the same weights.

    Not for the ``keras`` engine (TensorFlow per fit: real work per client), secure aggregation (its
    extra stages do per-client cryptography), ``s3://`` shards or shards that cannot be sized: those
    keep one actor per core (``spec.auto_ray_cpus``). ``--ray-cpus`` always wins.
    """
    if engine != "numpy" or secure or not shards or num_clients > SMALL_SIM_CLIENTS:
        return False
    total = 0
    for uri in shards[:num_clients]:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if "://" in path or not os.path.isfile(path):  # s3://, a directory of parts, a missing file
            return False
        try:
            total += os.path.getsize(path)
        except OSError:
            return False
    return total * max(1, local_epochs) <= SMALL_SIM_BYTES
