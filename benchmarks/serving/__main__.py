"""Requests per second and p50/p99 latency of ``fedlinear serve`` against the naive baseline, one run.

    python -m benchmarks.serving [--seconds 20] [--users 8] [--features 10] [--out DIR]
    python -m benchmarks.serving --requests 200 --warmup 0 --slices 1   # a smoke run, bounded by work

Both servers serve the same SavedModel (exported by :func:`common.export.export_savedmodel`) on
127.0.0.1. Before any load both servers' answers are checked against the SavedModel loaded with
TensorFlow (1e-6). For each payload (1 row, 100 rows) locust runs headless with ``--users`` users that
send back to back, after a warm-up, ``--seconds`` per server in all, split into ``--slices`` turns
in which the servers alternate (only one is loaded at a time), so a change in the machine's load
(other jobs on a shared machine) hits both alike. The table gives the medians over the slices of
requests/s, p50 and p99 latency (ms) and the ratios fedlinear / baseline. The load generator runs on
the same machine, so the figures are what this machine does with client and server on it, not a
server's ceiling.

``--requests N`` turns each measured slice into exactly N requests (over all users) instead of
``--seconds`` of load: a smoke run is then bounded by work, not by the clock, so a loaded machine makes
it slower but never empty (a time-bounded slice can end before a single request was answered).
``--seconds`` then only bounds a hang (per slice).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
PATH = "/v1/models/m:predict"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], port: int, log: str, timeout: float = 300.0) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited {proc.returncode}: {open(log).read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd[:4]} not ready within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def locust(port: int, payload: str, seconds: float, users: int, workdir: str, tag: str, requests: int = 0) -> dict:
    """One headless locust run: ``seconds`` of load, or (``requests`` > 0) exactly that many requests,
    ``seconds`` then being only the bound of a hang."""
    prefix = os.path.join(workdir, tag)
    env = {**os.environ, "FEDLINEAR_BENCH_PAYLOAD": payload, "FEDLINEAR_BENCH_PATH": PATH,
           "FEDLINEAR_BENCH_REQUESTS": str(requests)}  # fmt: skip
    cmd = [
        sys.executable, "-m", "locust", "-f", os.path.join(HERE, "locustfile.py"), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--host", f"http://127.0.0.1:{port}",
        "--csv", prefix, "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5",
    ]  # fmt: skip
    env["FEDLINEAR_BENCH_SUMMARY"] = summary = prefix + "_summary.json"
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode not in (0, 1) or not os.path.exists(summary):
        raise SystemExit(f"locust failed ({done.returncode}): {done.stderr[-2000:]}")
    totals = json.load(open(summary))  # the final statistics (the --csv files lag by up to a second)
    number = lambda v: float("nan") if v is None else float(v)  # noqa: E731 - None: no request finished
    return {
        "requests": int(totals["requests"]),
        "failures": int(totals["failures"]),
        "rps": number(totals["rps"]),
        "p50": number(totals["p50"]),
        "p99": number(totals["p99"]),
    }


def check(port: int, x: np.ndarray, want: np.ndarray, who: str) -> None:
    got = np.array(httpx.post(f"http://127.0.0.1:{port}{PATH}", json={"instances": x.tolist()}, timeout=60).json()["predictions"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{who} disagrees with the SavedModel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per case (default 20)")
    parser.add_argument("--warmup", type=float, default=8.0, help="unmeasured load before each case (default 8)")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users (default 8)")
    parser.add_argument("--slices", type=int, default=4,
                        help="the servers take turns in this many slices per case; the table shows the medians (default 4)")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--requests", type=int, default=0,
                        help="each measured slice sends exactly this many requests (a smoke run bounded by work); "
                             "--seconds then only bounds a hang, per slice (default 0: --seconds of load)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.requests < 0:
        parser.error(f"--requests must be >= 0, got {args.requests}")

    from fedlinear.common import model as lm
    from fedlinear.common.export import export_savedmodel, load_savedmodel

    workdir = tempfile.mkdtemp(prefix="fedlinear-servebench-")
    rng = np.random.default_rng(0)
    d = args.features
    weights = lm.LinearWeights(kernel=rng.normal(size=(d, 1)).astype(np.float32), bias=np.array([0.5], np.float32))
    model = os.path.join(workdir, "model")
    export_savedmodel(weights, model)
    reference, _ = load_savedmodel(model)
    payloads = {}
    for rows in (1, 100):
        x = rng.normal(size=(rows, d))
        path = os.path.join(workdir, f"payload-{rows}.json")
        with open(path, "w") as handle:
            json.dump({"instances": x.tolist()}, handle)
        payloads[rows] = (path, x, reference(x))

    servers = {
        "fedlinear serve": [sys.executable, "-m", "fedlinear.scripts.cli", "serve", f"m={model}", "--poll-seconds", "0"],
        "naive TF per request": [sys.executable, "-m", "benchmarks.serving.baseline", model],
    }
    ports, procs = {}, {}
    try:
        for name, cmd in servers.items():  # both up, idle unless loaded
            port = ports[name] = free_port()
            full = [*cmd, "--port", str(port)] if name == "fedlinear serve" else [*cmd, str(port)]
            procs[name] = start(full, port, os.path.join(workdir, f"{name.split()[0]}.log"))
        slices: dict[str, dict[int, list[dict]]] = {name: {rows: [] for rows in payloads} for name in servers}
        for rows, (path, x, want) in payloads.items():
            for name, port in ports.items():
                check(port, x, want, name)
                if args.warmup > 0:
                    locust(port, path, args.warmup, args.users, workdir, f"warm-{name.split()[0]}-{rows}")
            # the servers take turns, slice by slice, so a change in the machine's load hits both alike
            for k in range(args.slices):
                order = list(ports.items()) if k % 2 == 0 else list(reversed(ports.items()))
                for name, port in order:
                    tag = f"{name.split()[0]}-{rows}-{k}"
                    seconds = args.seconds if args.requests else args.seconds / args.slices
                    slices[name][rows].append(locust(port, path, seconds, args.users, workdir, tag, args.requests))
    finally:
        for proc in procs.values():
            stop(proc)
    results: dict[str, dict[int, dict]] = {
        name: {rows: {
            "requests": sum(s["requests"] for s in parts), "failures": sum(s["failures"] for s in parts),
            "rps": float(np.nanmedian([s["rps"] for s in parts])), "p50": float(np.nanmedian([s["p50"] for s in parts])),
            "p99": float(np.nanmedian([s["p99"] for s in parts])), "slices": parts,
        } for rows, parts in by_rows.items()}
        for name, by_rows in slices.items()
    }  # fmt: skip

    ours, naive = results["fedlinear serve"], results["naive TF per request"]
    amount = f"{args.requests} requests per slice" if args.requests else f"{args.seconds:g} s per case and server"
    print(f"\nserving benchmark: d = {d}, {args.users} locust users, {amount} in "
          f"{args.slices} interleaved slices (medians shown), loopback, "
          f"{os.cpu_count()} cores (client and server on one machine)\n")  # fmt: skip
    header = f"{'rows':>5}  {'server':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'failed':>7}"
    print(header)
    print("-" * len(header))
    for rows in payloads:
        for name in results:
            r = results[name][rows]
            print(f"{rows:>5}  {name:<22} {r['rps']:>9.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['requests']:>9d} {r['failures']:>7d}")
        print(f"{'':>5}  {'ratio (fedlinear/naive)':<22} {ours[rows]['rps'] / naive[rows]['rps']:>8.2f}x "
              f"{ours[rows]['p50'] / naive[rows]['p50']:>7.2f}x {ours[rows]['p99'] / naive[rows]['p99']:>7.2f}x")  # fmt: skip
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "serving.json"), "w") as handle:
            json.dump({"args": vars(args), "results": {k: {str(r): v for r, v in res.items()} for k, res in results.items()}},
                      handle, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
