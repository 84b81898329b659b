"""A port the launcher picked and another process took before Flower's server bound it (real processes).

``free_port()`` returns a port that was free a moment ago; a run started beside another (two test
workers, two users' runs without network isolation) can lose it in between. The SuperLink must then be
started again on another port, never taken for healthy because someone else's server answers
``/health`` there; a SuperNode that lost its port is started again too.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading

import pytest

from fedlinear.scripts.local import flower, launch
from fedlinear.scripts.local.processes import ProcessGroup
from fedlinear.scripts.local.spec import LaunchSpec


class Health(http.server.BaseHTTPRequestHandler):
    """Another process's server on the port: it answers ``/health`` with 200, like a SuperLink."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def taken():
    """Two loopback ports already listened on: one by an HTTP server answering /health, one by a bare socket."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bare = socket.socket()
    bare.bind(("127.0.0.1", 0))
    bare.listen()
    yield server.server_address[1], bare.getsockname()[1]
    server.shutdown()
    server.server_close()
    bare.close()


def test_lost_port_is_read_from_uvicorns_line_for_that_port_only(tmp_path):
    log = tmp_path / "superlink.log"
    log.write_text("INFO starting\nERROR:    [Errno 98] error while attempting to bind on address "
                   "('127.0.0.1', 4242): address already in use\n")  # fmt: skip
    assert flower.lost_port(str(log), 4242)
    assert not flower.lost_port(str(log), 424)
    assert not flower.lost_port(str(tmp_path / "missing.log"), 4242)


def test_a_taken_port_is_picked_again_for_the_superlink_and_a_supernode(tmp_path, monkeypatch, taken):
    answering, bare = taken
    assert flower.listens(os.getpid(), answering) and flower.listens(os.getpid(), bare)  # held here, by this process
    # the SuperLink's first pick is taken (and answers /health), its second is free; then the SuperNode's
    # first pick is taken, its second free
    picks = iter([answering, 0, bare])
    real_free_port = flower.free_port
    monkeypatch.setattr(launch, "free_port", lambda: next(picks, 0) or real_free_port())
    spec = LaunchSpec(mode="processes", app_dir=str(tmp_path), workdir=str(tmp_path), num_nodes=1,
                      node_configs=[{"partition-id": 0}], run_config={}, startup_timeout=300)  # fmt: skip
    env = flower.flower_env(str(tmp_path / "flwr-home"))
    group = ProcessGroup()
    try:
        superlink, port = launch.start_superlink(spec, group, env, str(tmp_path / "superlink.log"), print)
        assert port not in (answering, bare) and flower.listens(superlink.pid, port)
        assert flower.lost_port(str(tmp_path / "superlink.log"), answering)  # its first start lost the port
        assert [name for name, _ in group.procs] == ["superlink", "superlink"]
        nodes = launch.Supernodes(spec, group, env, port)
        nodes.settle()
        proc, node_port, log_path = nodes.nodes[0]
        assert node_port not in (answering, bare, port) and nodes.attempts[0] == 2
        assert proc.poll() is None and flower.listens(proc.pid, node_port)
        assert flower.lost_port(log_path, bare)
    finally:
        group.stop()


def test_a_port_of_the_users_own_that_is_taken_fails_in_one_line(tmp_path, taken):
    answering, _ = taken
    spec = LaunchSpec(mode="processes", app_dir=str(tmp_path), workdir=str(tmp_path), num_nodes=1,
                      node_configs=[{}], run_config={}, superlink_port=answering, startup_timeout=300)  # fmt: skip
    group = ProcessGroup()
    try:
        with pytest.raises(flower.PortTaken, match=f"could not bind 127.0.0.1:{answering}: another process took it"):
            launch.start_superlink(spec, group, flower.flower_env(str(tmp_path / "h")), str(tmp_path / "s.log"), print)
        assert len(group.procs) == 1  # not started again on another port: the user chose this one
    finally:
        group.stop()
