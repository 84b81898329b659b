"""The run config: one typed parse, clear errors, defaults in sync with pyproject and the generated
configuration reference (docs/reference/configuration.md)."""

from __future__ import annotations

import dataclasses
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


def test_configuration_reference_covers_every_key_with_its_default(config_reference):
    """docs/reference/configuration.md is generated from RunConfig (docs/hooks/config_reference.py):
    one row per field, the default as pyproject.toml writes it, agreeing with the dataclass."""
    rows = config_reference.rows(REPO)
    declared = pyproject_config()
    assert [row["key"] for row in rows] == RunConfig.keys() == list(declared)
    defaults = RunConfig().as_dict()
    for row in rows:
        written = tomllib.loads(f"v = {row['default']}")["v"]
        assert written == declared[row["key"]] == defaults[row["key"]], row["key"]
        assert row["description"] and row["type"], row["key"]
    table = config_reference.render(REPO)
    for row in rows:
        assert f"`{row['key']}` | {row['type']} | `{row['default']}` |" in table


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda text: text.replace("\nseed = 42\n", "\nseed = 43\n"), "'seed': pyproject.toml says 43"),
        (lambda text: text.replace("\ntau = 0.1\n", "\n"), "lacks 'tau'"),
        (lambda text: text.replace("\ntau = 0.1\n", "\ntau = 0.1\ntau-2 = 1\n"), "'tau-2', which is not a RunConfig field"),
    ],
)
def test_configuration_reference_refuses_to_drift(config_reference, tmp_path, edit, message):
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as handle:
        text = handle.read()
    changed = edit(text)
    assert changed != text
    (tmp_path / "pyproject.toml").write_text(changed, encoding="utf-8")
    with pytest.raises(config_reference.ConfigReferenceError, match=re.escape(message)):
        config_reference.rows(str(tmp_path))


def test_configuration_reference_reads_the_docstring(config_reference):
    entries = config_reference.parse_attributes(RunConfig.__doc__)
    names = [name for entry in entries for name in entry.names]
    assert names == [field.replace("-", "_") for field in RunConfig.keys()]
    with pytest.raises(config_reference.ConfigReferenceError, match="cannot read the attribute line"):
        config_reference.parse_attributes("X.\n\nAttributes\n----------\nseed: int\n    No space before the colon.\n")


@dataclasses.dataclass(frozen=True)
class _TwoKeys:
    """A stand-in for RunConfig.

    Attributes
    ----------
    seed : int (default: 7)
        The seed (``seed``).
    rounds : int (default: 3)
        Rounds, without naming its key.
    """

    seed: int = 42
    rounds: int = 3


def test_configuration_reference_checks_the_docstring_against_the_dataclass(config_reference, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config]\nseed = 42\nrounds = 3\n", encoding="utf-8")
    monkeypatch.setattr(config_reference, "_run_config_class", lambda repo: _TwoKeys)
    with pytest.raises(config_reference.ConfigReferenceError) as raised:
        config_reference.rows(str(tmp_path))
    assert "'seed': the docstring says default 7, the dataclass 42" in str(raised.value)
    assert "'rounds': the docstring entry does not name the key as (``rounds``)" in str(raised.value)


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


DP_FEDOLS = {"strategy": "fedols", "dp": "central-client-clip"}


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"dp-target-epsilon": 2.0}, "'dp-target-epsilon' = 2 has no effect with 'dp' = none"),
        ({"dp-feature-bound": 3.0}, "'dp-feature-bound' = 3 is read only by DP-FedOLS"),
        ({"dp-target-bound": 1.5, "dp": "central-server-clip"}, "'dp-target-bound' = 1.5 is read only by DP-FedOLS"),
        ({"dp-feature-bound": 3.0, "strategy": "fedols"}, "'dp-feature-bound' = 3 is read only by DP-FedOLS"),
        ({"dp-target-bound": 2.0, "dp": "central-client-clip"}, "'dp-target-bound' = 2 is read only by DP-FedOLS"),
        ({**DP_FEDOLS, "dp-clipping": "adaptive"}, "'dp-clipping' = adaptive has no effect with 'strategy' = fedols and 'dp'"),
    ],
)
def test_dp_keys_nothing_reads_are_refused_naming_the_key(settings, message):
    with pytest.raises(FedLinearError, match=re.escape(message)) as info:
        RunConfig.from_run_config(settings)
    assert "\n" not in str(info.value) and "set '" in str(info.value)


def test_dp_keys_where_they_are_read_are_accepted():
    RunConfig.from_run_config({"dp": "central-server-clip", "dp-target-epsilon": 2.0})
    RunConfig.from_run_config({**DP_FEDOLS, "dp-target-epsilon": 2.0, "dp-feature-bound": 3.0, "dp-target-bound": 1.0})
    RunConfig.from_run_config({"dp": "central-server-clip", "dp-clipping": "adaptive"})
    RunConfig.from_run_config({"strategy": "fedols"})  # the defaults (0, fixed) are fine everywhere
