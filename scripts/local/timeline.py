"""A stage timeline of a local federation: when each node's ``flwr-clientapp`` starts and ends, per stage.

In Flower 1.42's deployment runtime every message a node handles is a fresh ``flwr-clientapp``
process (spawned by the node's ``flower-superexec``), so a node's k-th ``flwr-clientapp`` is its
reply to the k-th message it got: stage k (fedlinear's ``describe`` and ``scatter`` queries, then
one per round). ``python -m fedlinear.scripts.local.timeline [--out FILE.json] -- COMMAND...`` runs
COMMAND (e.g. ``fedlinear run --mode processes ...``), samples its process tree every
``--interval`` seconds, and prints per stage: when the first and the last node's ClientApp started,
when the last one ended, and the CPU-seconds and peak RSS of one ClientApp; then the CPU-seconds of
every kind of process (SuperLink, SuperNodes, SuperExecs, ServerApp, ClientApps, ...).

It is a measuring tool for ``processes`` mode (docs/explanation/processes-mode.md shows what it found), not part of a run:
it only reads ``/proc`` (psutil). A process's CPU is its last sample's, so up to one interval of
each process's end is missed; processes shorter than an interval may be missed altogether
(``flwr-clientapp`` lives for seconds: its imports alone take ~1.5 s of CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import psutil

# (kind, what identifies it in the command line's first three words' basenames or the module run with -m)
KINDS: tuple[tuple[str, str], ...] = (
    ("clientapp", "flwr-clientapp"),
    ("serverapp", "flwr-serverapp"),
    ("simulation", "flwr-simulation"),
    ("supernode", "flower-supernode"),
    ("superlink", "flower-superlink"),
    ("superexec", "flower-superexec"),
    ("flwr-run", "flwr"),
    ("exporter", "fedlinear.common.exporter"),
    ("watchdog", "fedlinear.scripts.local.processes"),
    ("launcher", "fedlinear.scripts.local.launch"),
)


WARM_EXECUTOR = "fedlinear.scripts.local.warm_clientapp"


def classify(cmdline: Sequence[str], name: str = "") -> str:
    """The kind of a process from its command line ("other" when none fits) and its ``comm`` (``name``).

    With the warm ClientApp executor (scripts/local/warm_clientapp.py) the SuperExec's ``flwr-clientapp``
    is the stand-in (``python -IS .../flwr-clientapp``): it lives as long as its ClientApp, so it is
    the ``clientapp`` the stages are made of; the ClientApp itself is the executor's forked child
    (``clientapp-fork``: the executor's command line, named ``flwr-clientapp``), where its CPU is."""
    words = [os.path.basename(word) for word in cmdline[:3]]
    module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline[:-1] else ""
    if module == WARM_EXECUTOR:
        return "clientapp-fork" if name == "flwr-clientapp" else "warm-executor"
    for kind, ident in KINDS:
        if ident in words or module == ident:
            return kind
    return "other"


def updated_kind(kind: str, cmdline: Sequence[str], name: str = "") -> str:
    """A process's kind after another look at its command line: re-read every sample (one seen between
    fork and exec carries its parent's), except when it is empty (a process tearing down its memory on
    exit shows none: it keeps the kind it had)."""
    return classify(cmdline, name) if cmdline else kind


@dataclasses.dataclass
class Proc:
    """One process as sampled: start and last-seen times (seconds from the sampler's start)."""

    pid: int
    ppid: int
    kind: str
    start: float
    end: float
    cpu: float = 0.0  # user + system CPU-seconds at the last sample
    rss: int = 0  # peak resident set size seen, bytes


class Sampler:
    """Samples the descendants of ``root`` (a pid): :meth:`poll` once, :meth:`procs` what was seen."""

    def __init__(self, root: int, t0: float | None = None) -> None:
        self.root = root
        self.t0 = time.time() if t0 is None else t0
        self._seen: dict[tuple[int, float], Proc] = {}

    def poll(self) -> None:
        try:
            members = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return
        now = time.time() - self.t0
        for proc in members:
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:  # ended (its CPU is its last sample's): not seen now
                        continue
                    created = proc.create_time()
                    key = (proc.pid, created)
                    cmdline = proc.cmdline()
                    name = proc.name()
                    entry = self._seen.get(key)
                    if entry is None:
                        entry = self._seen[key] = Proc(proc.pid, proc.ppid(), classify(cmdline, name), created - self.t0, now)
                    entry.kind = updated_kind(entry.kind, cmdline, name)
                    times = proc.cpu_times()
                    rss = proc.memory_info().rss
            except psutil.Error:
                continue
            entry.end = now
            entry.cpu = max(entry.cpu, times.user + times.system)
            entry.rss = max(entry.rss, rss)

    def procs(self) -> list[Proc]:
        return sorted(self._seen.values(), key=lambda p: p.start)


@dataclasses.dataclass
class Stage:
    """Stage k: every node's k-th ``flwr-clientapp``."""

    index: int
    clientapps: list[Proc]

    @property
    def first_start(self) -> float:
        return min(p.start for p in self.clientapps)

    @property
    def last_start(self) -> float:
        return max(p.start for p in self.clientapps)

    @property
    def last_end(self) -> float:
        return max(p.end for p in self.clientapps)

    @property
    def cpu_per_clientapp(self) -> float:
        return sum(p.cpu for p in self.clientapps) / len(self.clientapps)


def stages(procs: Iterable[Proc]) -> list[Stage]:
    """The ClientApps grouped by stage: a node's (its SuperExec's, their parent's) k-th one is stage k."""
    by_parent: dict[int, list[Proc]] = defaultdict(list)
    for proc in procs:
        if proc.kind == "clientapp":
            by_parent[proc.ppid].append(proc)
    grouped: dict[int, list[Proc]] = defaultdict(list)
    for children in by_parent.values():
        for k, proc in enumerate(sorted(children, key=lambda p: p.start)):
            grouped[k].append(proc)
    return [Stage(k, grouped[k]) for k in sorted(grouped)]


def cpu_by_kind(procs: Iterable[Proc]) -> dict[str, tuple[int, float]]:
    """``{kind: (processes, CPU-seconds)}``."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for proc in procs:
        totals[proc.kind][0] += 1
        totals[proc.kind][1] += proc.cpu
    return {kind: (n, cpu) for kind, (n, cpu) in sorted(totals.items())}


def report(procs: list[Proc], wall: float) -> str:
    """The printed timeline: one line per stage, then CPU by kind of process."""
    lines = []
    apps = [p for p in procs if p.kind in ("serverapp", "simulation")]
    lines.append(f"wall {wall:.1f} s" + (f"; ServerApp process started at {apps[0].start:.1f} s" if apps else ""))
    previous = None
    for stage in stages(procs):
        gap = f"{stage.first_start - previous:5.1f}" if previous is not None else "    -"
        lines.append(
            f"stage {stage.index}: nodes {len(stage.clientapps):3d}  gap {gap} s  starts {stage.first_start:7.1f}"
            f"..{stage.last_start:7.1f} s  last end {stage.last_end:7.1f} s  span {stage.last_end - stage.first_start:5.1f} s"
            f"  CPU/ClientApp {stage.cpu_per_clientapp:.2f} s  peak RSS {max(p.rss for p in stage.clientapps) / 2**20:.0f} MiB"
        )
        previous = stage.last_end
    total = sum(p.cpu for p in procs)
    lines.append(f"CPU-s by process kind (total {total:.1f}): " + ", ".join(
        f"{kind} {cpu:.1f} ({n})" for kind, (n, cpu) in cpu_by_kind(procs).items()))  # fmt: skip
    return "\n".join(lines)


def run(command: list[str], interval: float = 0.1) -> tuple[int, float, list[Proc]]:
    """Run ``command`` to its end, sampling its process tree; (exit code, wall seconds, processes)."""
    t0 = time.time()
    child = subprocess.Popen(command)
    sampler = Sampler(child.pid, t0)
    try:
        while child.poll() is None:
            sampler.poll()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=interval)
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
    return child.returncode, time.time() - t0, sampler.procs()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m fedlinear.scripts.local.timeline [--out FILE.json] [--interval S] -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m fedlinear.scripts.local.timeline")
    parser.add_argument("--out", help="also write every sampled process here (JSON)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default 0.1)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command or args.interval <= 0:
        parser.error("a COMMAND after -- and a positive --interval are needed")
    code, wall, procs = run(command, args.interval)
    print(report(procs, wall))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"command": command, "exit-code": code, "wall-s": wall,
                       "procs": [dataclasses.asdict(p) for p in procs]}, handle, indent=1)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
