"""A ``fedlinear`` command started with SIGINT ignored (a shell's background job) by a parent that stops it
with SIGINT (the sweep's runner, the bench) is asked to restore Python's handler
(scripts/local/processes.py, ``SIGINT_STOPS_ENV``); nobody else's ignored SIGINT is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fedlinear.scripts.local.processes import SIGINT_STOPS_ENV
from tests import bounded

CHILD = """
import os, signal, sys, time
from fedlinear.scripts.local.processes import SIGINT_STOPS_ENV, restore_sigint_if_asked
restore_sigint_if_asked()
try:  # the parent may signal as soon as the line is out, before print returns
    print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, SIGINT_STOPS_ENV in os.environ, flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    sys.exit(130)
"""


def start(asked: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != SIGINT_STOPS_ENV}
    if asked:
        env[SIGINT_STOPS_ENV] = "1"
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip


def test_a_child_asked_to_restore_sigint_stops_on_it():
    child = start(asked=True)
    try:
        assert child.stdout.readline().split() == ["False", "False"]  # handler restored, the variable dropped
        child.send_signal(signal.SIGINT)
        assert bounded.wait(child, 10, "the child after SIGINT") == 130
    finally:
        child.kill()
        child.wait()


def test_a_child_not_asked_keeps_sigint_ignored():
    child = start(asked=False)
    try:
        assert child.stdout.readline().split() == ["True", "False"]
    finally:
        child.kill()
        child.wait()
