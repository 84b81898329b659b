"""fedlinear installs as one package: the wheel, a fresh venv, a federation run from an empty directory.

The wheel test builds the project's wheel exactly as ``pip install .`` does, installs it
(non-editable) into a new virtualenv and runs ``fedlinear run`` in both modes from an empty directory
outside the checkout. To keep it within a minute or two, the new venv borrows the test venv's
*third-party* packages read-only (one ``.pth`` line naming that site-packages folder; ``.pth`` files in
a folder added that way are not processed, so the checkout's editable hook never runs there), and
``fedlinear`` itself plus ``flwr`` (for its console scripts) are installed into it for real.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import fedlinear
from tests import bounded
from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = bounded.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), REPO],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = glob.glob(os.path.join(out, "fedlinear-*.whl"))
    return path


def test_the_wheel_holds_one_top_level_package_and_the_app_definition(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedlinear"}
    for room in fedlinear.ROOMS:  # the rooms' own __init__, not the checkout's redirect
        assert f"fedlinear/{room}/__init__.py" in names
        assert zipfile.ZipFile(wheel).read(f"fedlinear/{room}/__init__.py").decode() != fedlinear.ROOM_REDIRECT
    assert "fedlinear/pyproject.toml" in names and "fedlinear/server/server_app.py" in names
    assert "fedlinear/flower_fixes.py" in names
    assert not any(name.startswith(("fedlinear/tests", "fedlinear/benchmarks")) for name in names)


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory):
    venv = str(tmp_path_factory.mktemp("venv"))
    bounded.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    purelib = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # Every site-packages folder this interpreter sees (its own, and any a .pth of its own added).
    borrowed = [sysconfig.get_paths()["purelib"]] + [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    with open(os.path.join(purelib, "_borrowed_dependencies.pth"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(dict.fromkeys(borrowed)) + "\n")
    # --ignore-installed: pip sees the borrowed packages (the editable fedlinear among them) and must not
    # uninstall anything from the test venv; flwr is installed for real only for its console scripts.
    flwr_version = __import__("importlib.metadata").metadata.version("flwr")
    proc = bounded.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--no-deps", "--ignore-installed",
                           wheel, f"flwr=={flwr_version}"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


@pytest.mark.parametrize("mode", ["processes", "simulation"])
def test_a_wheel_install_runs_a_federation_from_an_empty_directory(fresh_venv, tmp_path, mode):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.path.join(fresh_venv, "bin") + os.pathsep + "/usr/bin:/bin"
    where = bounded.run([os.path.join(fresh_venv, "bin", "python"), "-c", "import fedlinear.server.server_app as s; print(s.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert where.returncode == 0 and where.stdout.startswith(fresh_venv), where.stdout + where.stderr
    out = tmp_path / "run"
    proc = bounded.run([os.path.join(fresh_venv, "bin", "fedlinear"), "run", "--clients", "2", "--rounds", "2",
                           "--mode", mode, "--out", str(out)], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "parties: 2 of 2 took part" in proc.stdout
    assert os.path.isfile(out / "model" / "saved_model.pb")
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    assert os.listdir(empty) == []  # nothing written where the user stood
    # The app Flower ran was staged from the installed package, laid out as in the repository.
    staged = out / "logs" / "app"
    assert (staged / "fedlinear" / "clients" / "__init__.py").read_text() == fedlinear.ROOM_REDIRECT
    assert (staged / "server" / "server_app.py").read_bytes() == open(os.path.join(REPO, "server", "server_app.py"), "rb").read()
