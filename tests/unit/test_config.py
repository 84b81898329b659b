"""The run config: one typed parse, clear errors, defaults in sync with pyproject and the README."""

from __future__ import annotations

import os
import re
import tomllib

import pytest

from fedlinear.common.config import RunConfig, parse_assignments
from fedlinear.common.errors import FedLinearError

from tests.conftest import REPO  # noqa: E402


def pyproject_config():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_dataclass_default():
    declared = pyproject_config()
    assert list(declared) == RunConfig.keys()
    assert RunConfig.from_run_config(declared) == RunConfig()


def test_readme_documents_every_key():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", readme, flags=re.MULTILINE))
    missing = [key for key in RunConfig.keys() if key not in documented]
    assert not missing, f"README config table lacks {missing}"


def test_unknown_key_is_named():
    with pytest.raises(FedLinearError, match="unknown config key 'num-rounds'"):
        RunConfig.from_run_config({"num-rounds": 3})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("batch-size", 0, "'batch-size' must be >= 1"),
        ("learning-rate", -1.0, "'learning-rate' must be in"),
        ("fraction-train", 0.0, "'fraction-train' must be in"),
        ("engine", "torch", "'engine' must be one of numpy, keras"),
        ("run-dir", "relative/dir", "'run-dir' must be an absolute path or an s3:// URI"),
        ("local-epochs", "two", "'local-epochs' must be a int"),
        ("local-epochs", 1.5, "'local-epochs' must be a int"),
        ("seed", True, "'seed' must be a int, got a boolean"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(FedLinearError, match=re.escape(message)):
        RunConfig.from_run_config({key: value})


def test_coercion_and_run_dir_default():
    cfg = RunConfig.from_run_config({"learning-rate": 1, "local-epochs": 2.0, "run-dir": "s3://b/runs/x/"})
    assert cfg.learning_rate == 1.0 and cfg.local_epochs == 2
    assert cfg.resolved_run_dir(5) == "s3://b/runs/x"
    assert RunConfig().resolved_run_dir(5) == os.path.join(os.path.expanduser("~"), "fedlinear-runs", "run-5")


def test_cli_assignments_are_typed():
    assert parse_assignments(["learning-rate=0.1", "engine=keras", "seed=3"]) == {
        "learning-rate": 0.1,
        "engine": "keras",
        "seed": 3,
    }
    with pytest.raises(FedLinearError, match="unknown config key 'lr'"):
        parse_assignments(["lr=0.1"])
    with pytest.raises(FedLinearError, match="key=value"):
        parse_assignments(["engine"])
