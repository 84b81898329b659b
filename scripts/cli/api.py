"""The Python API: ``fedlinear.run(...)`` (and ``fedlinear.sweep(...)``), for notebooks and scripts.

One definition of the options: a call is turned into the argument list of ``fedlinear run`` (or
``fedlinear sweep``) and parsed by that command's own parser, then run by the command itself. So
every option of the command line is a keyword argument here (``--stop-at-target`` is
``stop_at_target=True``, ``--set`` is ``set={...}``), every run config key too (``learning_rate=0.1``
is ``--set learning-rate=0.1``), with the same defaults, checks and one-line errors
(:class:`~fedlinear.common.errors.FedLinearError`). Differences from the command line: ``mode``
defaults to ``inline`` and ``out`` to a new temporary directory.

What comes back is plain Python and NumPy (:class:`RunResult`): the history, the per-round metrics
(a pandas DataFrame when pandas is installed, else a list of dicts), the manifest and the final
weights, read from the run directory the run wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from fedlinear.common.errors import FedLinearError

Progress = bool | Callable[[str], None]


def _parser(command: str) -> argparse.ArgumentParser:
    from fedlinear.scripts.cli import run as run_cmd
    from fedlinear.scripts.cli import sweep as sweep_cmd

    root = argparse.ArgumentParser(prog="fedlinear")
    sub = root.add_subparsers()
    (run_cmd if command == "run" else sweep_cmd).add_parser(sub)
    return sub.choices[command]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The command's options by keyword name (argparse's ``dest``), suppressed ones left out."""
    return {
        action.dest: action
        for action in parser._actions  # noqa: SLF001 - argparse has no public list of a parser's actions
        if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS
    }


def option_names(command: str = "run") -> list[str]:
    """Every keyword ``fedlinear.run`` (``command="sweep"``: ``fedlinear.sweep``) accepts: the
    command's options, then the run config keys (snake_case)."""
    from fedlinear.common.config import RunConfig

    names = list(_options(_parser(command)))
    return names + [k.replace("-", "_") for k in RunConfig.keys() if k.replace("-", "_") not in names]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(map(_value, value))
    return str(value)


def to_argv(command: str, options: Mapping[str, Any]) -> list[str]:
    """The ``fedlinear COMMAND`` arguments for keyword ``options`` (None: leave at the default)."""
    from fedlinear.common.config import RunConfig

    actions = _options(_parser(command))
    config_keys = {k.replace("-", "_"): k for k in RunConfig.keys()}
    argv: list[str] = []
    sets: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        action = actions.get(name)
        if name == "set":
            items = value.items() if isinstance(value, Mapping) else (str(v).split("=", 1) for v in value)
            sets += [f"{key}={_value(v)}" for key, v in items]
        elif action is not None:
            flag = action.option_strings[-1]
            if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
                argv += [flag] if value else []
            elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
                for item in [value] if isinstance(value, str | os.PathLike) else value:
                    argv += [flag, _value(os.fspath(item) if isinstance(item, os.PathLike) else item)]
            else:
                argv += [flag, _value(os.fspath(value) if isinstance(value, os.PathLike) else value)]
        elif name in config_keys:
            sets.append(f"{config_keys[name]}={_value(value)}")
        else:
            raise FedLinearError(
                f"fedlinear.{command}() got an unknown option '{name}': it takes the options of "
                f"'fedlinear {command}' and the run config keys (fedlinear.option_names('{command}'))"
            )
    for item in sets:
        argv += ["--set", item]
    return argv


class _Lines(io.TextIOBase):
    """A text stream that hands each complete line to ``sink``."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink, self.buffer = sink, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.sink(line)
        return len(text)


@contextlib.contextmanager
def _output(progress: Progress):
    """The command's printed output: as it is (True), nowhere (False), or line by line to a callable."""
    if progress is True:
        yield
        return
    sink = progress if callable(progress) else (lambda line: None)
    stream = _Lines(sink)
    with contextlib.redirect_stdout(stream):
        yield
    if stream.buffer:
        sink(stream.buffer)


@dataclasses.dataclass
class RunResult:
    """What ``fedlinear.run`` returns (everything read back from ``run_dir``).

    Attributes
    ----------
    run_dir : str
        The run directory (history.json, metrics.csv, checkpoints/, model/, manifest.json).
    history : dict
        ``history.json``: one row per round in ``history["rounds"]``, the reference, failures.
    metrics : pandas.DataFrame or list of dict
        The rounds of the history, one row each (a DataFrame when pandas is installed).
    manifest : dict
        ``manifest.json``: final weights in raw units, settings, versions, shards.
    kernel : numpy.ndarray
        Final weights in raw units, shape ``(d,)`` (float64, the manifest's ``weights``).
    bias : float
        Final intercept.
    """

    run_dir: str
    history: dict[str, Any]
    metrics: Any
    manifest: dict[str, Any]
    kernel: Any
    bias: float

    def predict(self, x):
        """``x @ kernel + bias`` for rows ``x`` (raw units)."""
        import numpy as np

        return np.asarray(x, dtype=np.float64) @ self.kernel + self.bias


def rows_table(rows: list[dict[str, Any]]):
    """A pandas DataFrame of ``rows`` when pandas is installed, else the rows themselves."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def run(out: str | os.PathLike | None = None, *, mode: str = "inline", progress: Progress = True, **options: Any) -> RunResult:
    """Run one federation, as ``fedlinear run`` does, and return its results (see the module docstring)."""
    import numpy as np

    from fedlinear.common.runstore import RunStore
    from fedlinear.scripts.cli.run import cmd_run

    out = os.fspath(out) if out is not None else tempfile.mkdtemp(prefix="fedlinear-run-")
    argv = ["--out", out, "--mode", mode, *to_argv("run", options)]
    args = _parse("run", argv)
    with _output(progress):
        cmd_run(args)
    store = RunStore(args.out)
    history, manifest = store.read_history(), store.read_manifest()
    weights = manifest["weights"]
    return RunResult(
        run_dir=args.out, history=history, metrics=rows_table([dict(r) for r in history["rounds"]]),
        manifest=manifest, kernel=np.asarray(weights["kernel"], dtype=np.float64), bias=float(weights["bias"]),
    )  # fmt: skip


def sweep(out: str | os.PathLike | None = None, *, mode: str = "inline", progress: Progress = True, **options: Any):
    """Run ``fedlinear sweep`` (noise multipliers x seeds) and return its table: a pandas DataFrame
    when pandas is installed, else a list of dicts (the rows of ``sweep.csv``)."""
    import csv

    from fedlinear.scripts.cli.sweep import cmd_sweep

    out = os.fspath(out) if out is not None else tempfile.mkdtemp(prefix="fedlinear-sweep-")
    args = _parse("sweep", ["--out", out, "--mode", mode, *to_argv("sweep", options)])
    with _output(progress):
        cmd_sweep(args)
    with open(os.path.join(args.out, "sweep.csv"), encoding="utf-8", newline="") as handle:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return rows_table(rows)


def _number(text: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    """Parse with the command's parser; its usage errors become one-line FedLinearErrors."""
    parser = _parser(command)

    def error(message: str):
        raise FedLinearError(f"fedlinear.{command}(): {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)
