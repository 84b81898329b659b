"""The Python API (``fedlinear.run``, scripts/cli/api.py): the worked example of docs/how-to/python-api.md
run as it stands, the same weights as the command line, options derived from the commands' parsers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fedlinear
from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.cli import api
from tests.conftest import REPO, run_cli

DOC = os.path.join(REPO, "docs", "how-to", "python-api.md")


def example_block() -> str:
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{DOC} has no python block"
    return blocks[0]


def test_the_docs_example_runs_and_gives_the_command_lines_weights(tmp_path):
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example_block(), DOC, "exec"), scope)  # noqa: S102 - the documentation's own example
    result = scope["result"]
    assert "x the least-squares optimum" in printed.getvalue()
    assert result.history["rounds"][-1]["round"] == 5
    assert result.manifest["weights"]["kernel"] == list(result.kernel)
    out = tmp_path / "cli"
    done = run_cli("run", "--mode", "inline", "--clients", 4, "--rounds", 5, "--set", "seed=3", "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "manifest.json") as handle:
        cli = json.load(handle)
    assert cli["weights"] == result.manifest["weights"]
    assert cli["standardized-weights"] == result.manifest["standardized-weights"]
    for r in range(1, 6):
        name = os.path.join("checkpoints", f"round-{r:04d}.npz")
        with open(out / name, "rb") as a, open(os.path.join(result.run_dir, name), "rb") as b:
            assert a.read() == b.read(), name


def test_every_option_of_the_command_is_a_keyword_and_every_config_key_too():
    names = fedlinear.option_names()
    for name in ("clients", "rounds", "data", "shard", "mode", "stop_at_target", "pool", "workers", "isolation"):
        assert name in names
    for name in ("learning_rate", "seed", "dp_noise_multiplier", "secure_aggregation"):
        assert name in names
    argv = api.to_argv("run", {"clients": 3, "stop_at_target": True, "shard": ["a.csv", "b.csv"],
                                "learning_rate": 0.5, "secure_aggregation": False, "set": {"seed": 4}})  # fmt: skip
    assert argv == ["--clients", "3", "--stop-at-target", "--shard", "a.csv", "--shard", "b.csv",
                    "--set", "learning-rate=0.5", "--set", "secure-aggregation=false", "--set", "seed=4"]  # fmt: skip


def test_bad_options_are_one_line_errors_from_the_command():
    with pytest.raises(FedLinearError, match=r"^fedlinear.run\(\) got an unknown option 'colour'"):
        fedlinear.run(colour="red")
    with pytest.raises(FedLinearError, match=r"^fedlinear.run\(\): argument --rounds: invalid int value: 'many'$"):
        fedlinear.run(rounds="many")
    with pytest.raises(FedLinearError, match="--rounds must be >= 1"):
        fedlinear.run(rounds=0, progress=False)


def test_metrics_are_a_dataframe_with_pandas_and_rows_without(tmp_path, monkeypatch):
    result = fedlinear.run(tmp_path / "run", clients=2, rounds=2, seed=1, progress=False)
    pandas = pytest.importorskip("pandas")
    assert isinstance(result.metrics, pandas.DataFrame)
    assert list(result.metrics["round"]) == [0, 1, 2]
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    rows = api.rows_table(result.history["rounds"])
    assert isinstance(rows, list) and rows[-1]["round"] == 2
    lines: list[str] = []
    again = fedlinear.run(tmp_path / "again", clients=2, rounds=2, seed=1, progress=lines.append)
    assert any(line.startswith("round   2 |") for line in lines) and any("wall time" in line for line in lines)
    np.testing.assert_array_equal(again.kernel, result.kernel)


def test_importing_fedlinear_imports_nothing_heavy():
    code = "import sys, fedlinear; print(sorted(m for m in ('flwr', 'numpy', 'tensorflow', 'pandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
