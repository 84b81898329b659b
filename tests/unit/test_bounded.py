"""tests/bounded.py: a wait bounded by work (quiet time x load), failing with the process's output."""

from __future__ import annotations

import sys
import time

import pytest

from tests import bounded


def test_the_budget_is_spent_more_slowly_under_load(monkeypatch):
    monkeypatch.setattr(bounded, "slowdown", lambda: 4.0)
    budget = bounded.Budget(0.1, factor=1.0, ceiling=100.0)  # 0.1 s at a quiet rate = 0.4 s at load 4 per core
    time.sleep(0.2)
    assert not budget.spent()
    time.sleep(0.3)
    assert budget.spent()


def test_the_ceiling_ends_a_wait_whatever_the_load(monkeypatch):
    monkeypatch.setattr(bounded, "slowdown", lambda: 1000.0)
    budget = bounded.Budget(0.1, factor=1.0, ceiling=2.0)
    time.sleep(0.25)
    assert budget.spent()


def test_a_process_past_its_bound_fails_with_its_output(monkeypatch):
    monkeypatch.setattr(bounded, "FACTOR", 1.0)
    monkeypatch.setattr(bounded, "slowdown", lambda: 1.0)
    code = "import sys, time; print('partial output', flush=True); print('on stderr', file=sys.stderr, flush=True); time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        bounded.run([sys.executable, "-c", code], 2.0, capture_output=True, text=True)
    message = str(info.value)
    assert "partial output" in message and "on stderr" in message and "quiet time 2 s" in message
    assert time.monotonic() - started < 50  # killed, not waited for


def test_a_process_within_its_bound_returns_as_subprocess_run_would():
    done = bounded.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], 60, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "")
    done = bounded.run([sys.executable, "-c", "print(input())"], 60, capture_output=True, text=True, input="echo")
    assert done.stdout == "echo\n"


def test_wait_until_fails_naming_what_it_waited_for(monkeypatch):
    monkeypatch.setattr(bounded, "FACTOR", 1.0)
    monkeypatch.setattr(bounded, "slowdown", lambda: 1.0)
    with pytest.raises(pytest.fail.Exception, match="the marker file: still not done"):
        bounded.wait_until(lambda: False, 0.3, "the marker file", output=lambda: "log tail")
    flips = iter([False, False, True])
    bounded.wait_until(lambda: next(flips), 10, "a flip")
