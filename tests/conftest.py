"""Shared fixtures: small synthetic federations on disk and a helper to run the CLI as a user would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
from hypothesis import settings as hypothesis_settings

from fedlinear.common.csvio import to_csv_bytes
from fedlinear.common.synth import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In CI (CI=true) the property tests draw the same examples every run, so a green run means the same
# thing twice; elsewhere they keep exploring. Failures found either way are kept as @example cases.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

E2E = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e")

# The tests send traffic only to loopback or to hosts in namespaces they made: the stock Flower commands
# they run themselves (flwr run, flwr supernode register, ...) get no telemetry either, as fedlinear's
# launcher gives its own Flower processes none (scripts/local/flower.py, flower_env).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


# The suite runs on pytest-xdist workers (``-n auto --dist loadfile`` in pyproject's addopts; how many:
# pytest_xdist_auto_num_workers below; ``-n 0`` runs it in this process, ``-n 3`` on three). A test file runs in one worker, in order, so its module-scoped fixtures (one
# federation, many assertions) are built once. Files that must not overlap each other run in one worker
# too, one after the other: they share a group here, with the reason.
SHARED_GROUPS = {
    # root network namespaces with the same addresses (10.231.0.0/24 on a bridge in the host namespace)
    "tests/e2e/test_netns.py": "netns",
    "tests/e2e/test_netns_front.py": "netns",
}


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: two workers (the e2e layer mostly waits on real processes, so two files overlap well on
    2 cores; tests/bounded.py stretches every wait with the load they make), ``FEDLINEAR_TEST_WORKERS`` if
    set; none (this process) under ``-s`` or ``--pdb``, whose output and prompt a worker cannot show, or
    on one core."""
    if config.getoption("capture") == "no" or config.getoption("usepdb"):
        return 0
    if os.environ.get("FEDLINEAR_TEST_WORKERS"):
        return int(os.environ["FEDLINEAR_TEST_WORKERS"])
    return 2 if (os.cpu_count() or 1) >= 2 else 0


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the files of one SHARED_GROUPS group as one unit of work. (Not
    ``--dist loadgroup`` with ``xdist_group`` marks: pytest-xdist 3.8.0 puts the group into
    ``item._nodeid``, which pytest 9 no longer reads, so those marks are silently ignored.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_GROUPS.get(path, path)

    return FileGroupScheduling(config, log)


# The longest files start first (longest-processing-time-first), so that the two workers finish together
# instead of one idling while the other runs a long file handed out last (seen: ~10 min of one idle worker
# when the long integration files came last in collection order). Wall seconds per file measured with two
# workers under load (only the order matters); files not listed keep their collection order after these.
FILE_COST = {
    "tests/e2e/test_federation.py": 678, "tests/integration/test_inline.py": 556, "tests/e2e/test_bench.py": 480,
    "tests/e2e/test_netns.py": 296 + 141, "tests/e2e/test_netns_front.py": 296 + 141,
    "tests/e2e/test_crash.py": 342, "tests/e2e/test_serve.py": 325, "tests/e2e/test_export_template.py": 299,
    "tests/e2e/test_disk_full.py": 276, "tests/integration/test_secure.py": 274,
    "tests/integration/test_faults.py": 269, "tests/e2e/test_packaging.py": 266, "tests/e2e/test_isolation.py": 169,
    "tests/e2e/test_refusal.py": 153, "tests/e2e/test_stall.py": 148, "tests/e2e/test_exporter.py": 147,
    "tests/e2e/test_ray_cluster.py": 142, "tests/e2e/test_s3_e2e.py": 114, "tests/e2e/test_inline.py": 97,
    "tests/e2e/test_soak.py": 94, "tests/integration/test_fedols.py": 72, "tests/integration/test_sweep_forked.py": 71,
    "tests/e2e/test_serve_bench.py": 63, "tests/e2e/test_sweep_forked.py": 54,
}


def pytest_collection_modifyitems(items):
    """Everything under tests/e2e/ (real processes: SuperLink, SuperNodes, flwr run, fresh venvs) is marked
    ``e2e``; so is any test elsewhere that says so itself. ``pytest -m "not e2e"`` leaves them out. Files
    are ordered by :data:`FILE_COST`, longest first (a stable sort: a file's tests stay together and in order)."""
    for item in items:
        if str(item.path).startswith(E2E + os.sep):
            item.add_marker(pytest.mark.e2e)
    first = {}
    for index, item in enumerate(items):
        first.setdefault(_relpath(item), index)
    items.sort(key=lambda item: (-FILE_COST.get(_relpath(item), 0), first[_relpath(item)]))


def _relpath(item) -> str:
    return os.path.relpath(str(item.path), REPO).replace(os.sep, "/")


def write_federation(path, clients=3, samples=300, features=5, noise=0.1, seed=7):
    shards, test, truth = make_synthetic(clients, samples, features, noise, seed, test_samples=500)
    os.makedirs(path, exist_ok=True)
    for i, shard in enumerate(shards):
        with open(os.path.join(path, f"client-{i}.csv"), "wb") as handle:
            handle.write(to_csv_bytes(shard.x, shard.y))
    with open(os.path.join(path, "test.csv"), "wb") as handle:
        handle.write(to_csv_bytes(test.x, test.y))
    return shards, test, truth


@pytest.fixture(scope="session")
def federation_dir(tmp_path_factory):
    """3 clients x 300 samples, d=5, plus test.csv."""
    path = tmp_path_factory.mktemp("federation")
    write_federation(str(path))
    return str(path)


@pytest.fixture(scope="session")
def config_reference():
    """The MkDocs hook that generates docs/reference/configuration.md from RunConfig, as a module."""
    import importlib.util

    path = os.path.join(REPO, "docs", "hooks", "config_reference.py")
    spec = importlib.util.spec_from_file_location("fedlinear_docs_config_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args, timeout=1200, env=None):
    """Run ``fedlinear ARGS`` in a fresh process; return the CompletedProcess (text).

    ``timeout`` bounds it on a quiet machine; on a busy one the bound grows with the load
    (:mod:`tests.bounded`), and a run past it fails the test with its output."""
    from tests import bounded

    full_env = dict(os.environ)
    full_env.update(env or {})
    return bounded.run(
        [sys.executable, "-m", "fedlinear.scripts.cli", *map(str, args)],
        timeout,
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 0):
    """Flower stamps every Message with the running task's identity, which its runtime sets; tests that
    build Messages outside a run set one, and put the previous one back after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def flower_task():
    """:func:`task_identity` for one test (``pytestmark = pytest.mark.usefixtures("flower_task")``)."""
    with task_identity():
        yield
