"""Real data at defaults, through the real runtime: public tables split IID with ``fedlinear data
split`` and trained with ``fedlinear run`` (Flower's simulation engine or real SuperNode processes),
every setting at its default, against the settings before standardization (raw data, learning
rate 0.05). Prints a table of final test MSE / pooled least-squares test MSE.

    python -m fedlinear.scripts.experiments.realdata --out /tmp/realdata [--mode simulation|processes] [--rounds 40]

Tables (bundled in scikit-learn and statsmodels, no download): diabetes (442 x 10), longley
(16 x 6, NIST's ill-conditioned reference), macrodata (203 x 13), fair (6366 x 8), and hard synthetic
data from ``fedlinear data synth`` (scales 1e-3..1e4, offsets, target offset 1e5, condition number 1e4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TABLES = {
    "diabetes": ("sklearn", "diabetes", "target"),
    "longley": ("statsmodels", "longley", "TOTEMP"),
    "macrodata": ("statsmodels", "macrodata", "realgdp"),
    "fair": ("statsmodels", "fair", "affairs"),
}
SETTINGS = {
    "defaults": [],
    "before (raw, lr 0.05)": ["--set", "standardize=none", "--set", "learning-rate=0.05"],
}


def write_table(name: str, path: str) -> None:
    source, dataset, target = TABLES[name]
    if source == "sklearn":
        from sklearn.datasets import load_diabetes

        frame = load_diabetes(as_frame=True).frame
    else:
        import statsmodels.api as sm

        frame = getattr(sm.datasets, dataset).load_pandas().data
    frame = frame.drop(columns=[target]).join(frame[target])  # the target last, header kept
    frame.to_csv(path, index=False)


def fedlinear(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlinear.scripts.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("simulation", "processes"), default="simulation")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join([*TABLES, "hard"]))
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    names = args.only.split(",") if args.only else [*TABLES, "hard"]
    rows = []
    for name in names:
        data = os.path.join(out, name, "data")
        if name == "hard":
            made = fedlinear("data", "synth", "--out", data, "--clients", str(args.clients), "--samples-per-client",
                             "750", "--features", "8", "--feature-scales", "1e-3:1e4", "--feature-offsets", "0:1e3",
                             "--condition-number", "1e4", "--target-offset", "1e5", "--test-samples", "1000")  # fmt: skip
        else:
            csv = os.path.join(out, name, f"{name}.csv")
            os.makedirs(os.path.dirname(csv), exist_ok=True)
            write_table(name, csv)
            made = fedlinear("data", "split", csv, "--clients", str(args.clients), "--out", data)
        if made.returncode:
            print(f"{name}: could not make the data: {made.stderr.strip()}", file=sys.stderr)
            return 1
        for label, extra in SETTINGS.items():
            run_dir = os.path.join(out, name, "run-" + label.split()[0])
            started = time.monotonic()
            done = fedlinear("run", "--data", data, "--rounds", str(args.rounds), "--out", run_dir,
                             "--mode", args.mode, *extra)  # fmt: skip
            wall = time.monotonic() - started
            with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as handle:
                status = json.load(handle)
            ratio, note = None, ""
            if os.path.exists(os.path.join(run_dir, "manifest.json")):
                with open(os.path.join(run_dir, "manifest.json"), encoding="utf-8") as handle:
                    manifest = json.load(handle)
                ratio = manifest["final"].get("test-mse-ratio")
                note = manifest["learning-rate"]["how"]
            else:
                note = status.get("message", "")[:100]
            rows.append((name, label, status["status"], done.returncode, ratio, wall, note))
            print(f"{name:10s} {label:22s} {status['status']:9s} exit {done.returncode}  "
                  f"ratio {ratio if ratio is None else f'{ratio:.5f}'}  {wall:6.1f} s  {note}", flush=True)  # fmt: skip
    print()
    print(f"| data | settings | status | exit | final test MSE / LS | wall s | ({args.clients} clients, {args.rounds} rounds, {args.mode})")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, label, status, code, ratio, wall, _ in rows:
        shown = "-" if ratio is None else f"{ratio:.4f}"
        print(f"| {name} | {label} | {status} | {code} | {shown} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
