"""``fedlinear report RUN_DIR`` and ``fedlinear compare RUN_DIR...``: HTML a person can open
(:mod:`fedlinear.scripts.experiments.report`)."""

from __future__ import annotations

import argparse

from fedlinear.common import storage
from fedlinear.common.runstore import trained_rounds
from fedlinear.scripts.cli.options import abs_uri
from fedlinear.scripts.experiments import report


def cmd_report(args: argparse.Namespace) -> int:
    run = report.load_run(args.run_dir)
    out = abs_uri(args.out) if args.out else storage.join(run.uri, "report.html")
    plots = report.run_plots(run)
    pngs = report.write(out, report.report_html(run, plots), plots)
    rounds = trained_rounds(run.rows)
    initial = " and the initial model" if any(row["round"] == 0 for row in run.rows) else ""
    recorded = f"{rounds} round{'s' if rounds != 1 else ''}{initial} recorded"
    print(f"wrote {out} ({run.state}, {recorded}) and {len(pngs)} plots in {report.png_dir(out)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    runs = [report.load_run(uri) for uri in args.run_dirs]
    labels = report.legend_labels(runs)
    out = abs_uri(args.out or "compare.html")
    plots = report.compare_plots(runs, labels)
    pngs = report.write(out, report.compare_html(runs, labels, plots), plots)
    print(f"wrote {out} ({len(runs)} runs) and {len(pngs)} plots in {report.png_dir(out)}")
    return 0


def add_parser(sub) -> None:
    """Register ``fedlinear report`` and ``fedlinear compare``."""
    one = sub.add_parser("report", help="one self-contained HTML report of a run (plots, failures, config)")
    one.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (local or s3://)")
    one.add_argument("--out", help="the HTML file (default RUN_DIR/report.html); the PNGs go beside it")
    one.set_defaults(func=cmd_report)
    compare = sub.add_parser("compare", help="several runs overlaid in one HTML file")
    compare.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories (local or s3://)")
    compare.add_argument("--out", help="the HTML file (default ./compare.html); the PNGs go beside it")
    compare.set_defaults(func=cmd_compare)
