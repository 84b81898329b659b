"""The app's copy for `flwr run` (scripts/local/staging.py), made in an interpreter of its own while the
SuperLink starts: the same files as in-process staging, the same one-line error, nothing left running."""

from __future__ import annotations

import os

import pytest

import fedlinear
from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local.staging import Staging, stage_app


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


def test_apart_gives_the_same_files_as_in_process(tmp_path):
    app = fedlinear.app_dir()
    inproc = stage_app(app, str(tmp_path / "in"))
    apart = Staging(app, str(tmp_path / "apart"))
    try:
        assert apart.result() == str(tmp_path / "apart")
    finally:
        apart.close()
    assert _tree(inproc) == _tree(str(tmp_path / "apart"))
    assert "pyproject.toml" in _tree(inproc)


def test_a_bad_app_is_the_same_one_line_error(tmp_path):
    with pytest.raises(FedLinearError) as inproc:
        stage_app(str(tmp_path), str(tmp_path / "in"))
    staging = Staging(str(tmp_path), str(tmp_path / "apart"))
    with pytest.raises(FedLinearError) as apart:
        staging.result()
    staging.close()
    assert str(apart.value) == str(inproc.value)
    assert "\n" not in str(apart.value) and "not a Flower app" in str(apart.value)


def test_close_stops_a_staging_nobody_waited_for(tmp_path):
    staging = Staging(fedlinear.app_dir(), str(tmp_path / "app"))
    staging.close()
    assert staging.proc.poll() is not None


def test_without_a_spare_interpreter_it_stages_in_this_process(tmp_path, monkeypatch):
    import subprocess

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    staging = Staging(fedlinear.app_dir(), str(tmp_path / "app"))
    assert staging.proc is None
    assert staging.result() == str(tmp_path / "app")
    assert os.path.isfile(tmp_path / "app" / "pyproject.toml")
    staging.close()
