"""The ServerApp's progress lines: what a launcher (``fedlinear run``) and a person watching read.

Every line starts with ``[fedlinear]`` so a launcher can pick it out of Flower's log stream. Modules
call ``progress.say`` through this module (not a copy of the function), so one replacement of
:func:`say` sees every line the server prints.
"""

from __future__ import annotations

from typing import Any

PREFIX = "[fedlinear]"


def say(text: str) -> None:
    """A progress line: on stdout (Flower streams it) with a prefix launchers can filter on."""
    print(f"{PREFIX} {text}", flush=True)


def progress_line(row: dict[str, Any]) -> str:
    """One history row (round 0 is the initial model) as a progress line."""
    parts = [f"round {row['round']:>3}"]
    for key, label in (
        ("train-loss", "train loss"),
        ("test-mse", "test MSE"),
        ("test-mse-ratio", "/ LS"),
        ("excess-train-mse", "excess train MSE"),
        ("weight-distance", "|w - w*|"),
        ("epsilon", "ε"),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.6g}")
    parts.append(f"clients {row['clients-ok']}/{row['clients-ok'] + row['clients-failed']}")
    parts.append(f"{row['elapsed-s']:.1f} s")
    return " | ".join(parts)
