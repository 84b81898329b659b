"""fedlinear: federated linear regression on Flower, with an exact least-squares yardstick.

One import root, ``fedlinear``, over the repository's fixed folders: ``fedlinear.common`` (Flower-free
core), ``fedlinear.clients`` (the ClientApp), ``fedlinear.server`` (the ServerApp), ``fedlinear.scripts``
(the command line and everything it launches).

The wheel installs those folders inside this package. In the repository, and in a Flower App Bundle
built from it, they stay at the top level; there each ``fedlinear/<room>/__init__.py`` is a two-line
redirect (:data:`ROOM_REDIRECT`) that points the sub-package at the folder of the same name. The
redirect is per room rather than one ``__path__`` extension here, because Flower's simulation engine
looks up the ClientApp with ``importlib.util.find_spec`` while another thread imports the ServerApp:
``find_spec`` reads a half-imported parent's ``__path__`` without waiting, so a path that only becomes
complete while this file runs made that look-up fail now and then.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

ROOMS = ("common", "clients", "server", "scripts")

# The whole text of fedlinear/<room>/__init__.py in the source layout (tests/unit/test_packaging.py
# checks the files against it; the launcher writes it into an app staged from an installed package).
ROOM_REDIRECT = '''"""Source layout: this sub-package's modules live in the repository's top-level folder of the same name."""
import os as _os

__path__ = [_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), __name__.rpartition(".")[2])]
'''

_HERE = os.path.dirname(os.path.abspath(__file__))


def installed() -> bool:
    """True for a wheel install (the rooms and ``pyproject.toml`` inside this folder)."""
    return os.path.isfile(os.path.join(_HERE, "pyproject.toml"))


def app_dir() -> str:
    """The directory holding the Flower app's ``pyproject.toml``.

    The repository root in a checkout; this package's own folder in a wheel install, where
    ``__init__.py`` stands for the repository's ``fedlinear/__init__.py`` (the launcher stages the app
    with the repository's layout from it).
    """
    return _HERE if installed() else os.path.dirname(_HERE)


def run(out=None, *, mode: str = "inline", progress=True, **options):
    """Run one federation from Python, as ``fedlinear run`` does; return a ``RunResult``.

    Every option of ``fedlinear run`` is a keyword (``clients=10``, ``rounds=20``, ``data=...``,
    ``stop_at_target=True``, ``set={"seed": 5}``), and so is every run config key in snake_case
    (``learning_rate=0.1``); ``mode`` defaults to ``"inline"``, ``out`` to a new temporary directory.
    ``progress``: True prints what the command prints, False nothing, a callable gets each line.
    The result holds ``history``, ``metrics`` (a pandas DataFrame when pandas is installed),
    ``manifest``, ``kernel`` and ``bias`` (NumPy). See docs/how-to/python-api.md.
    """
    from fedlinear.scripts.cli import api  # imported on first use: `import fedlinear` stays cheap

    return api.run(out, mode=mode, progress=progress, **options)


def sweep(out=None, *, mode: str = "inline", progress=True, **options):
    """Run ``fedlinear sweep`` from Python (its options as keywords, as :func:`run`); return its table
    (a pandas DataFrame when pandas is installed, else a list of dicts)."""
    from fedlinear.scripts.cli import api

    return api.sweep(out, mode=mode, progress=progress, **options)


def option_names(command: str = "run") -> list[str]:
    """The keywords :func:`run` (``command="sweep"``: :func:`sweep`) accepts."""
    from fedlinear.scripts.cli import api

    return api.option_names(command)
