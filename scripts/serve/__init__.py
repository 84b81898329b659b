"""``fedlinear serve``: exported models over TensorFlow Serving's REST API and KServe's V2 protocol.

:mod:`.loader` turns one SavedModel version into an immutable :class:`~.loader.Servable` (TensorFlow
loads it once; predictions are NumPy, checked against TensorFlow at load time); :mod:`.repository`
finds versions under a base path, loads new ones in the background and swaps an immutable snapshot;
:mod:`.protocol` parses and checks request bodies; :mod:`.app` is the Starlette application;
:mod:`.metrics` the Prometheus text exposition.
"""
DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes of a request body (--max-body-bytes)
