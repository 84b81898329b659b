"""``fedlinear report RUN_DIR`` and ``fedlinear compare RUN_DIR...``: HTML a person can open.

Each writes one self-contained HTML file (the plots inlined as ``data:`` PNGs, CSS inline, no script,
nothing fetched: it opens from disk) and the same plots as PNG files beside it. It draws whatever the
run directory holds, so a run that failed or stopped early gets a report too; run directories and
outputs may be local or ``s3://`` (read and written through :mod:`common.storage`). Everything taken
from the run (config values, failure reasons sent by parties, file contents) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from fedlinear.common import storage
from fedlinear.common import target as targets
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import trained_rounds, wall_time_text

DATA_SUMMARIES = ("truth.json", "split.json")  # a data directory's descriptions, rendered generically
PATH_KEYS = ("run-dir", "data-uri", "test-uri", "statistics-uri")  # differ between runs without meaning anything
OK, FAILED, NOT_SAMPLED, UNKNOWN = 0, 1, 2, 3
CELL = {OK: ("ok", "#2e9e4f"), FAILED: ("failed", "#d62728"), NOT_SAMPLED: ("not sampled", "#d9d9d9"),
        UNKNOWN: ("unknown", "#ffffff")}  # fmt: skip
COMPARE_PLOTS = (  # (file, metric, title, y label)
    ("ratio", "test-mse-ratio", "Test MSE / least-squares test MSE", "ratio (1 = the optimum)"),
    ("excess", "excess-test-mse", "Excess test MSE over the least-squares optimum", "excess test MSE"),
    ("train-loss", "train-loss", "Train loss (mean of the clients' local losses)", "train loss"),
    ("epsilon", "epsilon", "Privacy spent: ε per round", "ε"),
)
FINAL_COLUMNS = (
    ("test-mse", "test MSE"),
    ("test-mse-ratio", "MSE / LS"),
    ("excess-test-mse", "excess test MSE"),
    ("train-loss", "train loss"),
    ("weight-distance", "|w - w*|"),
    ("epsilon", "ε"),
)


# ----------------------------------------------------------------------------------------------
# reading a run
# ----------------------------------------------------------------------------------------------


def _abs(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(uri)


def _read_json(uri: str) -> Any | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FedLinearError(f"{uri}: not valid JSON ({exc})") from None


@dataclass
class Run:
    uri: str
    name: str
    status: dict | None = None
    history: dict | None = None
    manifest: dict | None = None
    data: dict[str, Any] = field(default_factory=dict)  # data-directory summaries by URI

    @property
    def rows(self) -> list[dict]:
        rows = (self.history or {}).get("rounds") or []
        return [r for r in rows if isinstance(r, dict) and isinstance(r.get("round"), int)]

    @property
    def config(self) -> dict:
        return (self.manifest or {}).get("config") or {}

    @property
    def state(self) -> str:
        return str((self.status or {}).get("status") or ("completed" if self.manifest else "unknown"))

    def final(self) -> dict:
        if self.manifest and isinstance(self.manifest.get("final"), dict):
            return self.manifest["final"]
        last = self.rows[-1] if self.rows else {}
        return {k: v for k, v in last.items() if k not in ("failures", "sampled")}

    def reference(self) -> dict:
        return (self.history or {}).get("reference") or (self.manifest or {}).get("reference") or {}


def data_dirs(run: Run) -> list[str]:
    """Where the run's data may be described: RUN_DIR/data (fedlinear run synthesises there) and the
    directories of the configured test set and shard template."""
    dirs = [storage.join(run.uri, "data")]
    shards = [s.get("data-uri") for s in (run.manifest or {}).get("shards") or [] if isinstance(s, dict)]
    for value in [run.config.get("test-uri"), run.config.get("data-uri"), *shards]:
        if isinstance(value, str) and value and "withheld" not in value:
            dirs.append(_parent(value if "{" not in value else value.split("{", 1)[0] + "x"))
    return list(dict.fromkeys(d for d in dirs if d))


def load_run(uri: str) -> Run:
    uri = _abs(uri)
    run = Run(uri=uri, name=uri.rstrip("/").rsplit("/", 1)[-1] or uri)
    run.status = _read_json(storage.join(uri, "status.json"))
    run.history = _read_json(storage.join(uri, "history.json"))
    run.manifest = _read_json(storage.join(uri, "manifest.json"))
    if run.status is None and run.history is None and run.manifest is None:
        raise FedLinearError(f"{uri}: not a fedlinear run directory (no status.json, history.json or manifest.json)")
    for directory in data_dirs(run):
        for name in DATA_SUMMARIES:
            try:
                found = _read_json(storage.join(directory, name))
            except FedLinearError:
                found = None  # a summary we cannot read is left out, not a reason to fail the report
            if found is not None:
                run.data[storage.join(directory, name)] = found
    return run


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows where ``key`` is a finite number."""
    pairs = [(r["round"], _num(r.get(key))) for r in rows]
    pairs = [(x, y) for x, y in pairs if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def parties(run: Run) -> list[dict]:
    """The parties of the run, by node id: ``history["parties"]`` or, for older runs, every node seen."""
    listed = (run.history or {}).get("parties")
    if isinstance(listed, list) and listed:
        return [p for p in listed if isinstance(p, dict) and "node-id" in p]
    seen: dict[Any, dict] = {}
    for row in run.rows:
        for nid in row.get("sampled") or []:
            seen.setdefault(nid, {"node-id": nid})
        for failure in row.get("failures") or []:
            if isinstance(failure, dict) and "node-id" in failure:
                seen.setdefault(failure["node-id"], {"node-id": failure["node-id"], "client-key": failure.get("client-key")})
    return sorted(seen.values(), key=lambda p: str(p["node-id"]))


def party_label(party: dict) -> str:
    if party.get("partition-id") is not None:
        return f"party {party['partition-id']}"
    if party.get("client-key") is not None:
        return f"client-key {party['client-key']}"
    return f"node {party['node-id']}"


def participation(run: Run) -> tuple[list[dict], list[int], list[list[int]]]:
    """(parties, rounds, grid[party][round]) with OK / FAILED / NOT_SAMPLED / UNKNOWN cells."""
    people = parties(run)
    rows = [r for r in run.rows if r["round"] >= 1]
    grid = []
    for party in people:
        nid, cells = party["node-id"], []
        for row in rows:
            failed = {f.get("node-id") for f in row.get("failures") or [] if isinstance(f, dict)}
            if nid in failed:
                cells.append(FAILED)
            elif isinstance(row.get("sampled"), list):
                cells.append(OK if nid in row["sampled"] else NOT_SAMPLED)
            elif (row.get("clients-ok") or 0) + (row.get("clients-failed") or 0) == len(people):
                cells.append(OK)  # no "sampled": every party was asked (the server records it only otherwise)
            else:
                cells.append(UNKNOWN)
        grid.append(cells)
    return people, [r["round"] for r in rows], grid


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _log_scale(ax, values: list[float]) -> None:
    """Log y when every value is positive; symmetric log (linear around 0) when some are not, as an
    excess test MSE can be (a model may beat the least-squares fit on the test set)."""
    if values and min(values) > 0:
        ax.set_yscale("log")
    elif any(v != 0 for v in values):
        smallest = min(abs(v) for v in values if v != 0)
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(smallest)))


def line_plot(title: str, ylabel: str, lines: list[tuple[str, list, list]], hline: tuple[str, float] | None = None,
              log: bool = True, target: tuple[str, float] | None = None) -> bytes | None:  # fmt: skip
    """One figure of lines over rounds; None when there is nothing to draw. ``hline`` (dashed black) and
    ``target`` (dotted red) are horizontal reference lines."""
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, label=label)
    values = [y for _, _, ys in lines for y in ys]
    if hline is not None and hline[1] is not None:
        ax.axhline(hline[1], color="black", linestyle="--", linewidth=1, label=hline[0])
        values.append(hline[1])
    if target is not None:
        ax.axhline(target[1], color="#d62728", linestyle=":", linewidth=1.5, label=target[0])
        values.append(target[1])
    if log:
        _log_scale(ax, values)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if len(lines) > 2 or max(len(line[0]) for line in lines) > 40:  # long labels: under the plot
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.15))
    elif len(lines) > 1 or hline is not None or target is not None:
        ax.legend(fontsize=8)
    return _png(fig)


def participation_plot(people: list[dict], rounds: list[int], grid: list[list[int]]) -> bytes | None:
    if not people or not rounds:
        return None
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.3 * len(rounds)), min(12, 1.5 + 0.3 * len(people))))
    ax.imshow(grid, cmap=ListedColormap([CELL[k][1] for k in sorted(CELL)]), vmin=0, vmax=len(CELL) - 1,
              aspect="auto", interpolation="nearest")  # fmt: skip
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds], fontsize=7)
    if len(rounds) > 40:
        ax.xaxis.set_major_locator(plt.MaxNLocator(20, integer=True))
    ax.set_yticks(range(len(people)), [party_label(p) for p in people], fontsize=7)
    if len(people) > 40:
        ax.yaxis.set_major_locator(plt.MaxNLocator(20, integer=True))
    ax.set_xlabel("round")
    ax.set_title("Participation: party x round")
    used = sorted({c for cells in grid for c in cells})
    ax.legend(handles=[Patch(facecolor=CELL[k][1], edgecolor="grey", label=CELL[k][0]) for k in used],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # fmt: skip
    return _png(fig)


def shards_plot(people: list[dict]) -> bytes | None:
    sized = [p for p in people if _num(p.get("num-examples")) is not None]
    if not sized:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.35 * len(sized)), 3.5))
    ax.bar(range(len(sized)), [p["num-examples"] for p in sized], color="#1f77b4")
    ax.set_xticks(range(len(sized)), [party_label(p) for p in sized], rotation=90 if len(sized) > 8 else 0, fontsize=7)
    if len(sized) > 60:
        ax.xaxis.set_major_locator(plt.MaxNLocator(30, integer=True))
    ax.set_ylabel("samples")
    ax.set_title("Shard sizes")
    return _png(fig)


def run_plots(run: Run) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) of every plot this run has data for."""
    rows, ref = run.rows, run.reference()
    out = []

    def add(stem: str, caption: str, png: bytes | None) -> None:
        if png is not None:
            out.append((stem, caption, png))

    add("test-mse", "Test MSE of the global model after each round (round 0: the initial model), with the pooled "
        "least-squares optimum's test MSE, the best a linear model fit to the pooled training data can do.",
        line_plot("Test MSE", "MSE", [("test MSE", *series(rows, "test-mse"))],
                  ("least squares", _num(ref.get("test-mse")))))  # fmt: skip
    goal, ratios = target_of(run), series(rows, "test-mse-ratio")
    add("gap-ratio", "The gap to the optimum as a ratio: test MSE / least-squares test MSE (1 = the optimum)"
        + (f"; the dotted line is the run's target, {goal:g}." if goal else "."),
        line_plot("Test MSE / least-squares test MSE", "ratio", [("MSE / LS", *ratios)],
                  ("optimum (1)", 1.0) if ratios[0] else None,
                  target=(f"target {goal:g}", goal) if goal and ratios[0] else None))  # fmt: skip
    add("gap-excess", "The gap as an excess: MSE above the optimum's, on the test set and on the pooled training data.",
        line_plot("Excess MSE over the optimum (test set, pooled training data)", "excess MSE",
                  [("excess test MSE", *series(rows, "excess-test-mse")),
                   ("excess train MSE", *series(rows, "excess-train-mse"))]))  # fmt: skip
    add("train-loss", "Train loss: the mean of the clients' local training losses in each round.",
        line_plot("Train loss", "loss", [("train loss", *series(rows, "train-loss"))]))
    add("epsilon", "Privacy spent: ε after each round at the configured δ (the accountant's figure).",
        line_plot("ε per round", "ε", [("ε", *series(rows, "epsilon"))], log=False))
    people, rounds, grid = participation(run)
    add("participation", "Each party in each round: its update was aggregated (ok), its task failed (failed), or it "
        "was not asked (not sampled).", participation_plot(people, rounds, grid))  # fmt: skip
    add("shards", "Samples in each party's shard.", shards_plot(people or shard_parties(run)))
    return out


def target_of(run: Run) -> float | None:
    """The run's ``target-mse-ratio`` (history, else the manifest's config), or None when it had none."""
    for value in ((run.history or {}).get("target-mse-ratio"), run.config.get("target-mse-ratio")):
        if _num(value) is not None and value > 0:
            return float(value)
    return None


def target_summary(run: Run) -> list[str]:
    """The plain-words target lines of ``fedlinear run`` (common/target.py), for a run that had a target."""
    goal = target_of(run)
    if goal is None:
        return []
    history = {"rounds": run.rows, **{k: v for k, v in (run.history or {}).items() if k != "rounds"}}
    history["target-mse-ratio"] = goal
    if "reached-target-at" not in history:  # a run that has not finished: computed from its rows
        history["reached-target-at"] = targets.reached_at(run.rows, goal)
    rounds = run.config.get("num-server-rounds")
    return targets.summary_lines(history, rounds if isinstance(rounds, int) else None)


def shard_parties(run: Run) -> list[dict]:
    shards = (run.manifest or {}).get("shards") or []
    return [{"node-id": i, **s} for i, s in enumerate(shards) if isinstance(s, dict)]


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .status-completed { color: #2e7d32; }
.status-failed { color: #c62828; } .status-running, .status-unknown { color: #ef6c00; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def esc(value: Any) -> str:
    return html.escape(fmt(value) if not isinstance(value, str) else value, quote=True)


def table(headers: list[str], rows: list[list[Any]], max_rows: int = 500) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows[:max_rows]:
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if _num(c) is not None else f"<td>{cell(c)}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    more = f"<p>… and {len(rows) - max_rows} more rows</p>" if len(rows) > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def cell(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML (escaped): dicts as key/value tables, lists of dicts as tables."""
    if isinstance(value, dict):
        if not value:
            return ""
        if depth > 4:
            return esc(json.dumps(value)[:500])
        return table(["key", "value"], [[k, _Raw(cell(v, depth + 1))] for k, v in value.items()])
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys = list(dict.fromkeys(k for v in value for k in v))
            return table(keys, [[_Raw(cell(v.get(k), depth + 1)) for k in keys] for v in value], max_rows=200)
        shown = ", ".join(fmt(v) if not isinstance(v, dict | list) else json.dumps(v) for v in value[:20])
        return esc(f"[{shown}{', …' if len(value) > 20 else ''}] ({len(value)})" if len(value) > 20 else f"[{shown}]")
    if isinstance(value, _Raw):
        return value.html
    return esc(value)


class _Raw:
    """Already-escaped HTML inside a table cell."""

    def __init__(self, html_text: str) -> None:
        self.html = html_text


def figure(png: bytes, caption: str, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n<p><small>Written by <code>fedlinear report</code>; self-contained: no network, no script.</small></p>"
        + "\n</body></html>\n"
    )


def failures_rows(run: Run) -> list[list[Any]]:
    labels = {p["node-id"]: party_label(p) for p in parties(run)}
    out = []
    for failure in (run.history or {}).get("query-failures") or []:
        if isinstance(failure, dict):
            nid = failure.get("node-id")
            out.append(["before round 1 (shard query)", labels.get(nid, f"node {nid}"), nid, failure.get("reason")])
    for row in run.rows:
        for failure in row.get("failures") or []:
            if isinstance(failure, dict):
                nid = failure.get("node-id")
                out.append([row["round"], labels.get(nid, f"node {nid}"), nid, failure.get("reason")])
    return out


def report_html(run: Run, plots: list[tuple[str, str, bytes]]) -> str:
    status = run.status or {}
    body = [f"<h1>fedlinear run <code>{esc(run.name)}</code></h1>", f"<p>{esc(run.uri)}</p>"]
    state = run.state
    goal_lines = target_summary(run)
    message = status.get("message") if status.get("message") != "; ".join(goal_lines) else None  # said below
    body.append(f'<p>Status: <strong class="status-{esc(state)}">{esc(state)}</strong>'
                + (f" — {esc(message)}" if message else "") + "</p>")  # fmt: skip
    history = run.history or {}
    if isinstance(history.get("stopped"), dict) and not history.get("stopped-at-target"):  # that one: below
        body.append(f"<p>Stopped after round {esc(history['stopped'].get('round'))}: "
                    f"{esc(history['stopped'].get('reason'))}</p>")  # fmt: skip
    for line in goal_lines:
        body.append(f"<p>{esc(line[0].upper() + line[1:])}.</p>")
    if history.get("resumed-at"):
        body.append(f"<p>Resumed after round(s) {esc(', '.join(fmt(r) for r in history['resumed-at']))}.</p>")
    if not run.rows:
        body.append("<p>No rounds recorded (the run stopped before its first evaluation).</p>")

    body.append("<h2>Final metrics</h2>")
    final = run.final()
    body.append(cell(final) if final else "<p>none</p>")
    seconds = _num((run.manifest or {}).get("wall-time-s"))
    if seconds is not None:
        body.append(f"<p>Wall time {esc(wall_time_text(seconds))}.</p>")

    body.append("<h2>Reference: the pooled least-squares optimum</h2>")
    ref = run.reference()
    body.append(cell(ref) if ref else "<p>No reference (the run had no pooled statistics: no gap figures).</p>")

    privacy = (run.manifest or {}).get("privacy")
    eps = series(run.rows, "epsilon")[1]
    if privacy or eps or run.config.get("dp", "none") != "none":
        body.append("<h2>Privacy</h2>")
        if eps:
            body.append(f"<p>ε after the last recorded round: {esc(fmt(eps[-1]))}.</p>")
        body.append(cell(privacy) if privacy else "<p>No privacy summary (the run did not complete).</p>")

    body.append("<h2>Plots</h2>")
    for stem, caption, png in plots:
        body.append(figure(png, caption, stem))
    if not plots:
        body.append("<p>Nothing to plot yet.</p>")

    body.append("<h2>Failures</h2>")
    failures = failures_rows(run)
    body.append(table(["round", "party", "node id", "reason"], failures) if failures else "<p>No party failed.</p>")

    body.append("<h2>Parties and shards</h2>")
    shards = (run.manifest or {}).get("shards")
    people = parties(run)
    if people:
        body.append(cell(people))
    if shards:
        body.append(cell(shards))
    if not people and not shards:
        body.append("<p>No shard information recorded.</p>")
    for uri, summary in run.data.items():
        body.append(f"<h3>Data description <code>{esc(uri)}</code></h3>")
        body.append(cell(summary))

    body.append("<h2>Per round</h2>")
    cols = list(dict.fromkeys(k for r in run.rows for k in r if k not in ("failures", "sampled")))
    body.append("<details><summary>every recorded round</summary>"
                + table(cols, [[r.get(c) for c in cols] for r in run.rows], max_rows=10000) + "</details>")  # fmt: skip

    body.append("<h2>Config</h2>")
    body.append(cell(run.config) if run.config else "<p>No manifest (the run did not complete): config unknown.</p>")
    for key in ("learning-rate", "standardization"):
        value = history.get(key) or (run.manifest or {}).get(key)
        if value:
            body.append(f"<h3>{esc(key)}</h3>{cell(value)}")
    if run.manifest and run.manifest.get("versions"):
        body.append(f"<h3>versions</h3>{cell(run.manifest['versions'])}")
    return page(f"fedlinear report: {run.name}", body)


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------


def differing(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between the runs (paths left out), strategy first."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config if k not in PATH_KEYS))
    diff = [k for k in keys if len({json.dumps(r.config[k], sort_keys=True) for r in runs if k in r.config}) > 1]
    return sorted(diff, key=lambda k: (k != "strategy", k != "dp", k))


def unique_names(runs: list[Run]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [r.uri.rstrip("/")[-60:] for r in runs]


def legend_labels(runs: list[Run]) -> list[str]:
    keys = differing(runs)[:4]
    labels = []
    for name, run in zip(unique_names(runs), runs, strict=True):
        settings = ", ".join(f"{k}={fmt(run.config.get(k))}" for k in keys if k in run.config)
        strategy = run.config.get("strategy")
        if strategy is not None and "strategy" not in keys:
            settings = f"strategy={strategy}" + (f", {settings}" if settings else "")
        status = "" if run.state == "completed" else f" [{run.state}]"
        labels.append(f"{name}{status}" + (f" ({settings})" if settings else ""))
    return labels


def compare_plots(runs: list[Run], labels: list[str]) -> list[tuple[str, str, bytes]]:
    out = []
    for stem, key, title, ylabel in COMPARE_PLOTS:
        lines = [(label, *series(run.rows, key)) for label, run in zip(labels, runs, strict=True)]
        hline = ("optimum (1)", 1.0) if key == "test-mse-ratio" else None
        png = line_plot(title, ylabel, lines, hline if any(line[1] for line in lines) else None, log=key != "epsilon")
        if png is not None:
            out.append((stem, title, png))
    return out


def compare_html(runs: list[Run], labels: list[str], plots: list[tuple[str, str, bytes]]) -> str:
    body = [f"<h1>fedlinear: {len(runs)} runs compared</h1>"]
    keys = differing(runs)
    header = ["run", "status", "rounds"] + [label for _, label in FINAL_COLUMNS] + ["wall time s"]
    rows = []
    for label, run in zip(labels, runs, strict=True):
        final = run.final()
        rounds = trained_rounds(run.rows) if run.rows else None
        rows.append([label, run.state, rounds] + [final.get(k) for k, _ in FINAL_COLUMNS]
                    + [(run.manifest or {}).get("wall-time-s")])  # fmt: skip
    body.append("<h2>Final figures</h2>" + table(header, rows))
    if keys:
        body.append("<h2>Settings that differ</h2>")
        body.append(table(["run"] + keys, [[n] + [run.config.get(k) for k in keys]
                                           for n, run in zip(unique_names(runs), runs, strict=True)]))  # fmt: skip
    body.append("<h2>Runs</h2>" + table(["run", "directory"], [[n, r.uri] for n, r in zip(unique_names(runs), runs, strict=True)]))
    body.append("<h2>Plots</h2>")
    for stem, caption, png in plots:
        body.append(figure(png, caption, stem))
    return page("fedlinear compare", body)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def png_dir(out: str) -> str:
    """PNGs go beside the HTML, in a directory named after it: RUN_DIR/report.html -> RUN_DIR/report/."""
    base = out.rsplit("/", 1)[-1] if storage.is_s3(out) else os.path.basename(out)
    stem = base[: -len(".html")] if base.endswith(".html") else base + "-files"
    return storage.join(_parent(out), stem)


def write(out: str, text: str, plots: list[tuple[str, str, bytes]]) -> list[str]:
    if not storage.is_s3(out) and os.path.isdir(out):
        raise FedLinearError(f"--out {out}: is a directory, expected an HTML file name")
    directory = png_dir(out)
    written = []
    for stem, _, png in plots:
        uri = storage.join(directory, f"{stem}.png")
        storage.write_bytes(uri, png)
        written.append(uri)
    storage.write_text(out, text)
    return written
