"""``fedlinear predict``: predictions of an exported SavedModel for a CSV file."""

from __future__ import annotations

import argparse
import sys

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.cli.options import abs_uri


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from fedlinear.common.csvio import load_matrix
    from fedlinear.common.export import load_savedmodel

    matrix, _, _ = load_matrix(abs_uri(args.input) if not storage.is_s3(args.input) else args.input, args.header)
    predict, num_features = load_savedmodel(abs_uri(args.model))
    width = matrix.shape[1]
    if width == num_features:
        x, y = matrix, None
    elif width == num_features + 1:
        x, y = matrix[:, :-1], matrix[:, -1]
    else:
        raise FedLinearError(
            f"{args.input}: has {width} columns; the model takes {num_features} features "
            f"(give {num_features} feature columns, optionally followed by the target)"
        )
    pred = predict(x).reshape(-1)
    text = "\n".join(f"{v:.9g}" for v in pred) + "\n"
    if args.output:
        storage.write_text(abs_uri(args.output), text)
        print(f"wrote {len(pred)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if y is not None:
        print(f"MSE against the last column: {float(np.mean((pred - y) ** 2)):.6g}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedlinear predict``."""
    predict = sub.add_parser("predict", help="predict with an exported SavedModel")
    predict.add_argument("--model", required=True, help="RUN_DIR/model (local or s3://)")
    predict.add_argument("--input", required=True, help="CSV of d features (a trailing target column is allowed)")
    predict.add_argument("--output", help="write predictions here instead of stdout")
    predict.add_argument("--header", choices=("auto", "yes", "no"), default="auto")
    predict.set_defaults(func=cmd_predict)
