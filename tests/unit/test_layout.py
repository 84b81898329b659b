"""The checkout's layout: one import root over the fixed folders, and what stock Flower bundles from it."""

from __future__ import annotations

import glob
import os
import sys
import zipfile

import fedlinear
from tests import bounded
from tests.conftest import REPO


def test_each_room_redirect_in_the_checkout_is_the_one_the_package_writes():
    for room in fedlinear.ROOMS:
        with open(os.path.join(REPO, "fedlinear", room, "__init__.py"), encoding="utf-8") as handle:
            assert handle.read() == fedlinear.ROOM_REDIRECT, room


def test_the_checkout_imports_every_room_from_its_top_level_folder():
    import fedlinear.clients.client_app
    import fedlinear.common.model
    import fedlinear.scripts.cli
    import fedlinear.server.server_app

    for module, room in [(fedlinear.common.model, "common"), (fedlinear.clients.client_app, "clients"),
                         (fedlinear.server.server_app, "server"), (fedlinear.scripts.cli, "scripts/cli")]:  # fmt: skip
        assert os.path.dirname(module.__file__) == os.path.join(REPO, room)
    assert fedlinear.app_dir() == REPO and not fedlinear.installed()


def test_the_editable_install_puts_no_bare_folder_name_on_sys_path(tmp_path):
    code = "import importlib.util, sys; sys.exit(sum(importlib.util.find_spec(n) is not None for n in sys.argv[1:]))"
    names = ["common", "clients", "server", "scripts", "tests", "benchmarks"]
    proc = bounded.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_stock_flwr_build_bundles_the_checkout_and_the_bundle_imports_on_its_own(tmp_path):
    proc = bounded.run([os.path.join(os.path.dirname(sys.executable), "flwr"), "build", "--app", REPO], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [fab] = glob.glob(str(tmp_path / "*.fab"))
    with zipfile.ZipFile(fab) as bundle:
        names = bundle.namelist()
        bundle.extractall(tmp_path / "app")
    assert "fedlinear/__init__.py" in names and "server/server_app.py" in names and "clients/client_app.py" in names
    assert not any(name.startswith(("tests/", "scripts/", "benchmarks/")) for name in names)
    # As Flower's loader does: the bundle first on sys.path, then the components by name.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from flwr.supercore.object_ref import load_app; "
            "c = load_app('fedlinear.clients.client_app:app', RuntimeError, sys.argv[1]); "
            "s = load_app('fedlinear.server.server_app:app', RuntimeError, sys.argv[1]); "
            "import fedlinear.common.model as m; print(m.__file__)")  # fmt: skip
    run = bounded.run([sys.executable, "-c", code, str(tmp_path / "app")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(tmp_path / "app" / "common" / "model.py")


def test_the_layer_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: scripts on top; server and clients side by side and
    independent; common at the bottom and Flower-free; no import circles among siblings anywhere."""
    from tests.lint_imports import lint_imports

    proc = lint_imports(capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert ", 0 broken." in proc.stdout, proc.stdout[-3000:]
