"""Shared fixtures: small synthetic federations on disk and a helper to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.data import make_synthetic, to_csv_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run_cli(*args, timeout=1200, env=None):
    """Run ``fedlinear ARGS`` in a fresh process; return the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
