"""DP-FedOLS and ``dp-max-epsilon``: its one release (three Gaussian releases) is checked against the budget
before any party is asked for its sums; over budget the run is refused with one line, nothing released."""

from __future__ import annotations

import dataclasses

import dp_accounting
import pytest

from fedlinear.common import dpols as common_dpols
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.cli.preflight import refuse_over_budget
from fedlinear.server import dpols
from tests.inprocess import run_in_process, write_synthetic_shards

DP = {"strategy": "fedols", "dp": "central-client-clip", "reference": "auto"}


def direct_epsilon(noise_multiplier: float, delta: float) -> float:
    """dp-accounting used directly: RDP of DP-FedOLS's three Gaussian releases composed."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for z in common_dpols.share_multipliers(noise_multiplier):
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


def test_the_budget_epsilon_is_the_three_releases_on_dp_accounting():
    cfg = RunConfig.from_run_config({**DP, "dp-noise-multiplier": 2.0})
    assert dpols.budget_epsilon(cfg) == pytest.approx(direct_epsilon(2.0, 1e-5), rel=1e-9)
    assert dpols.budget_epsilon(cfg, 7) == pytest.approx(dpols.budget_epsilon(cfg), rel=1e-12)  # no amplification
    target = dataclasses.replace(cfg, dp_target_epsilon=1.5)
    assert dpols.budget_epsilon(target) == pytest.approx(1.5, rel=1e-6)


def test_a_dpols_run_over_budget_is_refused_naming_the_key():
    cfg = RunConfig.from_run_config({**DP, "dp-noise-multiplier": 2.0})
    spent = direct_epsilon(2.0, 1e-5)
    with pytest.raises(FedLinearError, match=r"'dp-max-epsilon' = .* is below the ε = .* DP-FedOLS") as info:
        refuse_over_budget(dataclasses.replace(cfg, dp_max_epsilon=spent * 0.99))
    assert "\n" not in str(info.value)
    refuse_over_budget(dataclasses.replace(cfg, dp_max_epsilon=spent * 1.01))  # within: accepted
    refuse_over_budget(cfg)  # no budget
    with pytest.raises(FedLinearError, match=r"'dp-target-epsilon' = 3"):
        refuse_over_budget(dataclasses.replace(cfg, dp_max_epsilon=2.0, dp_target_epsilon=3.0))
    refuse_over_budget(dataclasses.replace(cfg, dp_max_epsilon=3.0, dp_target_epsilon=3.0))
    # an iterative strategy stops at the budget round by round instead (server/privacy.py rule 7)
    refuse_over_budget(RunConfig(dp="central-server-clip", dp_max_epsilon=0.1))


def test_the_server_refuses_before_any_party_sends_its_sums(tmp_path):
    uris, test = write_synthetic_shards(tmp_path / "data", 3, 200, 4, 5, 300)
    grids = []
    settings = {**DP, "test-uri": test, "dp-noise-multiplier": 2.0, "dp-max-epsilon": 1.0,
                "dp-feature-bound": 5.0, "dp-target-bound": 5.0}
    assert direct_epsilon(2.0, 1e-5) > 1.0
    status, manifest = run_in_process(uris, str(tmp_path / "r"), grids=grids, **settings)
    assert status["status"] == "failed" and "'dp-max-epsilon' = 1 is below" in status["message"], status
    assert manifest is None
    stages = [m.content.config_records["config"].get("stage") for m in grids[0].sent if "config" in m.content.config_records]
    assert "dpols-gram" not in stages  # no party was asked for its clipped sums
    status, manifest = run_in_process(uris, str(tmp_path / "ok"), **{**settings, "dp-max-epsilon": 10.0})
    assert status["status"] == "completed", status
    assert manifest["privacy"]["epsilon"] == pytest.approx(direct_epsilon(2.0, 1e-5), rel=1e-6)
    assert manifest["privacy"]["epsilon"] <= 10.0


def test_fedlinear_run_refuses_it_before_writing_anything(tmp_path, capsys):
    from fedlinear.scripts.cli import main

    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--set", "strategy=fedols", "--set", "dp=central-client-clip",
            "--set", "dp-noise-multiplier=2.0", "--set", "dp-max-epsilon=1.0"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlinear: error: config key 'dp-max-epsilon' = 1 is below the ε") and "\n" not in err, err
    assert not out.exists()  # nothing synthesised, nothing written
