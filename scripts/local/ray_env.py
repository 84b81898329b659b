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
