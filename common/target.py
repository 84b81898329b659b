"""The user's target for the gap to the optimum (``target-mse-ratio``, ``stop-at-target``).

A round reaches the target when its test MSE / the pooled least-squares optimum's test MSE (the history
row's ``test-mse-ratio``) is at most ``target-mse-ratio``; round 0 (the initial model) never counts.
The ServerApp, ``fedlinear run`` and ``fedlinear report`` all read the outcome through these functions,
so the server log and the command line say the same thing.
"""

from __future__ import annotations

import math
from typing import Any

RATIO = "test-mse-ratio"


def _ratio(row: dict[str, Any]) -> float | None:
    value = row.get(RATIO)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of training rounds (round >= 1), in order."""
    return [row for row in rows if isinstance(row.get("round"), int) and row["round"] >= 1]


def reached(row: dict[str, Any], target: float) -> bool:
    """Whether this round's test MSE / optimum is at most ``target`` (> 0). A round that was not
    aggregated trained nothing (its row evaluates the previous model): it never reaches a target."""
    ratio = _ratio(row)
    return target > 0 and ratio is not None and ratio <= target and not row.get("not-aggregated")


def reached_at(rows: list[dict[str, Any]], target: float) -> int | None:
    """The first training round that reached ``target``, or None (also when no target is set)."""
    return next((row["round"] for row in trained(rows) if reached(row, target)), None)


def best(rows: list[dict[str, Any]]) -> tuple[int, float] | None:
    """(round, ratio) of the training round with the lowest test MSE / optimum (the first such), or None."""
    found = [(ratio, row["round"]) for row in trained(rows) if (ratio := _ratio(row)) is not None]
    if not found:
        return None
    ratio, round_ = min(found, key=lambda pair: (pair[0], pair[1]))
    return round_, ratio


def outcome(rows: list[dict[str, Any]], target: float, stop_at_target: bool) -> dict[str, Any]:
    """What history.json and manifest.json record: ``target-mse-ratio`` (0: none), ``reached-target-at``
    (a round or None) and ``stopped-at-target`` (the run ended at the round the target was reached)."""
    at = reached_at(rows, target) if target > 0 else None
    stopped = bool(stop_at_target and at is not None)
    return {"target-mse-ratio": target, "reached-target-at": at, "stopped-at-target": stopped}


def summary_lines(history: dict[str, Any], num_rounds: int | None = None) -> list[str]:
    """The plain-words outcome, e.g. ``target 1.01 x the optimum: reached at round 2, final 1.00350`` and
    ``stopped at round 2 of 5: target reached``; empty when the run had no target.

    ``num_rounds`` is the configured ``num-server-rounds`` (for "of R"); without it the manifest's is unknown
    and the line says only the round.
    """
    target = history.get("target-mse-ratio")
    if not isinstance(target, int | float) or isinstance(target, bool) or not target > 0:
        return []
    rows = trained(history.get("rounds") or [])
    at = history.get("reached-target-at", reached_at(rows, target))
    head = f"target {target:g} x the optimum"
    if at is not None:
        final = _ratio(rows[-1]) if rows else None
        lines = [f"{head}: reached at round {at}" + (f", final {final:.5f}" if final is not None else "")]
    else:
        found = best(rows)
        done = rows[-1]["round"] if rows else 0
        lines = [
            f"{head}: not reached in {done} round{'s' if done != 1 else ''}"
            + (f" (best {found[1]:.5f} at round {found[0]})" if found else "")
        ]
    if history.get("stopped-at-target") and rows:
        last = rows[-1]["round"]
        lines.append(f"stopped at round {last}" + (f" of {num_rounds}" if num_rounds else "") + ": target reached")
    return lines
