"""Options and argument values that several commands share."""

from __future__ import annotations

import argparse
import os

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError


def abs_uri(uri: str) -> str:
    """A local path made absolute (``~`` expanded); an ``s3://`` URI as given."""
    return uri if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


# Heterogeneous parties (common/synth.py, common/partition.py): options of `data synth` and `run`, and the summary line.
HETEROGENEITY_OPTIONS = (
    "quantity_alpha", "min_samples", "covariate_shift", "concept_spread", "noise_skew",
    "quantity_seed", "covariate_seed", "concept_seed", "noise_skew_seed",
)  # fmt: skip


def add_heterogeneity_args(parser: argparse.ArgumentParser, synth: bool = True) -> None:
    group = parser.add_argument_group("heterogeneous parties (all off by default: IID; see docs/how-to/heterogeneous-parties.md)")
    group.add_argument("--quantity-alpha", metavar="A", help="shard sizes ~ Dirichlet(A) over the total (A > 0; small A: skewed)")
    group.add_argument("--min-samples", metavar="M", help="with --quantity-alpha: every shard has at least M rows (default 10)"
                       + ("" if synth else "; with --by-column: every value's shard (default 1)"))
    group.add_argument("--quantity-seed", metavar="S", help="seed of the shard sizes (default: the data seed)")
    if not synth:
        return
    group.add_argument("--covariate-shift", metavar="S[:T]",
                       help="party feature means ~ N(0, S^2), scales ~ lognormal(0, T^2) (T default S/2)")
    group.add_argument("--concept-spread", metavar="s", help="party true weights w_k = w + N(0, s^2)")
    group.add_argument("--noise-skew", metavar="t", help="party label noise = noise * exp(t N(0, 1))")
    group.add_argument("--covariate-seed", metavar="S", help="seed of the party means and scales (default: the data seed)")
    group.add_argument("--concept-seed", metavar="S", help="seed of the party weights (default: the data seed)")
    group.add_argument("--noise-skew-seed", metavar="S", help="seed of the party noise levels (default: the data seed)")  # fmt: skip


def heterogeneity_of(args: argparse.Namespace):
    """The validated :class:`common.synth.Heterogeneity` of parsed arguments (missing ones: off)."""
    from fedlinear.common.synth import Heterogeneity

    values = {name: getattr(args, name, None) for name in HETEROGENEITY_OPTIONS}
    values["noise_seed"] = values.pop("noise_skew_seed")
    if values["min_samples"] is not None and values["quantity_alpha"] is None and getattr(args, "by_column", None) is None:
        raise FedLinearError("--min-samples goes with --quantity-alpha" + (" or --by-column" if "by_column" in args else ""))
    return Heterogeneity.parse(**values)
