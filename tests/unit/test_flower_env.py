"""The environment every Flower process fedlinear starts gets (scripts/local/flower.py ``flower_env``):
the venv's bin first, a private FLWR_HOME, runtime installs and the update check off, and Flower's
telemetry off unless the user's own environment says otherwise."""

from __future__ import annotations

import os
import sys

from fedlinear.scripts.local.flower import flower_env


def test_flowers_processes_run_offline_with_a_private_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    env = flower_env(str(tmp_path / "home"), token="t0k")
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"  # no usage event to telemetry.flower.ai, no 4 s wait at exit
    assert "FLWR_TELEMETRY_ENABLED" not in os.environ  # the caller's own environment is left as it was


def test_a_users_telemetry_choice_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    assert flower_env(str(tmp_path))["FLWR_TELEMETRY_ENABLED"] == "1"
