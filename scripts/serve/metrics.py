"""Prometheus text exposition (format 0.0.4) of the server's requests, errors and latency.

``fedlinear_serve_requests_total{model,endpoint,code}``, ``fedlinear_serve_errors_total{model,endpoint}``
(answers with status >= 400), ``fedlinear_serve_request_duration_seconds`` (histogram per model and
endpoint), ``fedlinear_serve_model_version{model}`` (the newest version served) and
``fedlinear_serve_version_load_failures{model}`` (versions currently failed). Written by hand because
the format is a few lines of text and ``prometheus_client`` is not installed; labels are escaped as
the format requires.
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.sums: dict[tuple[str, str], float] = defaultdict(float)

    def observe(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        key = (model, endpoint)
        with self._lock:
            self.requests[(model, endpoint, code)] += 1
            if code >= 400:
                self.errors[key] += 1
            counts = self.buckets.setdefault(key, [0] * (len(BUCKETS) + 1))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self.sums[key] += seconds

    def render(self, repository) -> str:
        lines = [
            "# HELP fedlinear_serve_requests_total Requests answered, by model, endpoint and HTTP status.",
            "# TYPE fedlinear_serve_requests_total counter",
        ]
        with self._lock:
            for (model, endpoint, code), n in sorted(self.requests.items()):
                lines.append(f"fedlinear_serve_requests_total{_labels(model=model, endpoint=endpoint, code=str(code))} {n}")
            lines += [
                "# HELP fedlinear_serve_errors_total Requests answered with a status >= 400.",
                "# TYPE fedlinear_serve_errors_total counter",
            ]
            for (model, endpoint), n in sorted(self.errors.items()):
                lines.append(f"fedlinear_serve_errors_total{_labels(model=model, endpoint=endpoint)} {n}")
            lines += [
                "# HELP fedlinear_serve_request_duration_seconds Time from the request's arrival to its answer.",
                "# TYPE fedlinear_serve_request_duration_seconds histogram",
            ]
            for (model, endpoint), counts in sorted(self.buckets.items()):
                for bound, n in zip((*BUCKETS, "+Inf"), counts, strict=True):
                    le = bound if isinstance(bound, str) else f"{bound:g}"
                    lines.append(f"fedlinear_serve_request_duration_seconds_bucket{_labels(model=model, endpoint=endpoint, le=le)} {n}")
                lines.append(f"fedlinear_serve_request_duration_seconds_sum{_labels(model=model, endpoint=endpoint)} {self.sums[(model, endpoint)]:.9g}")
                lines.append(f"fedlinear_serve_request_duration_seconds_count{_labels(model=model, endpoint=endpoint)} {counts[-1]}")
        lines += [
            "# HELP fedlinear_serve_model_version The newest version served (0: none loaded).",
            "# TYPE fedlinear_serve_model_version gauge",
        ]
        snaps = [repository.snapshot(name) for name in repository.names()]
        for snap in snaps:
            lines.append(f"fedlinear_serve_model_version{_labels(model=snap.name)} {max(snap.versions, default=0)}")
        lines += [
            "# HELP fedlinear_serve_version_load_failures Versions offered that failed to load.",
            "# TYPE fedlinear_serve_version_load_failures gauge",
        ]
        for snap in snaps:
            lines.append(f"fedlinear_serve_version_load_failures{_labels(model=snap.name)} {len(snap.failures)}")
        return "\n".join(lines) + "\n"
