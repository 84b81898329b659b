"""Resuming a ``dp-target-epsilon`` run: the checkpoint records the derived noise multiplier, the CLI preflight
and the ServerApp derive it the same way before comparing, and another ``num-server-rounds`` is refused (the ε
fixes the noise for the rounds the run started with)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedlinear.common import model as lm
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.scripts.cli.preflight import refuse_other_checkpoint
from fedlinear.server import privacy
from fedlinear.server.resume import Checkpoints
from tests.inprocess import Crash, crash_after, run_in_process, write_synthetic_shards

SETTINGS = {"num-server-rounds": 4, "dp": "central-server-clip", "dp-target-epsilon": 3.0}


class _NoStrategies:
    def state_dict(self):
        return {}


def _checkpoint_of(run_dir, cfg: RunConfig, server_round: int = 2) -> RunStore:
    """A checkpoint as the ServerApp writes it: from the config with the noise derived (resolve_noise)."""
    store = RunStore(str(run_dir))
    resolved = privacy.resolve_noise(cfg)
    weights = lm.LinearWeights(kernel=np.zeros((3, 1), np.float32), bias=np.zeros(1, np.float32))
    from fedlinear.common import scaling

    Checkpoints(store, resolved, 3, {"shards": [], "test-set": []}, scaling.Transform.identity(3), 0.1).write(
        server_round, weights, None, _NoStrategies()
    )
    return store


def test_the_preflight_accepts_the_same_command_to_resume(tmp_path):
    cfg = RunConfig.from_run_config(SETTINGS)
    store = _checkpoint_of(tmp_path / "run", cfg)
    recorded = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert recorded["dp-noise-multiplier"] == privacy.resolve_noise(cfg).dp_noise_multiplier != cfg.dp_noise_multiplier
    refuse_other_checkpoint(store, cfg, 3)  # the raw config, as `fedlinear run` has it: accepted
    refuse_other_checkpoint(store, cfg, None)
    refuse_other_checkpoint(store, privacy.resolve_noise(cfg), 3)  # already resolved (the ServerApp): accepted


def test_the_preflight_refuses_other_rounds_naming_the_target_epsilon(tmp_path):
    cfg = RunConfig.from_run_config(SETTINGS)
    store = _checkpoint_of(tmp_path / "run", cfg)
    for rounds in (6, 3):
        with pytest.raises(FedLinearError, match=r"'dp-target-epsilon' = 3, which fixes the noise multiplier .* for the "
                                                 rf"4 rounds it started with, but 'num-server-rounds' is now {rounds}"):
            refuse_other_checkpoint(store, dataclasses.replace(cfg, num_server_rounds=rounds), 3)
    with pytest.raises(FedLinearError, match=r"dp-target-epsilon 3.0 -> 2.0"):  # another ε: named as a change
        refuse_other_checkpoint(store, dataclasses.replace(cfg, dp_target_epsilon=2.0), 3)


def test_a_checkpoint_from_before_the_key_resumes_as_no_target(tmp_path):
    cfg = RunConfig.from_run_config({"num-server-rounds": 4, "dp": "central-server-clip"})
    store = _checkpoint_of(tmp_path / "run", cfg)
    pointer = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    pointer.pop("dp-target-epsilon")
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    refuse_other_checkpoint(store, cfg, 3)
    with pytest.raises(FedLinearError, match=r"dp-target-epsilon 0.0 -> 3.0"):
        refuse_other_checkpoint(store, dataclasses.replace(cfg, dp_target_epsilon=3.0), 3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("te"), 3, 200, 4, 5, 300)


def _history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def test_an_interrupted_target_epsilon_run_resumes_bit_identical(shards, tmp_path):
    uris, test = shards
    settings = {**SETTINGS, "test-uri": test}
    status, whole = run_in_process(uris, str(tmp_path / "whole"), **settings)
    assert status["status"] == "completed", status

    with pytest.raises(Crash):  # the server dies as round 3's tasks go out
        run_in_process(uris, str(tmp_path / "resumed"), sabotage=crash_after(2 * len(uris)), **settings)
    store = RunStore(str(tmp_path / "resumed"))
    assert store.read_latest_checkpoint()[0]["round"] == 2
    cfg = RunConfig.from_run_config({"run-dir": str(tmp_path / "resumed"), **settings})
    refuse_other_checkpoint(store, cfg, None)  # what `fedlinear run` checks first, with the raw config
    with pytest.raises(FedLinearError, match=r"fixes the noise multiplier"):
        refuse_other_checkpoint(store, dataclasses.replace(cfg, num_server_rounds=6), None)
    # the ServerApp refuses more rounds too, with the same message (status failed, nothing overwritten)
    status, _ = run_in_process(uris, str(tmp_path / "resumed"), **{**settings, "num-server-rounds": 6})
    assert status["status"] == "failed" and "fixes the noise multiplier" in status["message"], status
    status, resumed = run_in_process(uris, str(tmp_path / "resumed"), **settings)
    assert status["status"] == "completed", status
    assert resumed["privacy"]["noise-multiplier"] == whole["privacy"]["noise-multiplier"] != 1.0
    assert resumed["privacy"]["epsilon"] == whole["privacy"]["epsilon"] == pytest.approx(3.0, rel=1e-6)
    assert [r["epsilon"] for r in _history(tmp_path / "resumed")["rounds"]] == [
        r["epsilon"] for r in _history(tmp_path / "whole")["rounds"]
    ]
    assert resumed["standardized-weights"] == whole["standardized-weights"]  # seeded noise: bit-identical
    assert resumed["weights"] == whole["weights"]
