"""The Flower app's files, staged into the run's work directory for ``flwr run``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from fedlinear.common.errors import FedLinearError, one_line


def app_files(app_dir: str) -> dict[str, bytes | Path]:
    """The app's source files as ``{path in the repository's layout: file on disk, or its bytes}``.

    ``app_dir`` is a checkout (or any app laid out like one) or, for fedlinear installed from the
    wheel, the package folder: there the package's own modules (``__init__.py``, ``flower_fixes.py``)
    stand for the repository's ``fedlinear/*.py`` and each room gets the redirect the repository has
    in ``fedlinear/<room>/__init__.py``. Virtualenvs, hidden directories and caches are pruned.
    """
    import fedlinear

    installed = os.path.isfile(os.path.join(app_dir, "__init__.py"))
    found: dict[str, bytes | Path] = {}
    for root, dirs, files in os.walk(app_dir):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and d != "__pycache__" and not os.path.exists(os.path.join(root, d, "pyvenv.cfg"))
        ]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), app_dir).replace(os.sep, "/")
            own_module = installed and "/" not in rel and rel.endswith(".py")
            found[f"fedlinear/{rel}" if own_module else rel] = Path(root, name)
    if installed:
        for room in fedlinear.ROOMS:
            found[f"fedlinear/{room}/__init__.py"] = fedlinear.ROOM_REDIRECT.encode()
    return found


def stage_app(app_dir: str, dest: str) -> str:
    """Copy the Flower app's source files to ``dest`` and return it.

    ``flwr run`` walks (and resolves) every file under the app directory before it filters, which
    with a virtualenv inside the project took 10-30 s per run here. The copy keeps only the files
    Flower itself would put in the FAB (its own filter, ``flwr.cli.build.get_filtered_fab_paths``:
    the app's ``fab-include`` / ``fab-exclude`` and Flower's built-in rules), so ``flwr run`` builds
    the same FAB from a small tree; from an installed fedlinear it also restores the repository's layout.
    """
    from flwr.cli.build import get_filtered_fab_paths

    pyproject = os.path.join(app_dir, "pyproject.toml")
    if not os.path.exists(pyproject):
        raise FedLinearError(f"{app_dir}: not a Flower app (no pyproject.toml)")
    with open(pyproject, "rb") as handle:
        config = tomllib.load(handle)
    files = app_files(app_dir)
    try:
        wanted = get_filtered_fab_paths(files, config)
    except ValueError as err:
        raise FedLinearError(f"{pyproject}: {one_line(str(err))}") from None
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    shutil.copy2(pyproject, os.path.join(dest, "pyproject.toml"))
    for rel in wanted:
        target, source = os.path.join(dest, rel), files[rel]
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if isinstance(source, bytes):
            with open(target, "wb") as handle:
                handle.write(source)
        else:
            shutil.copy2(source, target)
    return dest



STAGE_TIMEOUT_S = 300.0


class Staging:
    """:func:`stage_app` in a short-lived interpreter of its own, started now, collected by :meth:`result`.

    Flower's filter (``flwr.cli.build``) imports all of ``flwr`` and ``typer``: in the launcher's own
    process that stayed resident for the whole run (~60 MiB beside a ~24 MiB launcher), and it was paid
    after the SuperLink answered. Apart, it runs while the SuperLink starts and its memory is returned
    at once. The user's error (no pyproject.toml, a bad ``fab-include``) is the same one-line
    FedLinearError, raised by :meth:`result`."""

    def __init__(self, app_dir: str, dest: str, env: dict[str, str] | None = None) -> None:
        self.app_dir, self.dest = app_dir, dest
        argv = [sys.executable, "-m", "fedlinear.scripts.local.staging", app_dir, dest]
        self.proc: subprocess.Popen | None = None
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        except OSError:  # no interpreter to spare (out of processes, memory): stage in this one
            pass

    def result(self, timeout: float = STAGE_TIMEOUT_S) -> str:
        """``dest``, once the app is staged there; FedLinearError if it could not be."""
        if self.proc is None:
            return stage_app(self.app_dir, self.dest)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise FedLinearError(f"{self.app_dir}: staging the app took over {timeout:g} s") from None
        if self.proc.returncode != 0:
            lines = [line for line in (err or "").splitlines() if line.strip()]
            raise FedLinearError(lines[-1] if lines else f"{self.app_dir}: staging the app failed (exit code {self.proc.returncode})")
        return self.dest

    def close(self) -> None:
        """Stop it if it still runs (a launch that failed before it needed the app)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m fedlinear.scripts.local.staging APP_DIR DEST", file=sys.stderr)
        return 2
    try:
        stage_app(argv[0], argv[1])
    except FedLinearError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
