"""A local federation on a shared machine: another user cannot submit a run to it or join it.

``fedlinear run`` (``--isolation auto``, the default) runs its SuperLink, SuperNodes and ``flwr run`` in a
private network namespace with only a loopback interface (see scripts/local/isolation.py). Here, while such a
federation runs, a process of ANOTHER uid on the same machine finds the SuperLink's port in the run's
workdir and tries (1) a TCP connection, (2) ``flwr run`` of an app that would leave a marker file on every
SuperNode, (3) ``flower-supernode --insecure`` to join. Each must fail quickly, the marker must never
appear and no extra node may be listed. Controls: root in the host's namespace is refused too (so it is
the namespace, not the uid), and root entering the federation's namespace (``nsenter``) connects (so the
port was live). Teardown (Ctrl-C) must leave no process and no namespace.

Two owners: root (``unshare --net``) and an unprivileged user (uid 65534, an unprivileged user namespace,
``unshare --user --map-root-user --net``); the attacker is another uid (65533, resp. 65534). Needs root
(to act as other users); skipped, with the reason printed, where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

import psutil
import pytest

from fedlinear.scripts.local.flower import free_port
from fedlinear.scripts.local.isolation import namespace_unavailable, unshare_argv
from tests import bounded
from tests.conftest import REPO, write_federation
from tests.e2e.test_netns import ROGUE_PYPROJECT, ROGUE_SERVER

BIN = os.path.dirname(os.path.abspath(sys.executable))
ROGUE_CLIENT = """
from flwr.clientapp import ClientApp
open("{marker}", "w").write("rogue code ran")
app = ClientApp()
"""
ATTACK = r"""
import json, os, signal, socket, subprocess, sys, tempfile, time
port, app = int(sys.argv[1]), sys.argv[2]
out = {"uid": os.getuid()}
started = time.monotonic()
try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    out["tcp"] = "connected"
except OSError as exc:
    out["tcp"] = f"{type(exc).__name__}: {exc}"
out["tcp-s"] = time.monotonic() - started
for what, argv, bound in (
    ("run", ["flwr", "run", app, "fedlinear"], 120),
    ("join", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--max-retries", "1",
              "--max-wait-time", "10", "--port", sys.argv[3]], 120),
):
    # output through a file, not a pipe: flower-supernode leaves its flower-superexec behind for a
    # while, holding a pipe open; the whole session is killed afterwards
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out[what] = proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            out[what] = "timeout"
        out[what + "-s"] = time.monotonic() - started
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.seek(0)
        out[what + "-output"] = log.read().decode("utf-8", "replace")[-1500:]
print("ATTACK " + json.dumps(out))
"""


def _skip(reason: str):
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def _blocked_dir() -> str | None:
    """The directory on the interpreter's path other users cannot enter (e.g. /root with pyenv), if any."""
    path = os.path.realpath(sys.executable)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        directory = os.sep.join(parts[:i])
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


def as_user(uid: int, argv: list[str], scratch: str) -> list[str]:
    """``argv`` as uid/gid ``uid`` with no groups. Where this machine's Python lives under a directory other
    users cannot enter (/root here), the process gets a private mount namespace in which that directory is
    a world-enterable tmpfs holding a bind mount of the Python tree: it changes which files the process can
    open, not which network it is in (the test's subject)."""
    drop = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *argv]
    blocked = _blocked_dir()
    if blocked is None:
        return drop
    keep = os.sep.join(os.path.realpath(sys.executable).split(os.sep)[: len(blocked.split(os.sep)) + 1])
    stash = tempfile.mkdtemp(prefix="fl-view-", dir=scratch)  # stays empty on the host: the mount is private
    script = (
        f'mount --bind "{keep}" "{stash}" && mount -t tmpfs -o mode=755 tmpfs "{blocked}" && '
        f'mkdir -p "{keep}" && mount --bind "{stash}" "{keep}" && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *drop]


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def in_netns(netns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/net") == netns:
                    pids.append(int(entry))
    return pids


def with_home(home: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("FLWR_HOME") == home:
                found.append(proc.pid)
    return found


def env_for(home: str, flwr_home: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=home, PATH=BIN + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1")  # fmt: skip
    if flwr_home:
        env["FLWR_HOME"] = flwr_home
    return env


OWNERS = {"root": (0, 65533), "unprivileged": (65534, 65533)}


@pytest.fixture(scope="module", params=list(OWNERS))
def live(request):
    owner, attacker = OWNERS[request.param]
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        _skip("acting as other users needs root and setpriv (util-linux)")
    work = tempfile.mkdtemp(prefix="fl-iso-")
    os.chmod(work, 0o755)
    try:
        state = _start(request.param, owner, attacker, work)
        try:
            yield state
        finally:
            _stop(state["proc"])  # normally done by the last test already
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _start(kind: str, owner: int, attacker: int, work: str):
    data = os.path.join(work, "data")
    write_federation(data, clients=2, samples=100)
    out, home = os.path.join(work, "run"), os.path.join(work, "home")
    os.makedirs(home)
    os.chown(home, owner, owner)
    os.chown(work, owner, owner)
    argv = [sys.executable, "-m", "fedlinear.scripts.cli", "run", "--data", data, "--clients", "2", "--rounds", "500",
            "--out", out, "--isolation", "netns", "--set", "seed=5"]  # fmt: skip
    if owner != 0:
        probe = bounded.run(as_user(owner, [*unshare_argv(owner), "true"], work), capture_output=True, text=True,
                               timeout=30)  # fmt: skip
        if probe.returncode != 0:
            _skip(f"unprivileged user namespaces are not available here: {probe.stderr.strip()}")
        argv = as_user(owner, argv, work)
    elif (why := namespace_unavailable()) is not None:
        _skip(why)
    lines: list[str] = []
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    flwr_home = os.path.join(out, "logs", "flwr-home")
    try:
        budget = bounded.Budget(300)
        while not any("nodes connected" in line for line in lines):
            assert proc.poll() is None, "fedlinear run ended early:\n" + "".join(lines)
            assert not budget.spent(), "no node connected within 300 s:\n" + "".join(lines)
            time.sleep(0.2)
        with open(os.path.join(flwr_home, "config.toml"), "rb") as handle:
            address = tomllib.load(handle)["superlink"]["fedlinear"]["address"]
        port = int(address.rsplit(":", 1)[1])
        [superlink] = [p for p in with_home(flwr_home) if "flower-superlink" in " ".join(psutil.Process(p).cmdline())]
        return {
            "kind": kind, "owner": owner, "attacker": attacker, "work": work, "proc": proc, "lines": lines,
            "port": port, "superlink": superlink, "netns": netns_of(superlink), "flwr_home": flwr_home,
        }  # fmt: skip
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


def _python(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_the_superlink_is_alone_in_a_private_namespace(live):
    assert live["netns"] != os.readlink("/proc/self/ns/net")
    enter = ["nsenter", f"--net=/proc/{live['superlink']}/ns/net"]
    links = subprocess.run([*enter, "ip", "-o", "link"], capture_output=True, text=True, timeout=30, check=True)
    assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
    # control: from inside the namespace the port is live ...
    inside = subprocess.run([*enter, *_python(CONNECT, live["port"])], capture_output=True, text=True, timeout=60)
    assert inside.stdout.strip() == "connected", inside.stdout + inside.stderr
    # ... and from the host's namespace even root is refused: it is the namespace, not the uid
    outside = bounded.run(_python(CONNECT, live["port"]), capture_output=True, text=True, timeout=60)
    assert outside.stdout.strip() == "ConnectionRefusedError", outside.stdout + outside.stderr
    # every process of the federation shares that namespace
    assert set(with_home(live["flwr_home"])) <= set(in_netns(live["netns"]))


def test_another_user_cannot_submit_a_run_or_join(live):
    work, port, attacker = live["work"], live["port"], live["attacker"]
    assert attacker != live["owner"]
    marker = os.path.join(work, "ROGUE-CODE-RAN")
    app = os.path.join(work, "rogue-app")
    os.makedirs(app)
    for name, text in (("pyproject.toml", ROGUE_PYPROJECT), ("server_app.py", ROGUE_SERVER),
                       ("client_app.py", ROGUE_CLIENT.format(marker=marker))):  # fmt: skip
        with open(os.path.join(app, name), "w") as handle:
            handle.write(text)
    home = os.path.join(work, "attacker-home")
    os.makedirs(home)
    # the attacker read the address from the run's workdir: the same connection, in its own FLWR_HOME
    shutil.copy(os.path.join(live["flwr_home"], "config.toml"), os.path.join(home, "config.toml"))
    for root, dirs, files in os.walk(home):
        for name in [root, *(os.path.join(root, f) for f in dirs + files)]:
            os.chown(name, attacker, attacker)
    os.chmod(work, 0o777)
    started = time.monotonic()
    done = bounded.run(
        as_user(attacker, _python(ATTACK, port, app, free_port()), work), cwd=home, env=env_for(home, home),
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("ATTACK ")] or [done.stdout + done.stderr]
    result = json.loads(line[len("ATTACK ") :])
    summary = {k: v for k, v in result.items() if not k.endswith("-output")}
    print(f"attacker against port {port} ({elapsed:.1f} s): {json.dumps(summary)}")
    assert result["uid"] == attacker
    assert result["tcp"].startswith("ConnectionRefusedError") and result["tcp-s"] < 5
    # refused, not hanging: each attempt ends by itself within its bound (120 s: generous for a loaded CI)
    assert result["run"] not in (0, "timeout"), result.get("run-output")
    assert result["join"] not in (0, "timeout"), result.get("join-output")
    assert not os.path.exists(marker)
    # nothing joined: the SuperLink lists the two nodes the federation started, and no other
    admin = os.path.join(work, "admin-home")
    os.makedirs(admin)
    shutil.copy(os.path.join(live["flwr_home"], "config.toml"), os.path.join(admin, "config.toml"))
    listed = bounded.run(
        ["nsenter", f"--net=/proc/{live['superlink']}/ns/net", "flwr", "supernode", "list", "fedlinear",
         "--format", "json"],
        env=env_for(admin, admin), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    nodes = json.loads(listed.stdout[listed.stdout.find("{") :])["nodes"]
    assert len(nodes) == 2, listed.stdout
    assert live["proc"].poll() is None, "".join(live["lines"])


def test_ctrl_c_leaves_no_process_and_no_namespace(live):
    code = _stop(live["proc"])
    assert code == 130, "".join(live["lines"])
    budget = bounded.Budget(30)
    while (with_home(live["flwr_home"]) or in_netns(live["netns"])) and not budget.spent():
        time.sleep(0.2)
    assert with_home(live["flwr_home"]) == []
    assert in_netns(live["netns"]) == []  # no process holds it: the kernel has freed the namespace
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert live["port"] not in listening


# ----------------------------------------------------------------------------------------------
# the choice (no federation started)
# ----------------------------------------------------------------------------------------------


def _spec(**kw):
    from fedlinear.scripts.local.spec import LaunchSpec

    base = {"app_dir": REPO, "mode": "processes", "num_nodes": 1, "run_config": {"run-dir": "/tmp/x"},
            "workdir": "/tmp/x/logs", "node_configs": [{"data-uri": "/data/client-0.csv"}]}  # fmt: skip
    base.update(kw)
    return LaunchSpec(**base)


def test_auto_falls_back_with_one_warning_line_and_netns_refuses(monkeypatch):
    from fedlinear.scripts.local import isolation

    monkeypatch.setattr(isolation, "namespace_unavailable", lambda: None)
    warnings: list[str] = []
    assert isolation.resolve_isolation(_spec(), warnings.append) == "netns"
    assert isolation.resolve_isolation(_spec(isolation="none"), warnings.append) == "none"
    assert warnings == []
    cases = {
        "s3 shard": _spec(node_configs=[{"data-uri": "s3://bucket/client-0.csv"}]),
        "s3 run dir": _spec(run_config={"run-dir": "s3://bucket/runs/r1"}),
        "ray cluster": _spec(mode="simulation", node_configs=None, ray_address="127.0.0.1:6379"),
    }
    for what, spec in cases.items():
        assert isolation.resolve_isolation(spec, warnings.append) == "none", what
        with pytest.raises(isolation.FedLinearError, match="--isolation netns: "):
            isolation.resolve_isolation(_spec(**{**spec.__dict__, "isolation": "netns"}))
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    assert "s3://bucket/client-0.csv is on S3" in warnings[0] and "--ray-address 127.0.0.1:6379" in warnings[2]
    assert all("other users and programs on this machine can reach its SuperLink" in w for w in warnings)
    monkeypatch.setattr(isolation, "namespace_unavailable", lambda: "util-linux 'unshare' is not installed")
    assert isolation.resolve_isolation(_spec(), warnings.append) == "none"
    assert "federation not isolated: util-linux 'unshare' is not installed;" in warnings[-1]
    with pytest.raises(isolation.FedLinearError, match="unshare' is not installed"):
        isolation.resolve_isolation(_spec(isolation="netns"))


def test_a_killed_superlink_is_named_by_its_host_pid(tmp_path):
    """Inside the private PID namespace the SuperLink is pid 3 or so; the error line names the pid it has on
    this host (the one `kill` and `ps` know), beside the pid inside."""
    if (why := namespace_unavailable()) is not None:
        _skip(why)
    data, out = tmp_path / "data", tmp_path / "run"
    write_federation(str(data), clients=2, samples=100)
    argv = [sys.executable, "-m", "fedlinear.scripts.cli", "run", "--data", str(data), "--clients", "2",
            "--rounds", "500", "--out", str(out), "--isolation", "netns"]  # fmt: skip
    lines: list[str] = []
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        budget = bounded.Budget(600)
        while not any("nodes connected" in line for line in lines):
            assert proc.poll() is None, "fedlinear run ended early:\n" + "".join(lines) + proc.stderr.read()
            assert not budget.spent(), "no node connected within 600 s:\n" + "".join(lines)
            time.sleep(0.2)
        flwr_home = str(out / "logs" / "flwr-home")
        [superlink] = [p for p in with_home(flwr_home) if "flower-superlink" in " ".join(psutil.Process(p).cmdline())]
        with open(f"/proc/{superlink}/status") as handle:
            nspid = next(line for line in handle if line.startswith("NSpid:")).split()[1:]
        inner = int(nspid[-1])
        assert len(nspid) == 2 and inner != superlink  # in a namespace of its own, another pid there
        os.kill(superlink, signal.SIGKILL)
        _, err = bounded.communicate(proc, 600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[0].startswith(
        f"fedlinear: error: flower-superlink (pid {superlink} on this host; pid {inner} in the run's private PID "
        "namespace) died during the run (killed by SIGKILL)"
    ), err
