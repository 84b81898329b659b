"""Launch a whole local federation with Flower's own runtime, and take it down again.

``processes`` mode starts one ``flower-superlink`` and N ``flower-supernode`` processes on loopback
(free ports), each SuperNode given its own shard with ``--node-config``; ``simulation`` mode starts a
``flower-superlink --simulation`` whose ``flwr-simulation`` runs N virtual nodes on Ray. Either way
the run is submitted with stock ``flwr run APP CONNECTION --stream``, against a private
``FLWR_HOME`` (a user's ``~/.flwr`` is never touched), with runtime dependency installation off.

Every wait is bounded, and every process this module started is stopped (the whole process tree,
by PID) on success, failure and Ctrl-C, and within seconds when the launcher itself is killed, by
SIGKILL too (the parent-death signal on its children, and a :class:`Watchdog` for the rest, Ray
included). Nothing here binds to anything but 127.0.0.1.

With isolation (:mod:`fedlinear.scripts.local.isolation`) the federation runs in a private network
namespace whose first process is ``python -m fedlinear.scripts.local.launch --inner SPEC.json ERROR.txt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable

import psutil

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.local import watch
from fedlinear.scripts.local.flower import (
    PortTaken,
    config_string,
    flower_env,
    free_port,
    listens,
    lost_port,
    tail,
    wait_healthy,
    write_connection,
)
from fedlinear.scripts.local.isolation import HostPids, namespace_init, note_pid, resolve_isolation, unshare_argv
from fedlinear.scripts.local.processes import TREE_ENV, WATCHDOG_TIMEOUT, ProcessGroup, Watchdog, tree_token
from fedlinear.scripts.local.ray_env import with_ray_env
from fedlinear.scripts.local.spec import INTERRUPTED_MARK, PROGRESS_MARK, LaunchSpec, RunInterrupted, auto_ray_cpus, check_spec, warn
from fedlinear.scripts.local.staging import Staging
from fedlinear.scripts.local.warm_clientapp import WARM_ENV, WarmClientApps

# common.shardcache.CACHE_ENV, not imported from there: that module brings NumPy into the launcher's
# processes (~10 MiB each, alive for the whole run); tests/unit/test_shardcache.py checks they agree.
SHARD_CACHE_ENV = "FEDLINEAR_SHARD_CACHE"

# How long the namespace's processes get to stop on their own before everything in it is killed.
ISOLATED_STOP_GRACE = 15.0


def launch(spec: LaunchSpec, on_progress: Callable[[str], None] = print, keep_open: Iterable[int] = ()) -> None:
    """Run one federation to completion; raise FedLinearError (one line + log paths) if it fails.

    ``on_progress`` receives the ServerApp's ``[fedlinear]`` lines as they arrive.

    Whatever ends it (success, an error, Ctrl-C, or this process being killed, SIGKILL included), no
    process it started outlives it by more than a few seconds, Ray's included: its children get the
    parent-death signal and a :class:`Watchdog` sweeps the rest; on return every one of them is gone.
    ``keep_open``: file descriptors (the run directory's lock) held until the last one is gone.
    """
    check_spec(spec)
    if spec.mode == "inline":  # no runtime processes: nothing to isolate, watch or sweep up
        from fedlinear.scripts.local.inline import run_inline

        run_inline(spec, on_progress, pool=spec.pool, workers=spec.workers)
        return
    isolated = resolve_isolation(spec) == "netns"
    watchdog = Watchdog(tree_token(), keep_open)
    try:
        if isolated:
            launch_isolated(spec, on_progress, watchdog)
        else:
            run_federation(spec, on_progress, watchdog)
    finally:
        left = watchdog.finish()
        if left:
            warn(f"processes of this run could not be stopped (pids {left}); they survived SIGKILL for {WATCHDOG_TIMEOUT:g} s")


def run_federation(spec: LaunchSpec, on_progress: Callable[[str], None], watchdog: Watchdog | None = None) -> None:
    """The federation itself, in whatever network namespace this process is in (inside a private
    one there is no watchdog here: the token came with the environment, and the namespace ends with
    its first process)."""
    os.makedirs(spec.workdir, exist_ok=True)
    flwr_home = os.path.join(spec.workdir, "flwr-home")
    token = watchdog.token if watchdog is not None else os.environ.get(TREE_ENV)
    env = flower_env(flwr_home, token)
    if spec.mode == "simulation" and spec.flower_without_tf:
        env = without_flower_tf(env)
    if spec.mode == "simulation":
        # ray.init() inside flwr-simulation joins the cluster named here. Without --ray-address it is
        # "local": a fresh private Ray, never whatever cluster `ray start` last left behind in
        # /tmp/ray (a stale address there made ray.init() wait forever).
        env["RAY_ADDRESS"] = spec.ray_address or "local"
        if spec.ray_tuning:
            env = with_ray_env(env)  # no idle prestarted workers, no metrics (scripts/local/ray_env.py)
    ray_tmp = None
    if spec.mode == "simulation" and not spec.ray_address:
        # The local Ray's session files (its unix sockets among them: those are not confined by a network
        # namespace) go to a directory only this user can enter, not the world-writable /tmp/ray where
        # another user could swap a socket. Short: unix socket paths must fit in 107 bytes.
        ray_tmp = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        env["RAY_TMPDIR"] = ray_tmp
        # the actors' parsed shards, shared among them (a node's messages go to any actor; common/shardcache.py);
        # FEDLINEAR_SHARD_CACHE= (empty) in the environment turns it off
        env.setdefault(SHARD_CACHE_ENV, os.path.join(ray_tmp, "shards"))
    group = ProcessGroup(die_with_parent=True, token=token, on_start=watchdog.watch_group if watchdog else None)
    superlink_log = os.path.join(spec.workdir, "superlink.log")
    run_log = os.path.join(spec.workdir, "flwr-run.log")
    # the app's copy for `flwr run` is made apart, while the SuperLink starts (scripts/local/staging.py)
    staging = Staging(spec.app_dir, os.path.join(spec.workdir, "app"), env)
    warm = None
    try:
        node_env = env
        if spec.mode == "processes" and warm_clientapps(spec):
            warm = WarmClientApps(group, env, os.path.join(spec.workdir, "warm-clientapp.log"))
            node_env = warm.env
        superlink, port = start_superlink(spec, group, env, superlink_log, on_progress)
        connection = write_connection(flwr_home, spec, port)
        nodes = Supernodes(spec, group, node_env, port)
        overrides = ["--run-config", config_string(spec.run_config)] if spec.run_config else []
        if spec.mode == "simulation":
            federation = {"num-supernodes": spec.num_nodes, "client-resources-num-cpus": int(spec.client_cpus)}
            if not spec.ray_address:
                federation["init-args-num-cpus"] = int(spec.ray_cpus or auto_ray_cpus(spec.num_nodes))
            overrides += ["--federation-config", config_string(federation)]
        runner = group.start(
            "flwr-run",
            ["flwr", "run", staging.result(), connection, "--stream", *overrides],
            env,
            None,
            stdout=subprocess.PIPE,
        )
        nodes.settle()  # each SuperNode listens on its own port, or is started again on another
        if warm is not None and not warm.wait_ready(spec.startup_timeout):
            warn(f"the warm ClientApp executor did not start (log {warm.log_path}): every ClientApp starts cold")
        follow(runner, run_log, on_progress, spec.run_timeout, essential=[("flower-superlink", superlink)],
               stall=watch.StallDetector(superlink_log, str(spec.run_config.get("run-dir", ""))))  # the hang detector
        if runner.returncode != 0:
            raise FedLinearError(f"flwr run exited with code {runner.returncode}; log {run_log}:\n{tail(run_log)}")
        if warm is not None and warm.served() == 0:
            warn("Flower started no ClientApp through the warm ClientApp executor (its SuperExec looks for "
                 "`flwr-clientapp` on PATH in Flower 1.42: has an upgrade changed that?); the run is the same, "
                 "each message paid a cold ClientApp start (scripts/local/warm_clientapp.py)")
    finally:
        staging.close()
        group.stop()
        if warm is not None:
            warm.close()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


# How many ports a Flower server the launcher starts may find taken before the start fails.
PORT_ATTEMPTS = 5


def start_superlink(
    spec: LaunchSpec, group: ProcessGroup, env: dict[str, str], log_path: str, on_progress: Callable[[str], None]
) -> tuple[subprocess.Popen, int]:
    """The run's SuperLink, healthy, and its port: on a port of its own (``--superlink-port``), or on a
    free one, picked again when another process took it first (scripts/local/flower.py)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = spec.superlink_port or free_port()
        argv = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation"]  # fmt: skip
        if spec.mode == "simulation":
            argv.append("--simulation")
        superlink = group.start("superlink", argv, env, log_path)
        note_pid(on_progress, "flower-superlink", superlink.pid)
        try:
            wait_healthy(port, superlink, spec.startup_timeout, log_path)
            return superlink, port
        except PortTaken:
            if spec.superlink_port or attempt == PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


class Supernodes:
    """The SuperNodes of a processes-mode run, started at once; :meth:`settle` then waits (bounded) until
    each listens on its own port, starting one that lost its port to another process again on another
    (a SuperNode that fails otherwise is left to the run, which goes on without that party or stops)."""

    def __init__(self, spec: LaunchSpec, group: ProcessGroup, env: dict[str, str], superlink_port: int) -> None:
        self.spec, self.group, self.env, self.superlink_port = spec, group, env, superlink_port
        self.nodes: dict[int, tuple[subprocess.Popen, int, str]] = {}  # index -> (process, its port, its log)
        self.attempts: dict[int, int] = {}
        if spec.mode == "processes":
            for i in range(len(spec.node_configs or [])):
                self._start(i)

    def _start(self, i: int) -> None:
        port = free_port()
        log_path = os.path.join(self.spec.workdir, f"supernode-{i}.log")
        argv = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.superlink_port}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", config_string((self.spec.node_configs or [])[i])]  # fmt: skip
        self.nodes[i] = (self.group.start(f"supernode-{i}", argv, self.env, log_path), port, log_path)
        self.attempts[i] = self.attempts.get(i, 0) + 1

    def settle(self) -> None:
        pending = set(self.nodes)
        deadline = time.monotonic() + self.spec.startup_timeout
        while pending and time.monotonic() < deadline:
            for i in sorted(pending):
                proc, port, log_path = self.nodes[i]
                if listens(proc.pid, port):
                    pending.discard(i)
                elif proc.poll() is not None:
                    if lost_port(log_path, port) and self.attempts[i] < PORT_ATTEMPTS:
                        self._start(i)
                    else:
                        pending.discard(i)
            if pending:
                time.sleep(0.1)


def warm_clientapps(spec: LaunchSpec) -> bool:
    """Whether processes mode forks its ClientApps ready-imported (scripts/local/warm_clientapp.py):
    ``LaunchSpec.warm_clientapps``, unless ``FEDLINEAR_WARM_CLIENTAPPS`` is 0 (Flower's own cold ClientApps) or 1."""
    value = os.environ.get(WARM_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        warn(f"{WARM_ENV}={value!r} is neither 0 nor 1: ignored")
    return spec.warm_clientapps


def without_flower_tf(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the guard that keeps TensorFlow out of Flower's simulation engine, if it still fits
    the installed Flower (scripts/local/flower_tf.py); else ``env`` and a warning."""
    from fedlinear.scripts.local.flower_tf import GUARDED_MODULE, guard_applies, with_guard

    if guard_applies():
        return with_guard(env)
    warn(f"{GUARDED_MODULE} no longer imports TensorFlow as expected: Flower's simulation engine imports it (scripts/local/flower_tf.py)")
    return env


# How long a failed `flwr run` waits to learn whether the SuperLink died under it.
ESSENTIAL_DEATH_GRACE = 3.0


def follow(
    runner: subprocess.Popen,
    log_path: str,
    on_progress: Callable[[str], None],
    timeout: float,
    essential: Iterable[tuple[str, subprocess.Popen]] = (),
    stall: watch.StallDetector | None = None,
) -> None:
    """Copy ``flwr run --stream`` output to the log, pass progress lines on, bound the run's time.

    If one of the ``essential`` processes (the SuperLink) dies first, ``flwr run`` is stopped rather
    than left to wait for a server that is gone, and the error says the run can be resumed. So is it
    when ``stall`` (scripts/local/watch.py) finds the runtime stalled.
    """
    timed_out = threading.Event()
    stalled: list[str] = []
    died: list[tuple[str, subprocess.Popen]] = []
    essential = list(essential)

    def end_runner() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)

    def watchdog() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                runner.wait(timeout=0.5)
                return
            except subprocess.TimeoutExpired:
                pass
            gone = [(name, proc) for name, proc in essential if proc.poll() is not None]
            if gone:
                died.extend(gone)
                end_runner()
                return
            cause = stall.check() if stall is not None else None
            if cause:
                stalled.append(cause)
                end_runner()
                return
            if time.monotonic() > deadline:
                timed_out.set()
                end_runner()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    assert runner.stdout is not None
    with open(log_path, "ab", buffering=0) as log:  # unbuffered: a write that fails is lost, not retried at close
        for raw in runner.stdout:
            with contextlib.suppress(OSError):  # a full disk: the run goes on (and says why it failed)
                log.write(raw)
            if stall is not None:
                stall.progress()
            line = raw.decode("utf-8", "replace").rstrip()
            idx = line.find(PROGRESS_MARK)
            if idx >= 0:
                on_progress(line[idx + len(PROGRESS_MARK) :])
    runner.wait()
    if not died and runner.returncode != 0 and essential:
        # `flwr run` may see the SuperLink's connection drop and exit before the watchdog thread's
        # next look: a failed runner is first put down to a dead essential process, if one died
        # (bounded wait: the kernel reaps a SIGKILLed process at once, a loaded machine reports late).
        grace = time.monotonic() + ESSENTIAL_DEATH_GRACE
        while not died and time.monotonic() < grace:
            died.extend((name, proc) for name, proc in essential if proc.poll() is not None)
            if not died:
                time.sleep(0.1)
    if died:
        name, proc = died[0]
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise RunInterrupted(
            f"{name} (pid {proc.pid}) died during the run ({how}); every process of the run was stopped. "
            "The run directory keeps its checkpoints: run the same command again to resume from the last one"
        )
    if stalled:
        raise RunInterrupted(stalled[0])
    if timed_out.is_set():
        raise RunInterrupted(f"the run did not finish within {timeout:g} s (--timeout); log {log_path}")


def launch_isolated(spec: LaunchSpec, on_progress: Callable[[str], None], watchdog: Watchdog) -> None:
    """Run :func:`run_federation` in a private network + PID namespace (``python -m fedlinear.scripts.local.launch --inner``)."""
    os.makedirs(spec.workdir, exist_ok=True)
    spec_path = os.path.join(spec.workdir, "isolated-spec.json")
    error_path = os.path.join(spec.workdir, "isolated-error.txt")
    log_path = os.path.join(spec.workdir, "isolated.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(error_path)
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(dataclasses.replace(spec, isolation="none")), handle)
    on_progress("isolation: the federation runs in a private network namespace (loopback only)")
    group = ProcessGroup(die_with_parent=True, token=watchdog.token, on_start=watchdog.watch_group)
    proc = None
    pids = HostPids()  # errors from inside name host pids

    def progress(line: str) -> None:
        if not pids.note(line):
            on_progress(line)

    try:
        proc = group.start(
            "isolated",
            [*unshare_argv(), sys.executable, "-m", "fedlinear.scripts.local.launch", "--inner", spec_path, error_path],
            {**os.environ, TREE_ENV: watchdog.token}, None, stdout=subprocess.PIPE,
        )  # fmt: skip
        pids.root = proc.pid
        # the inner launcher bounds start-up and the run itself; this bound is the backstop
        follow(proc, log_path, progress, spec.run_timeout + 3 * spec.startup_timeout + 60)
        if proc.returncode == 0:
            return
        with contextlib.suppress(OSError), open(error_path, encoding="utf-8") as handle:
            text = pids.translate(handle.read().rstrip())
            if text.startswith(INTERRUPTED_MARK):
                raise RunInterrupted(text[len(INTERRUPTED_MARK) :])
            raise FedLinearError(text)
        if proc.returncode == 130:
            raise KeyboardInterrupt
        raise FedLinearError(
            f"the isolated federation exited with code {proc.returncode}; log {log_path}:\n{tail(log_path)}"
        )
    finally:
        if proc is not None and proc.poll() is None:
            # SIGTERM to the namespace's init, which hands it to the inner launcher: it stops its
            # processes as it would outside (bounded); whatever is left is then killed
            with contextlib.suppress(psutil.Error):
                for init in psutil.Process(proc.pid).children():
                    init.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=ISOLATED_STOP_GRACE)
        group.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inner"] and len(sys.argv) == 4:
        sys.exit(namespace_init(sys.argv[2], sys.argv[3], run_federation))
    sys.exit("usage: python -m fedlinear.scripts.local.launch --inner SPEC.json ERROR.txt")
