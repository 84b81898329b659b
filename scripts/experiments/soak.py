"""Soak test: a long ``fedlinear run`` in processes mode, watching the long-lived processes' memory.

    python -m fedlinear.scripts.experiments.soak --nodes 3 --rounds 300 [--out DIR] [--interval 2] [--window 50] [--threshold 1.2]

It writes small synthetic shards, runs ``fedlinear run`` (real SuperLink and SuperNode processes) and
samples the resident set size (RSS) of every long-lived process of the federation (SuperLink,
SuperNodes, the SuperExecs, the ServerApp, ``flwr run``) every ``--interval`` seconds, tagging each
sample with the round in progress. At the end it prints, per process, the mean RSS over the first
``--window`` rounds and over the last ``--window`` rounds (half the rounds each when there are fewer
than 2 x window) and their ratio. Exit status: 0; 1 if any process grew by more than ``--threshold``
(last / first mean RSS); 2 if the run itself failed. Short-lived ``flwr-clientapp`` processes (one
per task) are not followed. RSS comes from psutil.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict

import psutil

import fedlinear

REPO = fedlinear.app_dir()  # the working directory of the commands it runs
ROUND_LINE = re.compile(r"^round\s+(\d+) \|")
# command-line markers of the long-lived processes, in the order they are tried
ROLES = (
    ("flower-superlink", "superlink"),
    ("flower-supernode", "supernode"),
    ("flower-superexec", "superexec"),
    ("flwr-serverapp", "serverapp"),
    ("flwr-clientapp", None),  # one per task: not followed
    ("flwr run", "flwr-run"),
)
WARM_EXECUTOR = "fedlinear.scripts.local.warm_clientapp"  # scripts/local/warm_clientapp.py: its children share its command line
DEFAULT_THRESHOLD = 1.2


# ------------------------------------------------------------------------------------------------
# processes and their RSS
# ------------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[tuple[int, int, str, int]]:
    """(pid, parent pid, command line, RSS bytes) of every live descendant of ``pid``."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in procs:
        try:
            found.append((proc.pid, proc.ppid(), " ".join(proc.cmdline()), proc.memory_info().rss))
        except psutil.Error:
            continue
    return found


def label_of(pid: int, cmdline: str, parent: str = "") -> str | None:
    """A stable name for a long-lived process of the federation (None: not followed); a SuperExec
    is named after the process that started it (``parent``: that one's command line)."""
    if WARM_EXECUTOR in cmdline:  # the warm ClientApp executor, or one of its forked ClientApps (one per task)
        return None if WARM_EXECUTOR in parent else "warm-clientapp executor"
    for marker, role in ROLES:
        if marker in cmdline:
            if role is None:
                return None
            if role == "supernode":
                match = re.search(r"partition-id=(\d+)", cmdline)
                return f"supernode-{match.group(1)}" if match else f"supernode[{pid}]"
            if role == "superexec":
                owner = label_of(0, parent) if "flower-superexec" not in parent else None
                return f"superexec of {owner}" if owner else f"superexec[{pid}]"
            return role
    return None


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def windows(rounds: int, window: int) -> tuple[range, range]:
    """The rounds of the first and of the last window (each at most half the run)."""
    size = max(1, min(window, rounds // 2))
    return range(1, size + 1), range(rounds - size + 1, rounds + 1)


def summarize(samples: list[tuple[int, str, int]], rounds: int, window: int, threshold: float):
    """Rows (label, first-window mean MiB, last-window mean MiB, ratio or None) and the labels over threshold."""
    first, last = windows(rounds, window)
    by_label: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"first": [], "last": []})
    for round_in_progress, label, rss in samples:
        if round_in_progress in first:
            by_label[label]["first"].append(rss)
        if round_in_progress in last:
            by_label[label]["last"].append(rss)
    rows, grown = [], []
    for label in sorted(by_label):
        a, b = by_label[label]["first"], by_label[label]["last"]
        mean_a = sum(a) / len(a) / 2**20 if a else None
        mean_b = sum(b) / len(b) / 2**20 if b else None
        ratio = mean_b / mean_a if mean_a and mean_b else None
        rows.append((label, mean_a, mean_b, ratio))
        if ratio is not None and ratio > threshold:
            grown.append(label)
    return rows, grown


def table(rows, rounds: int, window: int) -> str:
    first, last = windows(rounds, window)
    head = (
        f"{'process':<30} {f'rounds {first.start}-{first.stop - 1} MiB':>20} "
        f"{f'rounds {last.start}-{last.stop - 1} MiB':>20} {'ratio':>7}"
    )
    lines = [head, "-" * len(head)]
    for label, a, b, ratio in rows:
        cell = lambda v: f"{v:>20.1f}" if v is not None else f"{'n/a':>20}"  # noqa: E731
        lines.append(f"{label:<30} {cell(a)} {cell(b)} {ratio:>7.3f}" if ratio is not None else f"{label:<30} {cell(a)} {cell(b)} {'n/a':>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def make_data(out: str, nodes: int, seed: int) -> str:
    data = os.path.join(out, "data")
    subprocess.run(
        [sys.executable, "-m", "fedlinear.scripts.cli", "data", "synth", "--out", data, "--clients", str(nodes),
         "--samples-per-client", "200", "--features", "5", "--test-samples", "500", "--seed", str(seed)],
        cwd=REPO, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return data


def soak(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data = make_data(out, args.nodes, args.seed)
    run_dir = os.path.join(out, "run")
    argv = [
        sys.executable, "-m", "fedlinear.scripts.cli", "run", "--data", data, "--clients", str(args.nodes),
        "--rounds", str(args.rounds), "--out", run_dir, "--mode", "processes", "--timeout", str(args.timeout),
        "--set", f"seed={args.seed}", *[x for item in args.set or [] for x in ("--set", item)],
        "--isolation", args.isolation,
    ]  # fmt: skip
    print(f"soak: {args.nodes} SuperNodes x {args.rounds} rounds; run dir {run_dir}; RSS every {args.interval:g} s", flush=True)
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    state = {"round": 0}
    samples: list[tuple[int, str, int]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.is_set():
            current = state["round"] + 1  # the round in progress
            if current <= args.rounds:
                found = descendants(proc.pid)
                cmdlines = {pid: cmdline for pid, _, cmdline, _ in found}
                for pid, ppid, cmdline, rss in found:
                    label = label_of(pid, cmdline, cmdlines.get(ppid, ""))
                    if label is not None:
                        samples.append((current, label, rss))
            done.wait(args.interval)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    tail: list[str] = []
    started = time.monotonic()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-20:]
            match = ROUND_LINE.match(line)
            if match:
                state["round"] = int(match.group(1))
                if state["round"] % args.report_every == 0:
                    print(f"soak: round {state['round']} after {time.monotonic() - started:.0f} s", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    finally:
        done.set()
        thread.join(timeout=10)
    completed = state["round"]
    rows, grown = summarize(samples, completed, args.window, args.threshold)
    print()
    print(table(rows, completed, args.window))
    print()
    print(f"{len(samples)} samples over {completed} rounds in {time.monotonic() - started:.0f} s; "
          f"threshold: last / first mean RSS <= {args.threshold:g}")  # fmt: skip
    if proc.returncode != 0 or completed < args.rounds:
        print(f"soak: the run failed (exit {proc.returncode}, {completed} of {args.rounds} rounds):", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        return 2
    if grown:
        print(f"soak: RSS grew by more than {args.threshold:g} x in: {', '.join(grown)}", file=sys.stderr)
        return 1
    print("soak: no process grew past the threshold")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(os.path.expanduser("~"), "fedlinear-soak"))
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--window", type=int, default=50, help="rounds in each compared window")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="largest allowed last/first RSS ratio")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=6 * 3600.0, help="upper bound on the whole run, seconds")
    parser.add_argument("--report-every", type=int, default=25, help="print progress every this many rounds")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="run config override (repeatable)")
    parser.add_argument("--isolation", choices=("auto", "netns", "none"), default="auto", help="as for fedlinear run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlinear.scripts.experiments.soak", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.rounds < 2:
        print("soak: error: --nodes must be >= 1 and --rounds >= 2", file=sys.stderr)
        return 2
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
