"""The serving benchmark: ``fedlinear serve`` against the naive TF-per-request server (``python -m benchmarks.serving``)."""
