"""scripts/local/timeline.py: the stage timeline of a federation's processes (classification, stages, sampling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from fedlinear.scripts.local import timeline
from fedlinear.scripts.local.timeline import Proc, Sampler, classify, cpu_by_kind, stages, updated_kind


def test_classify_flower_and_fedlinear_processes():
    py = "/venv/bin/python"
    assert classify([py, "/venv/bin/flwr-clientapp", "--insecure"]) == "clientapp"
    assert classify(["/venv/bin/flower-supernode", "--insecure"]) == "supernode"
    assert classify([py, "/venv/bin/flower-superexec", "--plugin-type", "clientapp"]) == "superexec"
    assert classify([py, "/venv/bin/flower-superlink", "--insecure"]) == "superlink"
    assert classify([py, "/venv/bin/flwr-serverapp"]) == "serverapp"
    assert classify([py, "/venv/bin/flwr", "run", "app"]) == "flwr-run"
    assert classify([py, "-m", "fedlinear.common.exporter"]) == "exporter"
    assert classify([py, "-m", "fedlinear.scripts.local.launch", "--inner", "x"]) == "launcher"
    assert classify(["unshare", "--net"]) == "other"
    assert classify([]) == "other"


def test_an_exiting_process_keeps_its_kind_and_an_execed_one_takes_its_new_one():
    py = "/venv/bin/python"
    assert updated_kind("clientapp", []) == "clientapp"  # exiting: /proc/PID/cmdline reads empty
    assert updated_kind("launcher", [py, "/venv/bin/flower-supernode"]) == "supernode"  # exec'ed after fork
    assert updated_kind("clientapp", [py, "/venv/bin/flwr-clientapp"]) == "clientapp"


def _proc(pid, ppid, start, end, cpu=1.0, kind="clientapp"):
    return Proc(pid=pid, ppid=ppid, kind=kind, start=start, end=end, cpu=cpu, rss=2**20)


def test_stages_are_each_nodes_kth_clientapp_whatever_the_interleaving():
    # node A (SuperExec 10) is fast, node B (SuperExec 20) slow: B's first ClientApp starts after A's second
    procs = [
        _proc(1, 10, 0.0, 1.0, cpu=1.0), _proc(2, 10, 2.0, 3.0, cpu=3.0),
        _proc(3, 20, 2.5, 4.0, cpu=2.0), _proc(4, 20, 5.0, 6.0, cpu=5.0),
        _proc(5, 99, 0.0, 9.0, kind="supernode"),
    ]  # fmt: skip
    found = stages(procs)
    assert [sorted(p.pid for p in s.clientapps) for s in found] == [[1, 3], [2, 4]]
    assert (found[0].first_start, found[0].last_start, found[0].last_end) == (0.0, 2.5, 4.0)
    assert found[1].cpu_per_clientapp == 4.0
    assert cpu_by_kind(procs) == {"clientapp": (4, 11.0), "supernode": (1, 1.0)}
    text = timeline.report(procs, 10.0)
    assert "stage 0: nodes   2" in text and "stage 1: nodes   2" in text and "clientapp 11.0 (4)" in text


# A stand-in for a SuperExec: starts two fake `flwr-clientapp` processes (a script of that name) one after
# the other; each waits (bounded) until its go-file exists, so the test decides when it ends, never a sleep.
_FAKE_CLIENTAPP = """
import os, sys, time
d, k = sys.argv[1], sys.argv[2]
open(os.path.join(d, f"up-{k}"), "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(d, f"go-{k}")) and time.monotonic() < deadline:
    time.sleep(0.02)
"""
_FAKE_SUPEREXEC = """
import os, subprocess, sys
d = sys.argv[1]
for k in range(2):
    subprocess.run([sys.executable, os.path.join(d, "flwr-clientapp"), d, str(k)], check=True)
"""


def _wait_for(path: str, root: subprocess.Popen, sampler: Sampler) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert root.poll() is None, f"the fake SuperExec exited with {root.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    sampler.poll()


def test_sampler_sees_a_real_process_tree(tmp_path):
    d = str(tmp_path)
    (tmp_path / "flwr-clientapp").write_text(_FAKE_CLIENTAPP)
    root = subprocess.Popen([sys.executable, "-c", _FAKE_SUPEREXEC, d])
    try:
        sampler = Sampler(root.pid)
        for k in range(2):
            _wait_for(os.path.join(d, f"up-{k}"), root, sampler)  # ClientApp k is running: sampled once at least
            open(os.path.join(d, f"go-{k}"), "w").close()
        assert root.wait(timeout=60) == 0
    finally:
        root.kill()
    apps = [p for p in sampler.procs() if p.kind == "clientapp"]
    assert len(apps) == 2 and len({p.ppid for p in apps}) == 1 and apps[0].ppid == root.pid
    assert [len(s.clientapps) for s in stages(apps)] == [1, 1]
    assert all(p.rss > 0 and p.end >= p.start for p in apps)


def test_main_runs_the_command_and_writes_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    code = timeline.main(["--out", str(out), "--interval", "0.05", "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert code == 3
    data = json.loads(out.read_text())
    assert data["exit-code"] == 3 and data["wall-s"] > 0 and isinstance(data["procs"], list)
    assert "wall " in capsys.readouterr().out
    assert timeline.main([sys.executable]) == 2  # no "--": usage


_EXEC_LATER = """
import os, sys, time
d = sys.argv[1]
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(d, "exec")) and time.monotonic() < deadline:
    time.sleep(0.02)
os.execv(sys.executable, [sys.executable, os.path.join(d, "flwr-clientapp"), d, "0"])
"""


def test_a_process_seen_before_its_exec_gets_the_kind_it_execs_into(tmp_path):
    d = str(tmp_path)
    (tmp_path / "flwr-clientapp").write_text(_FAKE_CLIENTAPP)
    holder = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])", _EXEC_LATER, d])
    try:
        sampler = Sampler(holder.pid)
        deadline = time.monotonic() + 60
        while not sampler.procs():  # the child is up (not yet exec'ed: it waits for the exec file)
            assert holder.poll() is None and time.monotonic() < deadline
            sampler.poll()
            time.sleep(0.02)
        assert sampler.procs()[0].kind == "other"
        open(os.path.join(d, "exec"), "w").close()
        _wait_for(os.path.join(d, "up-0"), holder, sampler)
        open(os.path.join(d, "go-0"), "w").close()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert [p.kind for p in sampler.procs()] == ["clientapp"]


_UNREAPED = """
import os, subprocess, sys, time
d = sys.argv[1]
child = subprocess.Popen([sys.executable, os.path.join(d, "flwr-clientapp"), d, "0"])
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(d, "reap")) and time.monotonic() < deadline:
    time.sleep(0.02)  # the ended child stays a zombie until then
child.wait()
"""


def test_an_ended_unreaped_clientapp_ends_when_it_exited_not_when_reaped(tmp_path):
    import psutil

    d = str(tmp_path)
    (tmp_path / "flwr-clientapp").write_text(_FAKE_CLIENTAPP)
    parent = subprocess.Popen([sys.executable, "-c", _UNREAPED, d])
    try:
        sampler = Sampler(parent.pid)
        _wait_for(os.path.join(d, "up-0"), parent, sampler)
        (app,) = [p for p in sampler.procs() if p.kind == "clientapp"]
        alive_end = app.end
        open(os.path.join(d, "go-0"), "w").close()
        deadline = time.monotonic() + 60
        while psutil.Process(app.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sampler.poll()
        assert app.end == alive_end  # the zombie was not counted as running
        open(os.path.join(d, "reap"), "w").close()
        assert parent.wait(timeout=60) == 0
    finally:
        parent.kill()


def test_the_warm_executors_stand_in_is_the_clientapp_and_its_forks_are_named_apart():
    py = "/venv/bin/python3"
    assert classify([py, "-IS", "/tmp/fl-warm-x/bin/flwr-clientapp", "--token", "t"]) == "clientapp"
    executor = [py, "-m", "fedlinear.scripts.local.warm_clientapp", "--socket", "/tmp/fl-warm-x/s"]
    assert classify(executor, "python3") == "warm-executor"
    assert classify(executor, "flwr-clientapp") == "clientapp-fork"
    assert updated_kind("warm-executor", executor, "flwr-clientapp") == "clientapp-fork"
