"""A ClientApp that crosses a process boundary as its import path, not as a copy of its handlers.

Flower 1.42's simulation engine sends the ClientApp to a Ray actor with *every* message: the Ray
backend submits ``actor.run.remote(app_fn, message, cid, context)``
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``, ``RayBackend.process_message``), and
``app_fn`` is a closure over the loaded ClientApp (``flwr/server/superlink/fleet/vce/vce_api.py``,
``_load_client_app``). Ray pickles it with cloudpickle; a ClientApp's registered handlers are
closures Flower makes at registration (``flwr/clientapp/client_app.py``, ``make_ffn``), so they
are pickled *by value*, code objects included: for fedlinear's app (query, train with its mod,
evaluate) 2.5 KB a message, ~4x the no-op app's pickling and unpickling time, paid in
``flwr-simulation`` (the engine's bottleneck process) and again in the actor.

:class:`ClientAppByName` pickles as ``(import_attribute, (module, attribute))``: unpickled, it is
that module's own ClientApp in the receiving process (imported once, as the by-value copy already
imported the handlers' module), with the same handlers and mods, so a message gives the same reply
bit for bit. Nothing else changes: Flower's loader, ``flwr-clientapp`` and the in-process engines use
the object directly.
"""

from __future__ import annotations

import importlib
from typing import Any

from flwr.clientapp import ClientApp


def import_attribute(module: str, attribute: str) -> Any:
    """``module.attribute``, importing the module if this process has not yet."""
    return getattr(importlib.import_module(module), attribute)


class ClientAppByName(ClientApp):
    """A :class:`flwr.clientapp.ClientApp` that pickles as a reference to ``module:attribute``."""

    def __init__(self, module: str, attribute: str = "app", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._import_path = (module, attribute)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return import_attribute, self._import_path
