"""The warm ClientApp executor and its ``flwr-clientapp`` stand-in (scripts/local/warm_clientapp.py,
scripts/local/clientapp_shim.py), with a stand-in entry in place of Flower's ``flwr_clientapp()``: what
the forked child gets (command line, environment, directory, streams, name), how the stand-in ends
(the child's exit code, its signal, a signal passed on), and the cold start when there is no executor.
Flower's own ClientApps through it: tests/e2e/test_federation.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from fedlinear.scripts.local import warm_clientapp as warm
from tests import bounded

FAKE = r'''
import json, os, sys, time
def main():
    with open("/proc/self/comm") as comm:
        name = comm.read().strip()
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
                      "mark": os.environ.get("FAKE_MARK"), "comm": name,
                      "stand-in": os.environ.get("FEDLINEAR_WARM_STAND_IN"),
                      "pycache": sys.pycache_prefix, "writes-bytecode": not sys.dont_write_bytecode,
                      "fedlinear": sorted(m for m in sys.modules if m.startswith("fedlinear"))}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if os.environ.get("FAKE_SLEEP"):
        time.sleep(float(os.environ["FAKE_SLEEP"]))
    return int(os.environ.get("FAKE_CODE", "0"))
'''

REAL = """#!/bin/sh
echo "cold $*"
exit 7
"""


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    """One executor (running the fake entry) for the module; its socket, log and the stand-in."""
    d = tmp_path_factory.mktemp("warm")
    (d / "fake_entry.py").write_text(FAKE)
    (d / "real").write_text(REAL)
    os.chmod(d / "real", 0o755)
    sock = str(d / "s")
    log = open(d / "executor.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "PYTHONPATH": str(d)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "fedlinear.scripts.local.warm_clientapp", "--socket", sock,
                             "--entry", "fake_entry:main", "--pycache", str(d / "pycache")],
                            env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    budget = bounded.Budget(60)
    while not os.path.exists(sock):
        assert proc.poll() is None and not budget.spent(), (d / "executor.log").read_text()
        time.sleep(0.05)
    shim = warm.install_shim(str(d / "bin"))
    yield {"socket": sock, "shim": shim, "dir": d, "real": str(d / "real"), "proc": proc}
    proc.terminate()
    bounded.wait(proc, 30)
    log.close()


def run_shim(executor, *args, extra=None, **kw):
    env = {"PATH": os.environ["PATH"], warm.SOCKET_ENV: executor["socket"], warm.REAL_ENV: executor["real"],
           **(extra or {})}  # fmt: skip
    return subprocess.Popen([executor["shim"], *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def test_the_child_takes_on_the_stand_ins_command_line_environment_directory_and_streams(executor, tmp_path):
    proc = run_shim(executor, "--token", "a b", extra={"FAKE_MARK": "m1", "FAKE_CODE": "3"}, cwd=str(tmp_path))
    out, err = bounded.communicate(proc, 60)
    assert proc.returncode == 3, err
    seen = json.loads(out)
    assert seen["argv"] == [executor["shim"], "--token", "a b"]
    assert seen["cwd"] == str(tmp_path) and seen["mark"] == "m1"
    assert seen["comm"] == "flwr-clientapp"
    assert seen["ppid"] == executor["proc"].pid != proc.pid  # forked by the executor, not started by the stand-in
    assert seen["stand-in"] == str(proc.pid)  # where a cold ClientApp's parent chain would start (clients/faults.py)
    assert seen["fedlinear"] == []  # none of the executor's own package: the app comes from its FAB
    # the app's bytecode goes to the executor's private cache, PYTHONDONTWRITEBYTECODE or not
    assert seen["pycache"] == str(executor["dir"] / "pycache") and seen["writes-bytecode"]
    assert "to stderr" in err
    assert "warm ClientApp executor not used" not in err


def test_many_at_once_each_get_their_own_child(executor):
    procs = [run_shim(executor, str(i), extra={"FAKE_MARK": str(i), "FAKE_CODE": str(i)}) for i in range(6)]
    pids = set()
    for i, proc in enumerate(procs):
        out, err = bounded.communicate(proc, 60)
        assert proc.returncode == i, err
        seen = json.loads(out)
        assert seen["argv"][1:] == [str(i)] and seen["mark"] == str(i)
        pids.add(seen["pid"])
    assert len(pids) == 6


def test_the_stand_in_dies_of_its_childs_signal_and_passes_sigterm_on(executor):
    proc = run_shim(executor, extra={"FAKE_SLEEP": "600"})
    line = proc.stdout.readline()
    child = json.loads(line)["pid"]
    proc.send_signal(signal.SIGTERM)  # passed on: the child dies of it, and so does the stand-in
    bounded.communicate(proc, 60)
    assert proc.returncode == -signal.SIGTERM
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE

    proc = run_shim(executor, extra={"FAKE_SLEEP": "600"})
    child = json.loads(proc.stdout.readline())["pid"]
    os.kill(child, signal.SIGKILL)
    _, err = bounded.communicate(proc, 60)
    assert proc.returncode == -signal.SIGKILL, err


def test_garbage_on_the_socket_is_refused_and_the_executor_goes_on(executor):
    for payload in (b"", b"\x00\x00\x00\x05hello", b"not a request at all"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(120)
            conn.connect(executor["socket"])
            if payload:
                conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            reply = conn.recv(4096)
            assert reply.startswith(b"refused") or reply == b""
    proc = run_shim(executor, extra={"FAKE_CODE": "0"})
    out, err = bounded.communicate(proc, 60)
    assert proc.returncode == 0, err
    assert executor["proc"].poll() is None


def test_without_an_executor_the_stand_in_starts_the_real_one_cold(executor, tmp_path):
    for missing in ({warm.SOCKET_ENV: str(tmp_path / "nothing")}, {warm.SOCKET_ENV: ""}):
        proc = run_shim(executor, "--token", "t", extra=missing)
        out, err = bounded.communicate(proc, 60)
        assert proc.returncode == 7
        assert out.strip() == "cold --token t"
        assert "warm ClientApp executor not used" in err and err.count("\n") == 1


def test_the_executor_counts_what_it_forked(executor, tmp_path):
    log = executor["dir"] / "executor.log"
    before = sum(1 for line in log.read_text().splitlines() if line.startswith(warm.FORKED + " "))
    proc = run_shim(executor)
    bounded.communicate(proc, 60)
    budget = bounded.Budget(30)
    while sum(1 for line in log.read_text().splitlines() if line.startswith(warm.FORKED + " ")) != before + 1:
        assert not budget.spent()
        time.sleep(0.05)
    ended = [line.split() for line in log.read_text().splitlines() if line.startswith(warm.ENDED + " ")]
    assert ended and all(len(e) == 4 and e[2].startswith(("exit=", "signal=")) and e[3].startswith("cpu=") for e in ended)
