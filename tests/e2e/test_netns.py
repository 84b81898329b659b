"""A multi-host federation in network namespaces: the docs/deploy.md walk-through, run as written.

Topology (all made here, all removed at the end; nothing leaves these namespaces):

    <tag>-sw    a bridge (the "network")
    <tag>-srv   10.231.0.1  `fedlinear superlink` (Fleet front on :9092, SuperLink on 127.0.0.1:9093)
    <tag>-p0..2 10.231.0.10-12  one party each: `fedlinear node` with its own key and shard
    <tag>-rogue 10.231.0.66 holds the CA certificate and tries to take over

Parties dial ``superlink.fedlinear.test`` (a DNS SAN of the server certificate; resolved through
``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over /etc/hosts). Needs root and ``ip netns``;
skipped with the reason otherwise. One federation is shared by every test in this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest

from fedlinear.scripts.local.flower import config_string
from fedlinear.scripts.local.staging import stage_app
from tests import bounded
from tests.conftest import REPO, run_cli, write_federation

ROUNDS = 2
SUBNET = "10.231.0"
SERVER_IP = f"{SUBNET}.1"
NAME = "superlink.fedlinear.test"
WRONG_NAME = "wrong.fedlinear.test"
FLEET_PORT, CONTROL_PORT = 9092, 9093
BIN = os.path.dirname(os.path.abspath(sys.executable))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition`` until it returns something truthy; fail naming ``what``. Bounded by work, not by the
    clock: ``timeout`` is the quiet-machine bound, scaled by the load (:class:`tests.bounded.Budget`)."""
    budget = bounded.Budget(timeout)
    while True:
        value = condition()
        if value:
            return value
        if budget.spent():
            pytest.fail(f"waiting for {what}: {budget.describe()}")
        time.sleep(interval)


class Network:
    """Namespaces joined by a bridge, and every process started in them."""

    def __init__(self, workdir: str) -> None:
        self.tag = f"fl{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # namespace -> IP
        self.procs: list[subprocess.Popen] = []
        self.workdir = workdir
        self.closed = False

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def add_switch(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, role: str, address: str) -> str:
        ns = self.ns(role)
        _ip("netns", "add", ns)
        self.hosts[ns] = address
        port = f"v{len(self.hosts)}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        with open(f"/etc/netns/{ns}/hosts", "w") as handle:
            handle.write(f"127.0.0.1 localhost\n{SERVER_IP} {NAME} {WRONG_NAME}\n")
        return ns

    def env(self, flwr_home: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        if flwr_home:
            env["FLWR_HOME"] = flwr_home
        return env

    def popen(self, ns: str, argv: list[str], log: str, flwr_home: str | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], cwd=REPO, env=self.env(flwr_home), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def run(self, ns: str, argv: list[str], timeout: float = 120, flwr_home: str | None = None):
        """Run a command in ``ns`` to completion (bounded). Output goes through files, not pipes: a stock
        flower-supernode leaves its flower-superexec behind for a while, holding any pipe open. Whatever
        the command left running in ``ns`` is then given a few seconds to go, and killed."""
        started = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], cwd=REPO, env=self.env(flwr_home), stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                budget = bounded.Budget(timeout)  # the quiet-machine bound, scaled by the load
                while True:
                    try:
                        proc.wait(timeout=bounded.POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        if budget.spent():
                            raise subprocess.TimeoutExpired(proc.args, timeout, budget.describe()) from None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self.sweep(ns)
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read().decode(), err.read().decode())
        done.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
        return done

    def long_lived(self) -> set[int]:
        pids = set()
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                pids.add(parent.pid)
                pids.update(child.pid for child in parent.children(recursive=True))
        return pids

    def sweep(self, ns: str, grace: float = 15.0) -> None:
        """Processes in ``ns`` that none of the long-lived commands started: wait ``grace`` s, then kill."""
        deadline, killed = time.monotonic() + grace, False
        while True:
            keep = self.long_lived()
            strays = [p for p in self.pids(ns) if p not in keep]
            if not strays or (killed and time.monotonic() > deadline):
                return
            if time.monotonic() > deadline:
                for pid in strays:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline, killed = time.monotonic() + grace, True
            time.sleep(0.2)

    def fedlinear(self, ns: str, *args, timeout: float = 120, flwr_home: str | None = None):
        return self.run(ns, [sys.executable, "-m", "fedlinear.scripts.cli", *map(str, args)], timeout, flwr_home)

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)

    def pids(self, ns: str) -> list[int]:
        done = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in reversed(self.procs):  # our commands first, so they take their children down
            self.stop(proc)
        for ns in [*self.hosts, self.switch]:
            stragglers = self.pids(ns)
            for pid in stragglers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                psutil.wait_procs([psutil.Process(p) for p in stragglers if psutil.pid_exists(p)], timeout=10)
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


ROGUE_CLIENT = """
import os
from flwr.clientapp import ClientApp
open(os.environ.get("ROGUE_MARKER", "{marker}"), "w").write("rogue code ran")
app = ClientApp()
"""
ROGUE_SERVER = """
from flwr.serverapp import ServerApp
app = ServerApp()
"""
ROGUE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "rogue"
version = "1.0.0"
dependencies = []
[tool.hatch.build.targets.wheel]
packages = ["."]
[tool.flwr.app]
publisher = "rogue"
[tool.flwr.app.components]
serverapp = "server_app:app"
clientapp = "client_app:app"
[tool.flwr.app.config]
"""


def final_weights(run_dir: str) -> np.ndarray:
    with open(os.path.join(run_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    return np.array(manifest["weights"]["kernel"] + [manifest["weights"]["bias"]])


def online_nodes(net: Network, ns: str, home: str) -> list[dict] | None:
    done = net.run(ns, ["flwr", "supernode", "list", "fedlinear", "--format", "json"], timeout=60, flwr_home=home)
    if done.returncode != 0:
        return None
    start = done.stdout.find("{")
    return json.loads(done.stdout[start:])["nodes"] if start >= 0 else None


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        reason = "network namespaces need root and iproute2 (`ip netns`)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    work = str(tmp_path_factory.mktemp("netns"))
    net = Network(work)
    try:
        net.add_switch()
    except subprocess.CalledProcessError as exc:
        reason = f"cannot create a network namespace here: {exc.stderr.strip() or exc}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    try:
        yield _start(net, work)
    finally:
        net.close()


def _start(net: Network, work: str) -> dict:
    srv = net.add_host("srv", SERVER_IP)
    parties = [net.add_host(f"p{i}", f"{SUBNET}.{10 + i}") for i in range(3)]
    rogue = net.add_host("rogue", f"{SUBNET}.66")
    data = os.path.join(work, "data")
    write_federation(data)
    # the loopback run with the same seed that the namespaced run is compared with: independent of the
    # namespaces, so it goes on (bounded by its own wait) while they are set up and the federation runs
    loopback = os.path.join(work, "loopback")
    pool = ThreadPoolExecutor(max_workers=1)
    loopback_run = pool.submit(run_cli, "run", "--data", data, "--clients", 3, "--rounds", ROUNDS, "--out", loopback,
                               "--set", "seed=5")  # fmt: skip
    pool.shutdown(wait=False)

    # 1. credentials (docs/deploy.md step 1)
    certs = os.path.join(work, "certs")
    done = run_cli("certs", "--out", certs, "--address", SERVER_IP, "--address", NAME,
                   *sum((["--party", p] for p in ("p0", "p1", "p2", "stranger")), []))  # fmt: skip
    assert done.returncode == 0, done.stderr
    other = os.path.join(work, "other-certs")  # another federation's CA, same names
    assert run_cli("certs", "--out", other, "--address", SERVER_IP, "--address", NAME).returncode == 0

    # 2. the SuperLink with its Fleet front
    srv_log = os.path.join(work, "superlink.out")
    superlink = net.popen(srv, [sys.executable, "-m", "fedlinear.scripts.cli", "superlink", "--certs", certs,
                                "--host", "0.0.0.0", "--port", str(FLEET_PORT), "--control-port", str(CONTROL_PORT),
                                "--address", NAME, "--workdir", os.path.join(work, "srv")], srv_log)  # fmt: skip

    def ready():
        assert superlink.poll() is None, open(srv_log).read()
        return "fedlinear superlink: ready" in open(srv_log).read()

    wait_for(ready, 120, "fedlinear superlink to be ready")

    # 3. the operator's Flower connection on the server host, checked, and the parties registered
    home = os.path.join(work, "srv-home")
    os.makedirs(home)
    with open(os.path.join(home, "config.toml"), "w") as handle:
        handle.write('[superlink]\ndefault = "fedlinear"\n\n')
        handle.write(f'[superlink.fedlinear]\naddress = "127.0.0.1:{CONTROL_PORT}"\n')
        handle.write(f'root-certificates = "{certs}/ca.crt"\n')
    done = net.fedlinear(srv, "preflight", "--flwr-config", os.path.join(home, "config.toml"), "--probe")
    assert done.returncode == 0, done.stderr
    for i in range(3):
        done = net.run(srv, ["flwr", "supernode", "register", f"{certs}/p{i}.pub", "fedlinear"], flwr_home=home)
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr

    # 4. the parties, each with its own key and shard
    nodes = []
    for i, ns in enumerate(parties):
        nodes.append(
            net.popen(ns, [sys.executable, "-m", "fedlinear.scripts.cli", "node", "--superlink", f"{NAME}:{FLEET_PORT}",
                           "--ca", f"{certs}/ca.crt", "--key", f"{certs}/p{i}.key",
                           "--data-uri", f"{data}/client-{i}.csv", "--partition-id", str(i), "--num-partitions", "3",
                           "--max-retries", "3", "--workdir", os.path.join(work, f"p{i}")],
                      os.path.join(work, f"node-{i}.out"))  # fmt: skip
        )

    def three_online():
        assert all(n.poll() is None for n in nodes), [open(os.path.join(work, f"node-{i}.out")).read() for i in range(3)]
        listed = online_nodes(net, srv, home) or []
        return listed if sum(n["status"] == "online" for n in listed) == 3 else None

    listed = wait_for(three_online, 120, "three SuperNodes online", interval=1.0)

    # 5. a run, submitted with stock `flwr run` from the server host
    app = stage_app(REPO, os.path.join(work, "app"))
    run_dir = os.path.join(work, "run")
    run_config = {
        "num-server-rounds": ROUNDS, "min-available-nodes": 3, "run-dir": run_dir,
        "test-uri": f"{data}/test.csv", "seed": 5,
    }  # fmt: skip
    started = time.monotonic()
    run = net.run(srv, ["flwr", "run", app, "fedlinear", "--stream", "--run-config", config_string(run_config)],
                  timeout=600, flwr_home=home)  # fmt: skip
    run_wall = time.monotonic() - started
    return {
        "net": net, "work": work, "certs": certs, "other": other, "data": data, "srv": srv, "home": home,
        "parties": parties, "rogue": rogue, "superlink": superlink, "nodes": nodes, "registered": listed,
        "run": run, "run_dir": run_dir, "run_wall": run_wall, "app": app, "srv_log": srv_log,
        "loopback": (loopback, loopback_run),
    }  # fmt: skip


def test_the_federation_completes_across_namespaces(fed):
    run = fed["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(os.path.join(fed["run_dir"], "status.json")) as handle:
        assert json.load(handle)["status"] == "completed"
    with open(os.path.join(fed["run_dir"], "history.json")) as handle:
        history = json.load(handle)
    assert [row["round"] for row in history["rounds"]] == list(range(ROUNDS + 1))
    assert all(row["clients-ok"] == 3 and row["clients-failed"] == 0 for row in history["rounds"][1:])
    with open(os.path.join(fed["run_dir"], "manifest.json")) as handle:
        shards = json.load(handle)["shards"]
    # each party read its own shard, and only it
    assert sorted((s["partition-id"], s["data-uri"]) for s in shards) == [
        (i, f"{fed['data']}/client-{i}.csv") for i in range(3)
    ]


def test_each_party_forks_its_clientapps_ready_imported(fed):
    """``fedlinear node`` gives its SuperNode the warm ClientApp executor (scripts/local/warm_clientapp.py),
    as processes mode does: every message's ClientApp on a party's host is forked ready-imported, one per
    stage (describe, scatter, one per round), none started cold."""
    assert fed["run"].returncode == 0
    for i in range(3):
        party = os.path.join(fed["work"], f"p{i}")
        with open(os.path.join(party, "warm-clientapp.log")) as handle:
            forked = [line for line in handle if line.startswith("forked ")]
        assert len(forked) == ROUNDS + 2, f"party {i}: {len(forked)} ClientApps forked warm"
        with open(os.path.join(party, "supernode.log"), errors="replace") as handle:
            text = handle.read()
        assert "warm ClientApp executor not used" not in text and "Traceback" not in text, text[-2000:]


def test_final_weights_equal_a_loopback_run_with_the_same_seed(fed):
    assert fed["run"].returncode == 0
    out, loopback_run = fed["loopback"]  # started with the federation, on its data
    done = loopback_run.result()
    assert done.returncode == 0, done.stdout + done.stderr
    np.testing.assert_allclose(final_weights(fed["run_dir"]), final_weights(str(out)), atol=1e-6, rtol=0)


def _assert_only_the_three_parties(fed):
    listed = online_nodes(fed["net"], fed["srv"], fed["home"])
    assert listed is not None
    assert sorted(n["node-id"] for n in listed) == sorted(n["node-id"] for n in fed["registered"])


def _one_error_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("fedlinear: error: ")
    return lines[0]


def test_a_plaintext_supernode_is_refused(fed):
    net = fed["net"]
    done = net.run(fed["rogue"], ["flower-supernode", "--insecure", "--superlink", f"{NAME}:{FLEET_PORT}",
                                  "--max-retries", "2", "--max-wait-time", "30", "--port", "39001"],
                   timeout=120, flwr_home=os.path.join(fed["work"], "plain-home"))  # fmt: skip
    assert done.returncode != 0 and done.elapsed < 60
    assert "400 Bad Request" in done.stdout + done.stderr
    assert "refused a plaintext connection from 10.231.0.66" in open(fed["srv_log"]).read()
    # `fedlinear node` offers no plaintext mode at all
    assert "--insecure" not in net.fedlinear(fed["rogue"], "node", "--help").stdout
    _assert_only_the_three_parties(fed)


def test_a_supernode_trusting_another_ca_is_refused(fed):
    net, certs = fed["net"], fed["certs"]
    done = net.fedlinear(fed["rogue"], "node", "--superlink", f"{NAME}:{FLEET_PORT}", "--ca", f"{fed['other']}/ca.crt",
                         "--key", f"{certs}/stranger.key", "--data-uri", f"{fed['data']}/client-0.csv",
                         "--workdir", os.path.join(fed["work"], "otherca"))  # fmt: skip
    line = _one_error_line(done)
    assert f"{NAME}:{FLEET_PORT}: the server's certificate is not signed by the CA in {fed['other']}/ca.crt" in line
    # stock flower-supernode gives up too (bounded), instead of retrying
    done = net.run(fed["rogue"], ["flower-supernode", "--root-certificates", f"{fed['other']}/ca.crt",
                                  "--auth-supernode-private-key", f"{certs}/stranger.key",
                                  "--superlink", f"{NAME}:{FLEET_PORT}", "--max-retries", "2", "--port", "39002"],
                   timeout=120, flwr_home=os.path.join(fed["work"], "otherca-home"))  # fmt: skip
    assert done.returncode != 0 and done.elapsed < 60 and "CERTIFICATE_VERIFY_FAILED" in done.stdout + done.stderr
    _assert_only_the_three_parties(fed)


def test_dialling_a_name_not_in_the_certificate_is_refused(fed):
    net, certs = fed["net"], fed["certs"]
    done = net.fedlinear(fed["parties"][0], "node", "--superlink", f"{WRONG_NAME}:{FLEET_PORT}", "--ca", f"{certs}/ca.crt",
                         "--key", f"{certs}/stranger.key", "--data-uri", f"{fed['data']}/client-0.csv",
                         "--workdir", os.path.join(fed["work"], "wrongname"))  # fmt: skip
    line = _one_error_line(done)
    assert f"the server's certificate does not cover '{WRONG_NAME}'" in line
    _assert_only_the_three_parties(fed)


def test_an_unregistered_key_is_refused(fed):
    net, certs = fed["net"], fed["certs"]
    done = net.fedlinear(fed["rogue"], "node", "--superlink", f"{NAME}:{FLEET_PORT}", "--ca", f"{certs}/ca.crt",
                         "--key", f"{certs}/stranger.key", "--data-uri", f"{fed['data']}/client-0.csv",
                         "--max-retries", "1", "--workdir", os.path.join(fed["work"], "stranger"), timeout=120)  # fmt: skip
    line = _one_error_line(done)
    assert f"refused this node's key {certs}/stranger.key: it is not registered there" in line
    assert f"flwr supernode register {certs}/stranger.pub" in line
    assert done.elapsed < 60
    _assert_only_the_three_parties(fed)


def test_a_supernode_without_a_key_is_refused(fed):
    done = fed["net"].run(fed["rogue"], ["flower-supernode", "--root-certificates", f"{fed['certs']}/ca.crt",
                                         "--superlink", f"{NAME}:{FLEET_PORT}", "--max-retries", "2", "--port", "39003"],
                          timeout=120, flwr_home=os.path.join(fed["work"], "nokey-home"))  # fmt: skip
    assert done.returncode != 0 and done.elapsed < 60
    assert "must be registered via the CLI" in done.stdout + done.stderr
    _assert_only_the_three_parties(fed)


def test_a_rogue_host_cannot_submit_list_or_register(fed, tmp_path):
    net, certs, rogue = fed["net"], fed["certs"], fed["rogue"]
    marker = os.path.join(fed["work"], "ROGUE-CODE-RAN")
    app = tmp_path / "rogue-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (app / "client_app.py").write_text(ROGUE_CLIENT.format(marker=marker))
    (app / "server_app.py").write_text(ROGUE_SERVER)
    home = tmp_path / "rogue-home"
    home.mkdir()
    # the rogue holds the CA certificate and tries the Fleet port and the SuperLink's own port
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "front"\n\n'
        f'[superlink.front]\naddress = "{SERVER_IP}:{FLEET_PORT}"\nroot-certificates = "{certs}/ca.crt"\n\n'
        f'[superlink.direct]\naddress = "{SERVER_IP}:{CONTROL_PORT}"\nroot-certificates = "{certs}/ca.crt"\n'
    )
    for connection in ("front", "direct"):
        attempts = {
            "list": ["flwr", "supernode", "list", connection],
            "register": ["flwr", "supernode", "register", f"{certs}/stranger.pub", connection],
            "run": ["flwr", "run", str(app), connection],
        }
        for what, argv in attempts.items():
            done = net.run(rogue, argv, timeout=120, flwr_home=str(home))
            assert done.returncode != 0, f"rogue {what} via {connection} succeeded: {done.stdout}"
            text = done.stdout + done.stderr
            if connection == "front":
                assert "404" in text, text[-2000:]
            else:
                assert "refused" in text.lower() or "connect" in text.lower(), text[-2000:]
    log = open(fed["srv_log"]).read()
    assert "refused POST /v1/control/start-run from 10.231.0.66" in log
    assert "refused POST /v1/control/register-node from 10.231.0.66" in log
    assert not os.path.exists(marker)
    _assert_only_the_three_parties(fed)


def test_parties_stay_connected_and_teardown_leaves_nothing(fed):
    net = fed["net"]
    assert fed["superlink"].poll() is None and all(n.poll() is None for n in fed["nodes"])
    online = online_nodes(net, fed["srv"], fed["home"]) or []
    assert sum(n["status"] == "online" for n in online) == 3
    homes = [os.path.join(fed["work"], d, "flwr-home") for d in ("srv", "p0", "p1", "p2")]
    ours = [p.pid for p in net.procs]
    net.close()
    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid in ours or proc.environ().get("FLWR_HOME") in homes:
                leftovers.append(proc.info)
    assert leftovers == []
    names = _ip("netns", "list").stdout
    assert net.tag not in names
    assert not any(os.path.exists(f"/etc/netns/{ns}") for ns in net.hosts)
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert FLEET_PORT not in listening and CONTROL_PORT not in listening
