"""Crashes and the process lifecycle of `fedlinear run` (real processes, processes mode, no isolation:
the path where nothing but the launcher's own machinery stops the tree).

- the SuperLink SIGKILLed after round 2: `fedlinear run` fails with one line saying how to resume, and
  nothing of its tree survives;
- `fedlinear run` itself SIGKILLed after round 3 (what an OOM killer does): nothing of its tree
  survives it for long (parent-death signal + watchdog), and the lock it held is released;
- while a run goes on, a second one on the same run directory is refused at once, naming the pid;
- the same command then resumes, and the final weights are bit-identical to an uninterrupted run
  (each kill "after round K" holds the run in round K+1 with the faults test hook, so no load makes
  the kill race the next checkpoint);
- a malformed shard fails a local run naming file and line; `fedlinear stop-superlink` stops exactly
  the SuperLink on its port (and what it spawned), and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests import bounded
from tests.conftest import REPO, run_cli, write_federation

ROUNDS = 4
WAIT = 600.0  # bound on any wait for a run to reach a round on a loaded machine
GONE = 90.0  # bound on the wait for a killed tree to disappear (the watchdog's sweep is bounded by 60 s)


def run_args(data, out):
    return ["run", "--data", data, "--clients", 2, "--rounds", ROUNDS, "--out", out, "--set", "seed=11",
            "--isolation", "none"]  # fmt: skip


def start_cli(args, log_dir, name, hold_round=None):
    """`fedlinear ARGS` in the background, stdout/stderr to files (no pipe to fill up).

    ``hold_round``: party 0 sleeps through that round (clients/faults.py, the test hook), so the run
    stays after the previous round's checkpoint for as long as the test needs, however loaded the
    machine (a kill "after round K" must not race round K+1)."""
    out = open(os.path.join(log_dir, f"{name}.out"), "w")  # noqa: SIM115 - closed by finish()
    err = open(os.path.join(log_dir, f"{name}.err"), "w")  # noqa: SIM115
    env = dict(os.environ)
    if hold_round is not None:
        env["FEDLINEAR_TEST_FAULTS"] = f"0:sleep=3600@{hold_round}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlinear.scripts.cli", *map(str, args)], cwd=REPO, stdout=out, stderr=err,
        stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    proc.files = (out, err)
    STARTED.append(proc)
    return proc


STARTED: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def _no_run_left_behind():
    """A failing test must not leave its background runs going: SIGKILL them (their watchdogs clean up)."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc, timeout=WAIT):
    """Wait (bounded by work: ``timeout`` is the quiet-machine bound, scaled by the load) for a background
    CLI; (returncode, stdout, stderr)."""
    bounded.wait(proc, timeout, output=lambda: open(proc.files[0].name).read()[-3000:] + open(proc.files[1].name).read()[-3000:])
    for handle in proc.files:
        handle.close()
    with open(proc.files[0].name) as out, open(proc.files[1].name) as err:
        return proc.returncode, out.read(), err.read()


def checkpointed_round(out) -> int:
    try:
        with open(os.path.join(out, "checkpoints", "latest.json")) as handle:
            return int(json.load(handle)["round"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_round(out, server_round, proc):
    budget = bounded.Budget(WAIT)
    while checkpointed_round(out) < server_round:
        assert proc.poll() is None, f"the run ended before round {server_round}: {finish(proc)}"
        assert not budget.spent(), f"round {server_round} not checkpointed within {WAIT:g} s"
        time.sleep(0.1)


def the_tree(cli_pid, out):
    """Every process of the run now: the CLI's descendants, what carries the run's FLWR_HOME, and
    whatever is in their sessions; with their listening ports."""
    home = os.path.join(out, "logs", "flwr-home")
    found = {}
    if cli_pid is not None:
        for child in psutil.Process(cli_pid).children(recursive=True):
            found[child.pid] = child
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == home:
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    sessions = set()
    for pid in list(found):
        try:
            sessions.add(os.getsid(pid))
        except OSError:
            continue
    sessions.discard(os.getsid(0))
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions:
                found.setdefault(proc.pid, proc)
        except OSError:
            continue
    ports = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in found:
            ports.add(conn.laddr.port)
    return found, ports


def command(proc) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def alive(procs):
    survivors = []
    for proc in procs.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                survivors.append(f"{proc.pid} {command(proc)[:80]}")
        except psutil.Error:
            continue
    return survivors


def listening(ports):
    return sorted(
        {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN} & set(ports)
    )


def assert_gone(procs, ports):
    """Bounded wait until none of ``procs`` runs and none of ``ports`` is listened on."""
    budget = bounded.Budget(GONE)
    while alive(procs) or listening(ports):
        assert not budget.spent(), f"still running: {alive(procs)}; ports listening: {listening(ports)}"
        time.sleep(0.2)


def weights_of(out):
    with open(os.path.join(out, "manifest.json")) as handle:
        manifest = json.load(handle)
    with np.load(os.path.join(out, "checkpoints", f"round-{ROUNDS:04d}.npz")) as ckpt:
        arrays = np.append(ckpt["kernel"].ravel(), ckpt["bias"])
    return np.array(manifest["weights"]["kernel"] + [manifest["weights"]["bias"]]), arrays


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("crash-data"))
    write_federation(path, clients=2, samples=200, features=3, seed=3)
    return path


@pytest.fixture(scope="module")
def background(data, tmp_path_factory):
    """Runs started at once in the background, so they overlap the crash test: one uninterrupted run
    (the reference), and one whose client-1.csv has a malformed line 7. ``background[name]()`` waits
    for one and returns (run dir, data dir, returncode, stdout, stderr)."""
    root = tmp_path_factory.mktemp("background")
    broken = root / "broken-data"
    shutil.copytree(data, broken)
    lines = (broken / "client-1.csv").read_text().splitlines()
    lines[6] = lines[6].replace(",", ",x,", 1)
    (broken / "client-1.csv").write_text("\n".join(lines) + "\n")
    started = {}
    for name, source in (("uninterrupted", data), ("malformed", str(broken))):
        out = str(root / name)
        started[name] = (out, source, start_cli(run_args(source, out), str(root), name))

    def waiter(name):
        def result():
            out, source, proc = started[name]
            return (out, source, *finish(proc))

        return result

    return {name: waiter(name) for name in started}


def test_superlink_killed_then_launcher_killed_then_resumed_bit_identically(data, background, tmp_path):
    out = str(tmp_path / "run")
    args = run_args(data, out)

    # 1. SIGKILL the SuperLink once round 2 is checkpointed: a clear one-line failure, nothing left
    cli = start_cli(args, str(tmp_path), "first", hold_round=3)
    wait_for_round(out, 2, cli)
    procs, ports = the_tree(cli.pid, out)
    [superlink] = [p for p in procs.values() if "bin/flower-superlink " in command(p)]
    assert checkpointed_round(out) == 2  # held in round 3 (party 0 sleeps there)
    superlink.kill()
    code, _, err = finish(cli, timeout=300)
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"fedlinear: error: flower-superlink (pid {superlink.pid}) died during the run (killed by SIGKILL)")
    assert "run the same command again to resume" in line
    assert_gone(procs, ports)
    status = json.loads(open(os.path.join(out, "status.json")).read())
    assert status["status"] == "failed" and "resume" in status["message"]

    # 2. the same command resumes; a second run on the directory meanwhile is refused at once
    cli = start_cli(args, str(tmp_path), "second", hold_round=4)
    wait_for_round(out, 3, cli)
    refused = run_cli(*args, timeout=300)
    assert cli.poll() is None, "the refused run must not disturb the running one"
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"fedlinear: error: {out} is in use by another fedlinear run (pid {cli.pid}; lock {out}/.lock); "
        "wait for it to finish, or stop it, then run the same command again"
    ]
    # SIGKILL `fedlinear run` itself (an OOM killer): its whole tree goes within seconds, the task
    # sleeping in round 4 with it
    budget = bounded.Budget(WAIT)
    while not any("flwr-clientapp" in command(p) for p in psutil.Process(cli.pid).children(recursive=True)):
        assert cli.poll() is None and not budget.spent(), "round 4's task never started"
        time.sleep(0.1)
    procs, ports = the_tree(cli.pid, out)
    names = " ".join(command(p) for p in procs.values())
    for name in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp",
                 "fedlinear.scripts.local.processes"):  # fmt: skip
        assert name in names, f"{name} not among the recorded processes: {names}"
    assert checkpointed_round(out) == 3  # held in round 4 (party 0 sleeps there): the kill is after round 3
    cli.kill()
    finish(cli)
    assert_gone(procs, ports)

    # 3. the same command again: resumes after round 3, finishes, bit-identical to the uninterrupted run
    done = run_cli(*args, timeout=WAIT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"the last run in {out} was interrupted (last checkpoint: round 3)" in done.stdout
    assert "resuming after round 3" in done.stdout
    assert "parties: 2 of 2 took part" in done.stdout
    history = json.loads(open(os.path.join(out, "history.json")).read())
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    assert history["resumed-at"] == [2, 3]
    reference_out, _, code, reference_stdout, stderr = background["uninterrupted"]()
    assert code == 0, reference_stdout + stderr
    assert "parties: 2 of 2 took part" in reference_stdout
    resumed, resumed_ckpt = weights_of(out)
    reference, reference_ckpt = weights_of(reference_out)
    assert np.array_equal(resumed, reference)
    assert np.array_equal(resumed_ckpt, reference_ckpt)


def test_a_malformed_shard_fails_a_local_run_naming_file_and_line(background):
    out, broken, code, stdout, stderr = background["malformed"]()
    assert code == 1, stdout + stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"fedlinear: error: {broken}/client-1.csv: line 7: expected 4 comma-separated columns, found 5")
    assert "--allow-missing-parties" in line
    status = json.loads(open(os.path.join(out, "status.json")).read())
    assert status["status"] == "failed" and f"{broken}/client-1.csv: line 7" in status["message"]
    assert "round   1 |" not in stdout  # it stopped before round 1
    procs, _ = the_tree(None, str(out))
    assert alive(procs) == []


def test_the_run_lock_names_a_live_holder_and_dies_with_it(tmp_path):
    from fedlinear.common.errors import FedLinearError
    from fedlinear.scripts.local.lock import lock_run_dir

    out = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fedlinear.scripts.local.lock import lock_run_dir; lock_run_dir(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)", out],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(FedLinearError, match=rf"is in use by another fedlinear run \(pid {holder.pid};"):
            lock_run_dir(out)
        assert time.monotonic() - started < 5  # refused at once, not after a wait
    finally:
        holder.kill()
        holder.wait()
    fd = lock_run_dir(out, cleanup_wait=30)  # SIGKILL released it
    assert open(os.path.join(out, ".lock")).read().strip() == str(os.getpid())
    os.close(fd)


def test_stop_superlink_stops_exactly_that_superlink_and_what_it_spawned(tmp_path):
    from fedlinear.scripts.local.flower import flower_env, free_port, wait_healthy

    port = free_port()
    env = flower_env(str(tmp_path / "flwr-home"))
    log = str(tmp_path / "superlink.log")
    # as Flower starts its managed SuperLink for a :local: connection: detached, in a session of its own
    with open(log, "wb") as handle:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        wait_healthy(port, superlink, 120, log)
        budget = bounded.Budget(60)  # the SuperExec it spawns
        while not psutil.Process(superlink.pid).children(recursive=True):
            assert not budget.spent(), "the SuperLink spawned nothing"
            time.sleep(0.2)
        spawned = psutil.Process(superlink.pid).children(recursive=True)
        done = run_cli("stop-superlink", "--port", port, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"stopped the flower-superlink on 127.0.0.1:{port} (pid {superlink.pid}) "
            f"and the {len(spawned)} processes it had started"
        )
        assert superlink.wait(timeout=30) is not None
        assert alive({p.pid: p for p in spawned}) == [] and listening([port]) == []
        assert bystander.poll() is None  # nothing else was touched
        again = run_cli("stop-superlink", "--port", port, timeout=120)
        assert again.returncode == 0 and "nothing to stop" in again.stdout
        # a port held by anything but a flower-superlink is refused, and the holder left alone
        other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            budget = bounded.Budget(60)
            while not listening([port]):
                assert not budget.spent()
                time.sleep(0.2)
            refused = run_cli("stop-superlink", "--port", port, timeout=120)
            assert refused.returncode == 1
            assert f"is served by pid {other.pid}" in refused.stderr and "not a flower-superlink" in refused.stderr
            assert other.poll() is None
        finally:
            other.kill()
            other.wait()
    finally:
        for proc in (superlink, bystander):
            proc.kill()
            proc.wait()


FAKE_LAUNCHER = r"""
import os, sys, time
from fedlinear.scripts.local.processes import TREE_ENV, ProcessGroup, Watchdog, tree_token

watchdog = Watchdog(tree_token())
group = ProcessGroup(token=watchdog.token, on_start=watchdog.watch_group)  # no parent-death signal: the watchdog alone
env = {**os.environ, TREE_ENV: watchdog.token}
# a child that stays, with a grandchild in its session
group.start("stays", ["bash", "-c", "sleep 601 & exec sleep 602"], env, None)
# like Ray's agents: a process starts a session of its own, leaves there a child without the token (an
# empty environment) and exits (after 8 s: 4 of the watchdog's looks); the orphan is tied to the run by
# nothing but that session
group.start("ray-like", ["bash", "-c", "setsid bash -c 'env -i sleep 603 & sleep 8'; exec sleep 604"], env, None)
print("started", flush=True)
time.sleep(600)
"""


def test_the_watchdog_kills_the_whole_tree_when_the_launcher_is_sigkilled():
    launcher = subprocess.Popen([sys.executable, "-c", FAKE_LAUNCHER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    procs = {}
    try:
        assert launcher.stdout.readline().strip() == "started"
        wanted = {"sleep 601", "sleep 602", "sleep 603", "sleep 604"}
        budget = bounded.Budget(120)
        while True:  # until all four run, and the session leader that left the orphan behind has gone
            procs = {p.pid: p for p in psutil.process_iter() if command(p) in wanted}
            orphan = [p for p in procs.values() if command(p) == "sleep 603"]
            if len(procs) == 4 and orphan and orphan[0].ppid() != 0 and orphan[0].parent().name() != "bash":
                break
            assert not budget.spent(), f"the fake tree did not come up: {[command(p) for p in procs.values()]}"
            time.sleep(0.2)
        assert "FEDLINEAR_TREE" not in orphan[0].environ()
        launcher.kill()
        launcher.wait()
        assert_gone(procs, [])
    finally:
        for proc in [launcher, *procs.values()]:  # on failure: leave nothing of it behind
            with contextlib.suppress(psutil.Error, OSError):
                proc.kill()
        launcher.wait()


def test_a_runner_that_fails_after_the_superlink_died_is_reported_as_the_superlink_dying(tmp_path):
    """The race CI once lost: `flwr run` saw the SuperLink's connection drop and exited (code 1) before
    the follower's next look at the SuperLink, and the user got "flwr run exited with code 1" and a log
    tail instead of the one-line "died during the run ... run the same command again". Here the runner
    exits at once after the "SuperLink" is SIGKILLed, so the follower's poll never sees it die first."""
    from fedlinear.scripts.local.launch import follow
    from fedlinear.scripts.local.spec import RunInterrupted

    superlink = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    runner = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGKILL); sys.exit(1)",
         str(superlink.pid)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        with pytest.raises(RunInterrupted, match=r"flower-superlink \(pid \d+\) died during the run \(killed by SIGKILL\)"):
            follow(runner, str(tmp_path / "run.log"), lambda _line: None, 600, essential=[("flower-superlink", superlink)])
    finally:
        superlink.kill()
        superlink.wait()
    assert runner.returncode == 1
