"""Scaling a simulation past one machine with Flower's own path: a Ray cluster.

Two Ray nodes are started on loopback (``ray start --head`` and ``ray start --address``), one CPU
each; ``fedlinear run --mode simulation --ray-address`` runs its virtual clients on that cluster.
With one CPU per client, Ray must place the two ClientApp actors on different nodes.
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
from collections import Counter

import numpy as np
import psutil
import pytest

from fedlinear.scripts.local.flower import free_port
from tests import bounded
from tests.conftest import run_cli

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def start_node(args, log):
    return subprocess.Popen(
        [RAY, "start", *args, "--num-cpus", "1", "--disable-usage-stats", "--block"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def stop(procs):
    victims = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(proc.pid)
            victims += parent.children(recursive=True) + [parent]
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(victims, timeout=15)
    for victim in alive:
        with contextlib.suppress(psutil.Error):
            victim.kill()


def cluster_state(address):
    """(number of alive nodes, Counter of node ids that hosted a ClientAppActor), from Ray's GCS."""
    code = (
        "import json, ray, ray._private.state as st\n"
        f"ray.init(address='{address}', logging_level='ERROR')\n"
        "nodes = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
        "hosts = [a['Address']['NodeID'] for a in st.actors().values()\n"
        "         if a['ActorClassName'] == 'ClientAppActor' and a['State'] == 'DEAD']\n"
        "print(json.dumps([nodes, hosts]))\n"
    )
    out = bounded.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    nodes, hosts = json.loads(out.stdout.strip().splitlines()[-1])
    return len(nodes), Counter(hosts)


@pytest.fixture
def ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    ray_tmp = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with open(tmp_path / "ray.log", "wb") as log:
        try:
            # a private temp dir: the head writes its address there, not to /tmp/ray where a plain
            # ray.init() elsewhere on the machine would find it after this test
            head = ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard=false",
                    "--temp-dir", ray_tmp]  # fmt: skip
            procs.append(start_node(head, log))
            budget = bounded.Budget(120)
            started_worker = False
            while True:
                assert not budget.spent(), (tmp_path / "ray.log").read_text()
                assert all(p.poll() is None for p in procs), (tmp_path / "ray.log").read_text()
                with contextlib.suppress(subprocess.SubprocessError):
                    alive, _ = cluster_state(address)
                    if alive == 2:
                        break
                    if alive == 1 and not started_worker:
                        procs.append(start_node(["--address", address], log))
                        started_worker = True
                time.sleep(1)
            yield address
        finally:
            stop(procs)
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_simulation_spreads_over_a_two_node_ray_cluster(ray_cluster, federation_dir, tmp_path):
    args = ["run", "--data", federation_dir, "--clients", 2, "--rounds", 2, "--mode", "simulation", "--set", "seed=3"]
    # the reference run on a private local Ray (RAY_ADDRESS=local, its own temp dir) is independent of the
    # cluster: the two run side by side, each bounded by its own wait
    runs = bounded.concurrently({
        "cluster": lambda: run_cli(*args, "--out", tmp_path / "cluster", "--ray-address", ray_cluster),
        "local": lambda: run_cli(*args, "--out", tmp_path / "local"),
    })  # fmt: skip
    done, local = runs["cluster"], runs["local"]
    assert done.returncode == 0, done.stdout + done.stderr
    nodes, hosts = cluster_state(ray_cluster)
    assert nodes == 2 and len(hosts) == 2, hosts  # one ClientApp actor on each node
    assert local.returncode == 0, local.stdout + local.stderr

    def weights(run):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        return np.array(manifest["weights"]["kernel"] + [manifest["weights"]["bias"]])

    np.testing.assert_array_equal(weights("cluster"), weights("local"))
