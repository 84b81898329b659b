"""The outputs of ``fedlinear bench``: the tables, the targets judged (measured, reference, ratio, bound,
met / MISSED), CSV and JSON; the plots are :mod:`~fedlinear.scripts.experiments.bench.plots`."""

from __future__ import annotations

import csv
import datetime
import json
import os
from typing import Any

from fedlinear.scripts.experiments.bench.cases import ACCURACY_BAR, MODE_LABEL, TARGETS, GiB, Target
from fedlinear.scripts.experiments.bench.plots import plot_ratios, plot_scaling


def _f(value: Any, fmt: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, str):
        return value.rjust(width)
    return format(value, fmt).rjust(width)


MAIN_LEGEND = """\
  wall s: the whole 'fedlinear run' command; x floor / x qstart: wall / wall of the no-op floor / the
  quickstart-style app in the same mode; pre s: command start -> ServerApp main() running (launcher, SuperLink,
  flwr run, ServerApp process and imports); to r1 s: ServerApp start -> end of round 1 (node wait, fedlinear's
  shard query, Ray/actor warm-up, round 1); s/round: median of rounds 2..R; post s: after the last round
  (fedlinear: SavedModel export; shutdown, teardown); CPU s: CPU time of the process tree; other: CPU cores
  used by other processes on the machine during the run (noise); peak RSS / PSS GiB: the largest sum over
  the tree's live processes of their RSS / PSS (PSS divides a page shared by forked processes among them);
  bar: final test MSE <= 1.01 x least squares;
  = sim: inline's final weights bit-identical to simulation's (same size, seed, data);
  runs: good runs (good/attempts when some failed or were noisy; * = only noisy runs were available)"""


def _runs(row: dict[str, Any]) -> str:
    """Successful runs, or ok/attempts when some failed (their errors are in the JSON)."""
    failed = row.get("failed-runs") or 0
    text = f"{row['runs']}/{row['runs'] + failed}" if failed else str(row["runs"])
    return text + ("*" if row.get("noisy") else "")


def main_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("case", 20), ("mode", 9), ("N x R", 6), ("runs", 4), ("wall s", 7), ("x floor", 7), ("x qstart", 8),
        ("pre s", 5), ("to r1 s", 7), ("s/round", 7), ("post s", 6), ("CPU s", 6), ("other", 5),
        ("peak RSS GiB", 12), ("PSS GiB", 7), ("MSE / LS", 8), ("bar", 3), ("= sim", 5),
    ]  # fmt: skip
    lines = ["  ".join(name.ljust(w) if i < 2 else name.rjust(w) for i, (name, w) in enumerate(cols))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['label']:<20}  {MODE_LABEL[r['mode']]:<9}  {r['clients']}x{r['rounds']}: FAILED "
                         f"({'; '.join(r['errors'])[:200]})")  # fmt: skip
            continue
        cells = [
            r["label"].ljust(20),
            MODE_LABEL[r["mode"]].ljust(9),
            f"{r['clients']}x{r['rounds']}".rjust(6),
            _runs(r).rjust(4),
            _f(r.get("wall-s"), ".1f", 7),
            _f(r.get("x-floor"), ".2f", 7),
            _f(r.get("x-quickstart"), ".3f", 8),
            _f(r.get("pre-s"), ".1f", 5),
            _f(r.get("to-round1-s"), ".1f", 7),
            _f(r.get("round-s"), ".2f", 7),
            _f(r.get("post-s"), ".1f", 6),
            _f(r.get("cpu-s"), ".0f", 6),
            _f(r.get("other-load-max"), ".2f", 5),
            _f(r["peak-rss"] / GiB, ".2f", 12),
            _f(r["peak-pss"] / GiB if r.get("peak-pss") else None, ".2f", 7),
            _f(r.get("mse-ratio"), ".4f", 8),
            _f(r.get("bar"), "", 3),
            _f({True: "yes", False: "NO"}.get(r.get("same-weights-as-sim")), "", 5),
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    cols = [("system", 24), ("clients", 7), ("rounds", 6), ("n/client", 8), ("runs", 4), ("wall s", 7),
            ("to r1 s", 7), ("s/round", 8), ("updates/s", 9), ("e2e upd/s", 9), ("vs floor", 8), ("CPU s", 6),
            ("other", 5), ("peak RSS GiB", 12)]  # fmt: skip
    lines = ["  ".join(name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w) in enumerate(cols))]
    lines.append("-" * len(lines[0]))
    for r in sorted(rows, key=lambda r: (r["mode"] != "inline", not r["system"].startswith("fedlinear"), r["system"], r["clients"])):
        if not r["ok"]:
            lines.append(f"{r['label']:<24}  {r['clients']:>7}: FAILED ({'; '.join(r['errors'])[:200]})")
            continue
        lines.append("  ".join([
            r["label"].ljust(24), str(r["clients"]).rjust(7), str(r["rounds"]).rjust(6), str(r["samples"]).rjust(8),
            _runs(r).rjust(4), _f(r.get("wall-s"), ".1f", 7), _f(r.get("to-round1-s"), ".1f", 7),
            _f(r.get("round-s"), ".2f", 8), _f(r.get("updates-per-s"), ".1f", 9),
            _f(r.get("e2e-updates-per-s"), ".1f", 9), _f(r.get("updates-vs-floor"), ".2f", 8),
            _f(r.get("cpu-s"), ".0f", 6), _f(r.get("other-load-max"), ".2f", 5), _f(r["peak-rss"] / GiB, ".2f", 12),
        ]))  # fmt: skip
    return "\n".join(lines)


def central_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<22}  {'samples':>7}  {'fit s':>8}  {'import s':>8}  {'process s':>9}  {'peak RSS GiB':>12}  "
             f"{'MSE / LS':>8}"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['label']:<22}  FAILED ({'; '.join(r['errors'])[:200]})")
            continue
        samples = r["clients"] * r["samples"]
        lines.append(
            f"{r['label']:<22}  {samples:>7}  {_f(r.get('fit-s'), '.4f', 8)}  {_f(r.get('import-s'), '.1f', 8)}  "
            f"{_f(r.get('process-s'), '.1f', 9)}  {r['peak-rss'] / GiB:>12.2f}  {_f(r.get('mse-ratio'), '.4f', 8)}"
        )
    return "\n".join(lines)


def find_row(rows: list[dict[str, Any]], key: tuple) -> dict[str, Any] | None:
    """The row of case ``key`` = (suite, mode, system, clients, rounds), if it ran."""
    for r in rows:
        if (r["suite"], r["mode"], r["system"], r["clients"], r["rounds"]) == tuple(key):
            return r
    return None


def _case_text(key: tuple) -> str:
    suite, mode, system, clients, rounds = key
    return f"{system} {MODE_LABEL[mode]} {clients}x{rounds}"


def evaluate_target(target: Target, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One declared target judged on this invocation's rows: measured, reference, ratio, status."""
    out: dict[str, Any] = {"issue": target.issue, "target": target.name, "case": _case_text(target.case),
                           "bound": f"{target.op} {target.limit:g}" + (" GiB" if target.metric == "peak-rss" else " x"),
                           "measured": None, "reference": None, "ratio": None, "value": None, "limit": target.limit,
                           "status": "not run", "detail": ""}  # fmt: skip
    row = find_row(rows, target.case)
    if row is None or not row["ok"]:
        out["detail"] = "case failed" if row is not None else ""
        return out
    if any(row.get(field) != value for field, value in target.requires):
        out["detail"] = ", ".join(f"needs {f}={v} (got {row.get(f)})" for f, v in target.requires)
        return out
    ratio = None
    if target.metric == "peak-rss":
        ratio = row["peak-rss-max"] / GiB  # the worst run
        out["measured"] = f"{ratio:.2f} GiB (max)"
    elif target.metric == "wall-s":
        out["measured"] = f"{row['wall-s']:.1f} s"
        out["reference"] = f"{target.ref_value:g} s ({target.ref_label})"
        ratio = row["wall-s"] / target.ref_value
    else:
        ref = find_row(rows, target.ref)
        if ref is None or not ref["ok"]:
            out["detail"] = f"no reference run ({_case_text(target.ref)})"
            return out
        field = "updates-per-s" if target.metric == "updates-ratio" else "wall-s"
        mine, theirs = row.get(field), ref.get(field)
        if not mine or not theirs:
            out["detail"] = f"no {field}"
            return out
        unit = " updates/s" if field == "updates-per-s" else " s"
        out["measured"] = f"{mine:.1f}{unit}"
        out["reference"] = f"{theirs:.1f}{unit} ({_case_text(target.ref)})"
        ratio = theirs / mine if target.metric == "speedup" else mine / theirs
    out["ratio"] = out["value"] = ratio
    met = ratio <= target.limit if target.op == "<=" else ratio >= target.limit
    out["status"] = "met" if met else "MISSED"
    ceilings = _ceilings(target, rows)
    if ceilings:
        out["ceilings"] = ceilings
        out["detail"] = "ceiling here: " + ", ".join(f"{label} {value:.2f} x" for label, value in ceilings.items())
    return out


def _ceilings(target: Target, rows: list[dict[str, Any]]) -> dict[str, float]:
    """label -> ratio to the target's reference, for each of ``target.ceilings`` that ran (ratio metrics only)."""
    if target.metric not in ("updates-ratio", "wall-ratio") or not target.ceilings:
        return {}
    field = "updates-per-s" if target.metric == "updates-ratio" else "wall-s"
    ref = find_row(rows, target.ref)
    out: dict[str, float] = {}
    for key in target.ceilings:
        row = find_row(rows, key)
        if row is not None and row["ok"] and ref is not None and ref["ok"] and row.get(field) and ref.get(field):
            out[row["label"]] = row[field] / ref[field]
    return out


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of :data:`~fedlinear.scripts.experiments.bench.cases.TARGETS`, plus the accuracy bar and
    inline's bit-identical weights (missing figures: 'not run')."""
    targets = [evaluate_target(t, rows) for t in TARGETS]
    bars = [x for x in rows if x.get("bar")]
    worst = max((x["mse-ratio"] for x in bars), default=None)
    targets.append({"issue": 21, "target": "accuracy bar: test MSE <= 1.01 x LS in every 20-round fedlinear run",
                    "case": f"{len(bars)} cases", "bound": f"<= {ACCURACY_BAR:g} x", "measured": None,
                    "reference": "pooled least squares", "ratio": worst, "value": worst, "limit": ACCURACY_BAR,
                    "status": "not run" if not bars else ("met" if all(x["bar"] == "yes" for x in bars) else "MISSED"),
                    "detail": ""})  # fmt: skip
    same = [x for x in rows if "same-weights-as-sim" in x]
    targets.append({"issue": 21, "target": "inline weights bit-identical to simulation (same seed, same data)",
                    "case": ", ".join(f"{x['clients']}x{x['rounds']}" for x in same) or "-", "bound": "equal",
                    "measured": None, "reference": "fedlinear (numpy) sim, same size", "ratio": None, "value": None,
                    "limit": None, "status": "not run" if not same else
                    ("met" if all(x["same-weights-as-sim"] for x in same) else "MISSED"), "detail": ""})  # fmt: skip
    return targets


def targets_table(targets: list[dict[str, Any]]) -> str:
    cols = [("status", 7), ("issue", 5), ("target", 50), ("measured", 18), ("reference", 44), ("ratio", 7), ("bound", 9)]
    lines = ["  ".join(name.ljust(w) for name, w in cols)]
    lines.append("-" * len(lines[0]))
    for t in targets:
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.3g}"
        cells = [t["status"].ljust(7), str(t["issue"]).ljust(5), t["target"][:50].ljust(50),
                 (t["measured"] or "-")[:18].ljust(18), (t["reference"] or "-")[:44].ljust(44), ratio.rjust(7),
                 t["bound"].ljust(9)]  # fmt: skip
        line = "  ".join(cells).rstrip()
        if t.get("detail"):
            line += f"  ({t['detail']})"
        lines.append(line)
    return "\n".join(lines)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<24}  {'mode':<7}  {'N x R':>6}  {'runs':>4}  {'sweep runs':>10}  {'wall s':>7}  {'CPU s':>6}  "
             f"{'other':>5}  {'peak RSS GiB':>12}"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['label']:<24}  FAILED ({'; '.join(r['errors'])[:200]})")
            continue
        lines.append(f"{r['label']:<24}  {MODE_LABEL[r['mode']]:<7}  {r['clients']}x{r['rounds']:<3}  {_runs(r):>4}  "
                     f"{r.get('sweep-runs', 0):>10}  {_f(r.get('wall-s'), '.1f', 7)}  {_f(r.get('cpu-s'), '.0f', 6)}  "
                     f"{_f(r.get('other-load-max'), '.2f', 5)}  {r['peak-rss'] / GiB:>12.2f}")  # fmt: skip
    return "\n".join(lines)


CSV_FIELDS = ("key", "suite", "system", "mode", "clients", "rounds", "samples", "runs", "failed-runs", "ok", "wall-s",
              "x-floor", "x-quickstart", "x-floor-rounds", "pre-s", "startup-s", "round1-s", "to-round1-s", "round-s",
              "rounds-total-s", "post-s", "updates-per-s", "e2e-updates-per-s", "updates-vs-floor", "cpu-s",
              "other-load-max", "worker-crashes", "peak-rss", "peak-pss", "peak-rss-max", "test-mse", "ls-test-mse", "mse-ratio",
              "bar", "fit-s", "import-s", "process-s", "weights-digest", "same-weights-as-sim", "sweep-runs")  # fmt: skip


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})


def write_outputs(out, rows, args, hw, command, started, final: bool, code: dict | None = None) -> str:
    main_rows = [r for r in rows if r["suite"] == "main"]
    scale_rows = [r for r in rows if r["suite"] == "scaling"]
    central_rows = [r for r in rows if r["suite"] == "central"]
    sweep_rows = [r for r in rows if r["suite"] == "sweep"]
    targets = evaluate_targets(rows)
    sections = [
        f"command: {command}",
        f"hardware: {hw['cpus']} CPUs ({hw['cpu-model']}), {hw['memory-gib']} GiB RAM; python {hw['python']}, "
        f"flwr {hw.get('flwr')}, tensorflow {hw.get('tensorflow')}, numpy {hw.get('numpy')}, ray {hw.get('ray')}",
    ]
    if code and code.get("commit"):
        changed = code.get("changed") or []
        detail = f", changed files: {', '.join(changed)}" if changed else ""
        sections.append(f"code: commit {code['commit']}{detail}")
        if code.get("at-end"):
            sections.append(f"  (the working tree changed during the benchmark; at the end: {code['at-end']})")
    if main_rows:
        sections += [f"\n{args.clients} clients x {args.rounds} rounds, {args.samples_per_client} samples per client, "
                     f"d={args.features} (median of up to {args.repeat} runs; ratios are wall-clock, same mode):",
                     main_table(main_rows), MAIN_LEGEND]  # fmt: skip
    if central_rows:
        sections += ["\ncentral baselines on the pooled data (one process each):", central_table(central_rows)]
    if scale_rows:
        sections += ["\nscaling, simulation mode and inline mode (inline rows' 'vs floor': to the simulation floor; 'fedlinear "
                     "(inline)' is --pool auto, '/serial' and '/procs' the pools named; the no-op app inline is the mode's ceiling: "
                     "Flower's serialization and FedAvg with no client work) (updates/s = client updates in rounds 2..R / their "
                     "time, the steady state; e2e upd/s = clients x rounds / wall; vs floor = updates/s / the floor's):",
                     scaling_table(scale_rows)]  # fmt: skip
    if sweep_rows:
        sections += [f"\nprivacy/utility sweep ('fedlinear sweep', noise {args.sweep_noise} x {args.sweep_seeds} seeds, its "
                     "default data; wall = the whole command):", sweep_table(sweep_rows)]  # fmt: skip
    sections += ["\ntargets (issue 21's acceptance, and issue 4's kept; ratio = measured / reference, or reference / "
                 "measured for 'faster than'; a target at a size this invocation did not run is 'not run'):",
                 targets_table(targets)]  # fmt: skip
    text = "\n".join(sections)
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    write_csv(os.path.join(out, "bench.csv"), rows)
    payload = {
        "command": command,
        "started": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds") if final else None,
        "hardware": hw,
        "code": code or {},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "cases": rows,
        "targets": targets,
    }
    with open(os.path.join(out, "bench.json"), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
    if final:
        plot_scaling(os.path.join(out, "scaling.png"), rows)
        plot_ratios(os.path.join(out, "ratios.png"), rows, targets)
    return text
