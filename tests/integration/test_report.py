"""`fedlinear report` / `fedlinear compare` and the TensorBoard scalars of every run.

Runs are real ServerApp + ClientApp runs driven in-process (tests/inprocess.py); the reports are made by
the `fedlinear` command as a subprocess and opened from disk in real headless Chromium (Debian's package,
installed here when missing) over Playwright.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Error, Message

from fedlinear.common import tboard
from tests import bounded
from tests.inprocess import Crash, crash_after, run_in_process, write_synthetic_shards
from tests.s3fixtures import bucket, moto_s3, s3env  # noqa: F401 - pytest fixtures

FEDLINEAR = os.path.join(os.path.dirname(sys.executable), "fedlinear")
XSS = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"


def fedlinear(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return bounded.run([FEDLINEAR, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def metrics_csv(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.csv")) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three in-process runs over one data set: plain FedAvg where party 1 fails round 2 with a hostile
    reason (and half the parties are sampled), central DP, and FedAvg with another seed."""
    root = tmp_path_factory.mktemp("report")
    uris, test = write_synthetic_shards(root / "data", 4, 150, 4, seed=3, test_samples=200, sizes=[150, 90, 120, 60])
    with open(root / "data" / "split.json", "w") as handle:  # a data description, rendered generically
        json.dump({"kind": "quantity", "sizes": [150, 90, 120, 60], "note": "<b>shards</b>"}, handle)
    base = {"test-uri": test, "num-server-rounds": 4, "seed": 11}
    failed_once = []

    def hostile(node_id, msg):
        if msg.metadata.message_type == "train" and node_id == 1001 and not failed_once:
            failed_once.append(node_id)
            return Message(Error(code=4001, reason=XSS), reply_to=msg)
        return None

    out = {}
    status, _ = run_in_process(uris, str(root / "fedavg"), sabotage=hostile, **base)
    assert status["status"] == "completed", status
    out["fedavg"] = str(root / "fedavg")
    from fedlinear.common.config import RunConfig
    from fedlinear.scripts.cli.run import write_local_statistics

    stats = write_local_statistics(uris, str(root / "statistics.npz"), RunConfig())  # as `fedlinear run` does under dp
    dp = {"dp": "central-server-clip", "dp-noise-multiplier": 2.0, "statistics-uri": stats}
    status, _ = run_in_process(uris, str(root / "dp"), **base, **dp)
    assert status["status"] == "completed", status
    out["dp"] = str(root / "dp")
    status, _ = run_in_process(uris, str(root / "half"), **{**base, "seed": 5, "fraction-train": 0.5})
    assert status["status"] == "completed", status
    out["half"] = str(root / "half")
    out["uris"], out["test"], out["root"] = uris, test, str(root)
    return out


@pytest.fixture(scope="module")
def reports(runs):
    """`fedlinear report` of the FedAvg and DP runs and `fedlinear compare` of all three, as subprocesses."""
    out = {}
    for name in ("fedavg", "dp"):
        proc = fedlinear("report", runs[name])
        assert proc.returncode == 0, proc.stderr
        out[name] = os.path.join(runs[name], "report.html")
    out["compare"] = os.path.join(runs["root"], "cmp.html")
    proc = fedlinear("compare", runs["fedavg"], runs["dp"], runs["half"], "--out", out["compare"])
    assert proc.returncode == 0, proc.stderr
    return out


# ----------------------------------------------------------------------------------------------
# TensorBoard scalars
# ----------------------------------------------------------------------------------------------


def assert_scalars_match_csv(run_dir: str) -> None:
    scalars = tboard.read_scalars(run_dir)
    rows = metrics_csv(run_dir)
    assert rows, "metrics.csv is empty"
    expected_tags = {c for c in rows[0] if c != "round" and any(r[c] != "" for r in rows)}
    assert set(scalars) == expected_tags
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: a step twice or out of order: {steps}"
        want = {int(r["round"]): float(r[tag]) for r in rows if r[tag] != ""}
        assert steps == sorted(want), tag
        for step, value in points:  # TensorBoard stores scalars as float32
            assert value == pytest.approx(np.float32(want[step]), rel=1e-6, abs=1e-30), (tag, step)


def test_tensorboard_scalars_equal_metrics_csv(runs):
    for name in ("fedavg", "dp", "half"):
        assert_scalars_match_csv(runs[name])
    assert "epsilon" in tboard.read_scalars(runs["dp"])


def test_tensorboard_resumed_run_has_one_point_per_round(runs, tmp_path):
    """A run that crashed mid-round (its history a round ahead of its checkpoint) and was resumed."""
    run_dir = str(tmp_path / "resumed")
    settings = {"test-uri": runs["test"], "num-server-rounds": 4, "seed": 11}
    with pytest.raises(Crash):
        run_in_process(runs["uris"], run_dir, sabotage=crash_after(2 * len(runs["uris"]) + 1), **settings)
    assert [s for s, _ in tboard.read_scalars(run_dir)["test-mse"]] == [0, 1, 2]
    # as if the process had died after writing round 3's history (and scalars) but before its checkpoint
    history = json.load(open(os.path.join(run_dir, "history.json")))
    stale = {**history["rounds"][-1], "round": 3, "test-mse": 12345.0}
    log = tboard.ScalarLog(run_dir, ("round", "test-mse"))
    log.update(history)
    log.update({"rounds": history["rounds"] + [stale]})
    with open(os.path.join(run_dir, "history.json"), "w") as handle:
        json.dump({**history, "rounds": history["rounds"] + [stale]}, handle)
    assert [s for s, _ in tboard.read_scalars(run_dir)["test-mse"]] == [0, 1, 2, 3]
    status, _ = run_in_process(runs["uris"], run_dir, **settings)
    assert status["status"] == "completed"
    assert_scalars_match_csv(run_dir)
    points = tboard.read_scalars(run_dir)["test-mse"]
    assert [s for s, _ in points] == [0, 1, 2, 3, 4] and 12345.0 not in [v for _, v in points]


def test_tensorboard_appends_then_rewrites(tmp_path):
    """Within a process rounds are appended (a running TensorBoard follows the file); a new writer
    rewrites the file from the history it is given, dropping rounds the history no longer has."""
    run_dir = str(tmp_path)
    log = tboard.ScalarLog(run_dir, ("round", "test-mse"))
    history = {"rounds": [{"round": 0, "test-mse": 4.0}]}
    log.update(history)
    size = os.path.getsize(log.uri)
    inode = os.stat(log.uri).st_ino
    history["rounds"] += [{"round": 1, "test-mse": 2.0}, {"round": 2, "test-mse": float("nan")}]
    log.update(history)
    assert os.stat(log.uri).st_ino == inode and os.path.getsize(log.uri) > size
    assert tboard.read_scalars(run_dir)["test-mse"] == [(0, 4.0), (1, 2.0)]  # NaN left out, as in metrics.csv
    tboard.ScalarLog(run_dir, ("round", "test-mse")).update({"rounds": [{"round": 0, "test-mse": 4.0}]})
    assert tboard.read_scalars(run_dir)["test-mse"] == [(0, 4.0)]


# ----------------------------------------------------------------------------------------------
# report / compare: content
# ----------------------------------------------------------------------------------------------


def test_report_content_and_escaping(runs, reports):
    out = reports["fedavg"]
    text = open(out, encoding="utf-8").read()
    assert XSS not in text and html.escape(XSS) in text  # the hostile reason, escaped
    assert "<script" not in text.lower() and "&lt;b&gt;shards&lt;/b&gt;" in text  # the data description, escaped
    assert not re.search(r"""(src|href)=["'](?!data:)""", text), "the report must not reference external files"
    pngs = sorted(os.listdir(os.path.join(runs["fedavg"], "report")))
    assert {"test-mse.png", "gap-ratio.png", "gap-excess.png", "train-loss.png", "participation.png", "shards.png"} <= set(pngs)
    assert text.count("data:image/png;base64,") == len(pngs)
    # the figures in it are the run's: final test MSE and the least-squares reference
    manifest = json.load(open(os.path.join(runs["fedavg"], "manifest.json")))
    assert f"{manifest['final']['test-mse']:.6g}" in text
    # the reference it shows is the pooled least-squares fit's test MSE (numpy lstsq on the shards)
    pooled = np.vstack([np.loadtxt(u, delimiter=",", ndmin=2) for u in runs["uris"]])
    test = np.loadtxt(runs["test"], delimiter=",", ndmin=2)
    design = np.hstack([pooled[:, :-1], np.ones((len(pooled), 1))])
    coef = np.linalg.lstsq(design, pooled[:, -1], rcond=None)[0]
    lstsq_mse = float(np.mean((test[:, :-1] @ coef[:-1] + coef[-1] - test[:, -1]) ** 2))
    shown = float(re.search(r"<td>test-mse</td><td[^>]*>([^<]+)</td>", text.split("Reference")[1]).group(1))
    assert shown == pytest.approx(lstsq_mse, rel=1e-5)


def test_participation_grid(runs):
    from fedlinear.scripts.experiments import report

    run = report.load_run(runs["fedavg"])
    people, rounds, grid = report.participation(run)
    assert [p["partition-id"] for p in people] == [0, 1, 2, 3] and rounds == [1, 2, 3, 4]
    failed = [(people[i]["partition-id"], rounds[j]) for i, row in enumerate(grid) for j, c in enumerate(row) if c == report.FAILED]
    assert len(failed) == 1 and failed[0][0] == 1  # party 1 (node 1001) failed once, in its first round
    assert all(c in (report.OK, report.FAILED) for row in grid for c in row)
    half = report.load_run(runs["half"])
    people, rounds, grid = report.participation(half)
    history = json.load(open(os.path.join(runs["half"], "history.json")))
    for j, row in enumerate(r for r in history["rounds"] if r["round"] >= 1):
        assert sum(grid[i][j] == report.OK for i in range(len(people))) == row["clients-ok"] == 2
        assert sum(grid[i][j] == report.NOT_SAMPLED for i in range(len(people))) == 2


def test_report_of_failed_and_stopped_runs(runs, tmp_path):
    """A run that failed in round 2 (every client failing) still gets a report of what is there;
    a run directory with only a status file too; a non-run is one error line."""
    def every_train_fails(node_id, msg):
        if msg.metadata.message_type == "train":
            return Message(Error(code=4001, reason="disk on fire"), reply_to=msg)
        return None

    run_dir = str(tmp_path / "failed")
    status, _ = run_in_process(runs["uris"], run_dir, sabotage=every_train_fails,
                               **{"test-uri": runs["test"], "num-server-rounds": 5, "max-failed-rounds": 2})  # fmt: skip
    assert status["status"] == "failed"
    proc = fedlinear("report", run_dir, "--out", str(tmp_path / "f.html"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "f.html").read_text()
    assert "failed" in text and "disk on fire" in text and "config unknown" in text
    assert os.path.exists(tmp_path / "f" / "participation.png")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "status.json").write_text(json.dumps({"status": "failed", "message": "no node connected"}))
    proc = fedlinear("report", str(bare))
    assert proc.returncode == 0, proc.stderr
    assert "no node connected" in (bare / "report.html").read_text()
    proc = fedlinear("report", str(tmp_path / "nothing-here"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "not a fedlinear run directory" in proc.stderr


def test_compare_content(runs, reports):
    out = reports["compare"]
    text = open(out, encoding="utf-8").read()
    for name in ("fedavg", "dp", "half"):
        assert f">{name}" in text or f"{name} (" in text
    assert "dp=central-server-clip" in text and "fraction-train" in text  # settings that differ label the runs
    assert sorted(os.listdir(os.path.join(runs["root"], "cmp"))) == ["epsilon.png", "excess.png", "ratio.png", "train-loss.png"]
    for name in ("fedavg", "dp", "half"):
        final = json.load(open(os.path.join(runs[name], "manifest.json")))["final"]
        assert f"{final['test-mse-ratio']:.6g}" in text


def test_report_and_tensorboard_on_s3(runs, s3env, bucket, tmp_path):
    """A run directory on S3 (moto_server): the scalars object is rewritten each round, the report reads
    the run through common.storage and writes the HTML and PNGs back beside it."""
    from fedlinear.common import storage

    run_dir = f"s3://{bucket}/runs/on-s3"
    status, _ = run_in_process(runs["uris"][:2], run_dir, **{"test-uri": runs["test"], "num-server-rounds": 3})
    assert status["status"] == "completed", status
    local = tmp_path / "copy"
    for name in ("metrics.csv", f"{tboard.DIR}/{tboard.FILE}"):
        os.makedirs(os.path.dirname(local / name), exist_ok=True)
        (local / name).write_bytes(storage.read_bytes(f"{run_dir}/{name}"))
    assert_scalars_match_csv(str(local))
    proc = fedlinear("report", run_dir)
    assert proc.returncode == 0, proc.stderr
    text = storage.read_text(f"{run_dir}/report.html")
    assert "on-s3" in text and text.count("data:image/png;base64,") >= 5
    assert storage.exists(f"{run_dir}/report/test-mse.png")


# ----------------------------------------------------------------------------------------------
# the browser
# ----------------------------------------------------------------------------------------------

_BROWSER: dict = {}


def chromium() -> str:
    """/usr/bin/chromium, installed with apt-get once per session when missing (root only)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if "error" in _BROWSER:
        pytest.skip(_BROWSER["error"])
    reason = None
    if os.geteuid() != 0:
        reason = "no /usr/bin/chromium and not root: cannot apt-get install chromium"
    elif not shutil.which("apt-get"):
        reason = "no /usr/bin/chromium and no apt-get"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
            except subprocess.TimeoutExpired:
                reason = f"{' '.join(argv)} timed out"
                break
            if proc.returncode != 0 and argv[1] == "install":
                reason = f"apt-get install chromium failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        if reason is None and not os.path.exists(CHROMIUM):
            reason = "apt-get installed chromium but /usr/bin/chromium is missing"
    if reason:
        _BROWSER["error"] = reason
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return CHROMIUM


# each <img>'s natural size and the standard deviation of its pixels as drawn (on white) by the browser:
# a PNG whose header decodes but whose pixels do not (a truncated file) has a size but no variance
PIXELS = """Array.from(document.images).map(i => {
  const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
  if (!c.width || !c.height) return {alt: i.alt, w: 0, h: 0, std: 0};
  const g = c.getContext('2d'); g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height); g.drawImage(i, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0, s = 0, s2 = 0;
  for (let k = 0; k < d.length; k += 4) { const v = (d[k] + d[k + 1] + d[k + 2]) / 3; s += v; s2 += v * v; n++; }
  const m = s / n; return {alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, std: Math.sqrt(Math.max(0, s2 / n - m * m))};
})"""


def render(path: str, screenshot: str) -> dict:
    """Open ``path`` from disk in headless Chromium: every <img>'s natural size and a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto("file://" + os.path.abspath(path), wait_until="load", timeout=120_000)
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=120_000)
            images = page.evaluate(PIXELS)
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.screenshot(path=screenshot, full_page=True)
            title = page.title()
        finally:
            browser.close()
    return {"images": images, "requests": requests, "title": title, "dialogs": dialogs}


def assert_not_blank(png_path: str) -> None:
    from PIL import Image

    pixels = np.asarray(Image.open(png_path).convert("L"), dtype=float)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    assert pixels.std() > 10, f"screenshot {png_path} looks blank (pixel std {pixels.std():.2f})"
    assert (pixels < 128).mean() > 0.005, "hardly any dark pixels: no text or plot lines rendered"


def check_page(html_path: str, screenshot: str, min_images: int) -> dict:
    seen = render(html_path, screenshot)
    assert len(seen["images"]) >= min_images, seen["images"]
    for image in seen["images"]:
        assert image["w"] > 0 and image["h"] > 0, f"image {image['alt']} did not render"
        assert image["std"] > 5, f"image {image['alt']} rendered blank (pixel std {image['std']:.2f})"
    assert all(url.startswith(("file://", "data:")) for url in seen["requests"]), seen["requests"]
    assert not seen["dialogs"]
    assert_not_blank(screenshot)
    return seen


def test_report_in_browser(reports, tmp_path):
    for name, plots in (("fedavg", 6), ("dp", 7)):
        seen = check_page(reports[name], str(tmp_path / f"{name}.png"), plots)
        assert name in seen["title"]
    assert "epsilon" in {i["alt"] for i in seen["images"]}  # the dp run's ε plot rendered


def test_compare_in_browser(reports, tmp_path):
    check_page(reports["compare"], str(tmp_path / "cmp.png"), 4)


def test_one_wall_time_and_the_round_count_in_summary_and_report(runs, tmp_path):
    """The summary of `fedlinear run` and the report show one wall time (manifest.json's, worded the same);
    the report counts trained rounds (round 0, the initial model, is not one); both excess MSEs are labelled."""
    from fedlinear.common.runstore import RunStore
    from fedlinear.scripts.cli.run import summary_table, wall_time_line

    store = RunStore(runs["fedavg"])
    recorded = store.read_manifest()["wall-time-s"]
    figure = f"{recorded:.1f} s (the ServerApp's, from its start to the exported model; manifest.json wall-time-s)"
    assert wall_time_line(store, 99.0) == f"wall time {figure}; fedlinear run 99.0 s in all, start-up and shutdown included"
    proc = fedlinear("report", runs["fedavg"], "--out", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    assert "(completed, 4 rounds and the initial model recorded)" in proc.stdout, proc.stdout
    assert f"<p>Wall time {html.escape(figure)}.</p>" in (tmp_path / "r.html").read_text(encoding="utf-8")
    history = store.read_history()
    header, _, *lines = summary_table(history).splitlines()
    assert "excess train MSE" in header and "excess test MSE" in header and " excess MSE" not in header
    columns = re.split(r"\s{2,}", header.strip())
    last = dict(zip(columns, re.split(r"\s{2,}", lines[-1].strip()), strict=True))
    final = history["rounds"][-1]
    assert float(last["excess train MSE"]) == pytest.approx(final["excess-train-mse"], rel=1e-3)
    assert float(last["excess test MSE"]) == pytest.approx(final["excess-test-mse"], rel=1e-3)
