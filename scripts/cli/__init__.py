"""The ``fedlinear`` command line.

    fedlinear data synth  --out DIR --clients N --samples-per-client n --features d --noise s --seed S
                          [--feature-scales LO:HI] [--feature-offsets LO:HI] [--condition-number K]
                          [--target-offset B]
    fedlinear data split  INPUT.csv --clients N --out DIR --seed S [--test-fraction f]
    fedlinear data upload DIR s3://bucket/prefix/
    fedlinear run         [--data DIR] [--clients N] [--rounds R] --out RUN_DIR [--mode processes|simulation]
                          [--set key=value ...] [--isolation auto|netns|none] [--allow-missing-parties]
                          [--target R [--stop-at-target]]
    fedlinear stop-superlink [--port 39091]   (the SuperLink `flwr run` starts for a :local: connection)
    fedlinear predict     --model RUN_DIR/model --input FILE.csv [--output FILE]
    fedlinear serve       [NAME=]MODEL... [--port 8501] [--version-policy latest|all|specific:N] [--label L=N]
                          (TF Serving REST API + KServe V2; MODEL: run dir, model dir or base path BASE/N)
    fedlinear bench       [--quick] [--only ...] [--out DIR]   (see docs/benchmarks.md)
    fedlinear report      RUN_DIR [--out FILE]        one self-contained HTML report (plots, failures, config)
    fedlinear compare     RUN_DIR... [--out FILE]     several runs overlaid in one HTML page
    fedlinear soak        [--nodes N] [--rounds R] [--out DIR] [--threshold X]   (RSS of a long run)

``DIR``/``RUN_DIR`` may be local paths or ``s3://`` URIs. Errors a user can fix print one line
(``fedlinear: error: ...``) and exit with status 1; Ctrl-C stops every process the command started.
"""

from __future__ import annotations

import argparse
import sys

from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.scripts.cli import bench, data, deploy, predict, report, run, serve, soak, stop_superlink, sweep


def build_parser() -> argparse.ArgumentParser:
    """The ``fedlinear`` parser: one sub-command (or a few) per module, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="fedlinear", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (data, run, stop_superlink, predict, serve, bench, deploy, sweep, soak, report):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedlinear.scripts.local.processes import restore_sigint_if_asked

    restore_sigint_if_asked()  # a sweep or bench that stops this command with SIGINT asked for it
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedLinearError as exc:
        first, _, detail = str(exc).partition("\n")
        print(f"fedlinear: error: {one_line(FedLinearError(first))}", file=sys.stderr)
        if detail.strip():
            print(detail.rstrip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedlinear: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except OSError as exc:  # an unwritable --out, a full disk: one line, not a traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"fedlinear: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
