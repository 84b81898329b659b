"""The Fleet front under abuse, in network namespaces (docs/deploy.md, "What the front withstands").

Topology (all made here, removed at the end): a bridge, the server (``fedlinear superlink`` at the
*default* open-file limit of 1024, set with ``prlimit``), two parties running ``fedlinear node``, and a
rogue host that holds the CA certificate. While the rogue keeps 2,000 slow connections going (TLS,
then one header line every 50 s, reconnecting whenever it is cut off or refused), a 2-party run
goes on through the front and must complete, and fresh connections from the parties must be served.
Then the rogue sends 50 MiB bodies (refused before the SuperLink reads them: the SuperLink process's
own read counter says so) and every malformed request of the unit tests (each a 4xx; each one log
line or counted in a "suppressed N similar lines" summary). Last, the rogue steals a party's key
while the party is offline: the front logs the key coming back from a new address, and the real
party's refusal names the likely cause.

Needs root and ``ip netns``; skipped with the reason printed otherwise.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from fedlinear.scripts.local.flower import config_string
from fedlinear.scripts.local.staging import stage_app
from tests.conftest import REPO, run_cli, write_federation
from tests.e2e.test_netns import CONTROL_PORT, FLEET_PORT, NAME, SERVER_IP, SUBNET, Network, online_nodes, wait_for
from tests.unit.test_fleetfront import TRICKS

ROGUE_IP = f"{SUBNET}.66"
SLOW_CONNECTIONS = 2000
FRONT_LOG = "[fleet-front]"

FLOOD = r'''
import asyncio, json, os, resource, ssl, sys, time
host, port, name, ca, total, out, stop, bound = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7], float(sys.argv[8])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = ssl.create_default_context(cafile=ca)
stats = {"attempts": 0, "refused": 0, "handshakes": 0, "cut": 0, "held": 0, "peak": 0, "longest": 0.0, "nofile": hard}
started = time.monotonic()

async def one():
    while True:
        stats["attempts"] += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, server_hostname=name), 30)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            stats["refused"] += 1
            await asyncio.sleep(2.0)
            continue
        opened = time.monotonic()
        stats["handshakes"] += 1
        stats["held"] += 1
        stats["peak"] = max(stats["peak"], stats["held"])
        try:
            writer.write(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n")
            while True:
                writer.write(b"X-Slow: 1\r\n")  # one header line every 50 s
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(4096), 50)
                except asyncio.TimeoutError:
                    continue
                if not data or data.startswith(b"HTTP/1.1 408"):
                    break
        except (OSError, ssl.SSLError):
            pass
        finally:
            stats["held"] -= 1
        stats["cut"] += 1
        stats["longest"] = max(stats["longest"], time.monotonic() - opened)
        writer.transport.abort()

async def main():
    tasks = [asyncio.ensure_future(one()) for _ in range(total)]
    while not os.path.exists(stop) and time.monotonic() - started < bound:
        stats["elapsed"] = time.monotonic() - started
        with open(out + ".tmp", "w") as handle:
            json.dump(stats, handle)
        os.replace(out + ".tmp", out)
        await asyncio.sleep(0.5)
    stats["elapsed"] = time.monotonic() - started
    stats["done"] = True
    with open(out, "w") as handle:
        json.dump(stats, handle)
    os._exit(0)  # drop every connection at once (cancelling 2,000 TLS tasks one by one is slow)

asyncio.run(main())
'''

PROBE = r'''
import http.client, ssl, sys
ca, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = http.client.HTTPSConnection(name, port, context=ssl.create_default_context(cafile=ca), timeout=30)
conn.request("POST", "/v1/fleet/get-run", body=b"", headers={"Content-Type": "application/protobuf"})
resp = conn.getresponse()
print(resp.status, resp.read()[:200])
'''

SENDER = r'''
import json, socket, ssl, sys
ca, name, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
replies = []
for raw in json.load(open(path)):
    raw = bytes.fromhex(raw)
    with ctx.wrap_socket(socket.create_connection((name, port), timeout=30), server_hostname=name) as sock:
        sock.sendall(raw)
        if b"Content-Length: 52428800" in raw:
            try:
                for _ in range(800):  # keep sending the 50 MiB the headers promised, as a client would
                    sock.sendall(b"\0" * 65536)
            except OSError:
                pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    replies.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
print(json.dumps(replies))
'''


def front_lines(path: str) -> list[str]:
    with open(path, errors="replace") as handle:
        return [line for line in handle if FRONT_LOG in line]


def superlink_process(fed) -> psutil.Process:
    parent = psutil.Process(fed["superlink"].pid)
    for proc in parent.children(recursive=True):
        try:
            if any("flower-superlink" in part for part in proc.cmdline()[:2]):
                return proc
        except psutil.Error:
            continue
    pytest.fail("no flower-superlink process under fedlinear superlink")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("prlimit") is None:
        reason = "network namespaces need root, iproute2 (`ip netns`) and prlimit"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SLOW_CONNECTIONS + 200:
        reason = f"the rogue needs {SLOW_CONNECTIONS + 200} open files; the hard limit here is {hard}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    if soft != resource.RLIM_INFINITY and soft < SLOW_CONNECTIONS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = str(tmp_path_factory.mktemp("netns-front"))
    net = Network(work)
    net.tag = f"ff{os.getpid() % 100000}"
    net.switch = f"{net.tag}-sw"
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
    parties = [net.add_host(f"p{i}", f"{SUBNET}.{10 + i}") for i in range(2)]
    rogue = net.add_host("rogue", ROGUE_IP)
    data = os.path.join(work, "data")
    write_federation(data, clients=2)
    certs = os.path.join(work, "certs")
    done = run_cli("certs", "--out", certs, "--address", SERVER_IP, "--address", NAME, "--party", "p0", "--party", "p1")
    assert done.returncode == 0, done.stderr
    srv_log = os.path.join(work, "superlink.out")
    # the front at the usual default open-file limit: it must cap connections below it by itself
    superlink = net.popen(srv, ["prlimit", "--nofile=1024:1024", sys.executable, "-m", "fedlinear.scripts.cli",
                                "superlink", "--certs", certs, "--host", "0.0.0.0", "--port", str(FLEET_PORT),
                                "--control-port", str(CONTROL_PORT), "--address", NAME,
                                "--workdir", os.path.join(work, "srv")], srv_log)  # fmt: skip

    def ready():
        assert superlink.poll() is None, open(srv_log).read()
        return "fedlinear superlink: ready" in open(srv_log).read()

    wait_for(ready, 120, "fedlinear superlink to be ready")
    home = os.path.join(work, "srv-home")
    os.makedirs(home)
    with open(os.path.join(home, "config.toml"), "w") as handle:
        handle.write('[superlink]\ndefault = "fedlinear"\n\n')
        handle.write(f'[superlink.fedlinear]\naddress = "127.0.0.1:{CONTROL_PORT}"\nroot-certificates = "{certs}/ca.crt"\n')
    for i in range(2):
        done = net.run(srv, ["flwr", "supernode", "register", f"{certs}/p{i}.pub", "fedlinear"], flwr_home=home)
        assert done.returncode == 0, done.stdout + done.stderr
    fed = {"net": net, "work": work, "certs": certs, "data": data, "srv": srv, "home": home, "parties": parties,
           "rogue": rogue, "superlink": superlink, "srv_log": srv_log, "nodes": {}, "refusable": 0}  # fmt: skip
    for i in range(2):
        start_node(fed, i)
    wait_for(lambda: two_online(fed), 180, "two SuperNodes online", interval=1.0)
    return fed


def start_node(fed, i: int, ns: str | None = None, tag: str = "") -> subprocess.Popen:
    net, certs = fed["net"], fed["certs"]
    out = os.path.join(fed["work"], f"node-{i}{tag}.out")
    proc = net.popen(ns or fed["parties"][i], [
        sys.executable, "-m", "fedlinear.scripts.cli", "node", "--superlink", f"{NAME}:{FLEET_PORT}",
        "--ca", f"{certs}/ca.crt", "--key", f"{certs}/p{i}.key", "--data-uri", f"{fed['data']}/client-{i}.csv",
        "--partition-id", str(i), "--num-partitions", "2", "--max-retries", "3",
        "--workdir", os.path.join(fed["work"], f"p{i}{tag}")], out)  # fmt: skip
    fed["nodes"][(i, tag)] = (proc, out)
    return proc


def two_online(fed):
    listed = online_nodes(fed["net"], fed["srv"], fed["home"]) or []
    return listed if sum(n["status"] == "online" for n in listed) == 2 else None


def test_the_front_caps_connections_below_the_open_file_limit(fed):
    text = open(fed["srv_log"]).read()
    found = re.search(r"front limits: (\d+) connections, (\d+) per address, headers within (\S+) s", text)
    assert found, text[-2000:]
    assert int(found.group(1)) < 1024 // 2 and int(found.group(2)) == 32 and found.group(3) == "10"


def test_a_run_completes_while_a_rogue_holds_2000_slow_connections(fed):
    net, work = fed["net"], fed["work"]
    script, stats_path, stop = os.path.join(work, "flood.py"), os.path.join(work, "flood.json"), os.path.join(work, "flood.stop")
    with open(script, "w") as handle:
        handle.write(FLOOD)
    lines_before = len(front_lines(fed["srv_log"]))
    flood = net.popen(fed["rogue"], [sys.executable, script, SERVER_IP, str(FLEET_PORT), NAME,
                                     f"{fed['certs']}/ca.crt", str(SLOW_CONNECTIONS), stats_path, stop, "900"],
                      os.path.join(work, "flood.out"))  # fmt: skip

    def flood_stats():
        assert flood.poll() is None, open(os.path.join(work, "flood.out")).read()
        if not os.path.exists(stats_path):
            return None
        with open(stats_path) as handle:
            return json.load(handle)

    # the flood is on: the rogue holds all the connections the front gives one address, and is refused more
    wait_for(lambda: (s := flood_stats()) and s["peak"] >= 32 and s["refused"] >= SLOW_CONNECTIONS - 32, 120,
             "the rogue to hold its slow connections", interval=0.5)  # fmt: skip
    try:
        # fresh connections from the parties are served meanwhile: a TLS handshake, and a request the
        # SuperLink itself answers (not the front)
        probe = os.path.join(work, "probe.py")
        with open(probe, "w") as handle:
            handle.write(PROBE)
        done = net.fedlinear(fed["parties"][0], "preflight", "--ca", f"{fed['certs']}/ca.crt",
                             "--superlink", f"{NAME}:{FLEET_PORT}")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        done = net.run(fed["parties"][1], [sys.executable, probe, f"{fed['certs']}/ca.crt", NAME, str(FLEET_PORT)])
        assert done.returncode == 0, done.stdout + done.stderr
        assert not done.stdout.startswith("503") and "fedlinear Fleet front" not in done.stdout, done.stdout
        # and a whole 2-party run goes through the front
        app = stage_app(REPO, os.path.join(work, "app"))
        run_dir = os.path.join(work, "run")
        config = {"num-server-rounds": 2, "min-available-nodes": 2, "run-dir": run_dir,
                  "test-uri": f"{fed['data']}/test.csv", "seed": 5}  # fmt: skip
        run = net.run(fed["srv"], ["flwr", "run", app, "fedlinear", "--stream", "--run-config", config_string(config)],
                      timeout=900, flwr_home=fed["home"])  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        with open(os.path.join(run_dir, "status.json")) as handle:
            assert json.load(handle)["status"] == "completed"
        with open(os.path.join(run_dir, "history.json")) as handle:
            rows = json.load(handle)["rounds"]
        assert all(row["clients-ok"] == 2 and row["clients-failed"] == 0 for row in rows[1:])
        during = flood_stats()
    finally:
        open(stop, "w").close()
        flood.wait(timeout=120)
    with open(stats_path) as handle:
        stats = json.load(handle)
    print(f"flood: {json.dumps(stats)}")
    assert during["held"] > 0 and stats["attempts"] >= SLOW_CONNECTIONS
    # the front cut every slow connection it took, each long before the rogue's second header line
    # (50 s) would have been due: the deadline is total, not per read
    assert stats["cut"] >= 32 and stats["longest"] < 50, stats
    # and its log stayed bounded: a token bucket (20 lines, then 1 line/s) per kind of line, plus summaries
    lines = front_lines(fed["srv_log"])[lines_before:]
    kinds = 8
    bound = kinds * (20 + stats["elapsed"] * 1.0) + kinds * (stats["elapsed"] / 10 + 2)
    print(f"front log lines during the flood: {len(lines)} in {stats['elapsed']:.0f} s (bound {bound:.0f})")
    assert len(lines) <= bound
    assert any("suppressed" in line for line in lines)
    assert "Traceback" not in open(fed["srv_log"], errors="replace").read()
    fed["run_done"] = True


def _send(fed, requests: list[bytes]) -> list[str]:
    path = os.path.join(fed["work"], f"requests-{len(requests)}.json")
    with open(path, "w") as handle:
        json.dump([raw.hex() for raw in requests], handle)
    sender = os.path.join(fed["work"], "sender.py")
    with open(sender, "w") as handle:
        handle.write(SENDER)
    done = fed["net"].run(fed["rogue"], [sys.executable, sender, f"{fed['certs']}/ca.crt", NAME, str(FLEET_PORT), path],
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    fed["refusable"] += len(requests)
    return json.loads(done.stdout)


def test_50_mib_bodies_are_refused_before_the_superlink_reads_them(fed):
    link = superlink_process(fed)
    read_before, rss_before = link.io_counters().read_chars, link.memory_info().rss
    big = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\nContent-Length: 52428800\r\n\r\n"
    replies = _send(fed, [big] * 4)
    assert all(reply.startswith("HTTP/1.1 413") for reply in replies), replies
    read_after, rss_after = link.io_counters().read_chars, link.memory_info().rss
    print(f"SuperLink read {read_after - read_before} bytes and grew {(rss_after - rss_before) / 2**20:.1f} MiB "
          "while 4 x 50 MiB were refused")  # fmt: skip
    assert read_after - read_before < 8 * 2**20  # polls and heartbeats only; 200 MiB were on offer
    assert rss_after - rss_before < 32 * 2**20


def test_every_malformed_request_gets_a_4xx_and_is_logged_once_or_counted(fed):
    replies = _send(fed, TRICKS)
    assert all(re.match(r"HTTP/1\.1 4\d\d", reply) for reply in replies), list(zip(TRICKS, replies))

    def accounted():
        logged, suppressed = 0, 0
        for line in front_lines(fed["srv_log"]):
            if f"from {ROGUE_IP}" in line and "refused " in line and "refused a connection" not in line:
                if "plaintext" not in line:
                    logged += 1
            found = re.search(r"suppressed (\d+) similar lines: (malformed|refused|too-large)\)", line)
            if found:
                suppressed += int(found.group(1))
        return (logged + suppressed) if logged + suppressed >= fed["refusable"] else None

    # every refusal is one line, or one count in a "suppressed N similar lines" summary (flushed within 10 s)
    assert wait_for(accounted, 60, "every refused request logged or counted") == fed["refusable"]


def test_a_stolen_key_is_seen_coming_back_from_a_new_address(fed):
    net = fed["net"]
    proc, out = fed["nodes"][(1, "")]
    net.stop(proc)  # the real party p1 goes offline ...

    def p1_offline():
        listed = online_nodes(net, fed["srv"], fed["home"]) or []
        return sum(n["status"] == "online" for n in listed) == 1

    wait_for(p1_offline, 180, "p1 to be offline", interval=1.0)
    thief = start_node(fed, 1, ns=fed["rogue"], tag="-thief")  # ... and the rogue, with a copy of p1.key, steps in
    wait_for(lambda: two_online(fed), 180, "the thief online as p1", interval=1.0)
    log = open(fed["srv_log"]).read()
    moved = [line for line in log.splitlines() if "came back from a new address" in line]
    assert any(f"(p1, node " in line and f"new address {ROGUE_IP}" in line and f"{SUBNET}.11" in line for line in moved), moved
    records = [json.loads(line) for line in open(os.path.join(fed["work"], "srv", "node-addresses.jsonl"))]
    assert [r["address"] for r in records if r["name"] == "p1"] == [f"{SUBNET}.11", ROGUE_IP]
    # the real party comes back: refused, and told why it may be
    real = start_node(fed, 1, tag="-again")
    real.wait(timeout=300)
    text = open(fed["nodes"][(1, "-again")][1]).read()
    assert real.returncode == 1, text
    assert "another process holds this identity" in text and "fedlinear certs --out DIR --rotate NAME" in text, text
    assert thief.poll() is None
    # and the server saw both sides: the real party refused while the copy holds the node
    log = open(fed["srv_log"]).read()
    assert any("(p1, node " in line and f"was refused activation from {SUBNET}.11" in line
               and f"last accepted from {ROGUE_IP}" in line for line in log.splitlines()), log[-3000:]  # fmt: skip
    records = [json.loads(line) for line in open(os.path.join(fed["work"], "srv", "node-addresses.jsonl"))]
    print("node-addresses.jsonl:", *records, sep="\n")
    assert ("refused-activation", f"{SUBNET}.11") in [(r["event"], r["address"]) for r in records if r["name"] == "p1"]
