"""What a sweep writes: ``sweep.csv`` (one row per run), ``sweep.md`` (per noise level) and ``sweep.png``."""

from __future__ import annotations

import csv
import math
import os
import statistics
import textwrap
from collections.abc import Iterable
from typing import Any

from fedlinear.scripts.experiments.sweep.settings import Settings, noise_label

CSV_FIELDS = ("noise", "seed", "status", "epsilon", "delta", "test-mse", "mse-ratio", "reference-test-mse",
              "rounds", "stopped", "wall-s", "resumed", "run-dir", "error")  # fmt: skip


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per noise level: runs, completed, ratio mean/std/min/max over seeds, epsilon, delta."""
    by_noise: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        by_noise.setdefault(float(row["noise"]), []).append(row)
    out = []
    for noise in sorted(by_noise):
        group = by_noise[noise]
        ok = [r for r in group if r.get("status") == "completed"]
        ratios = [r["mse-ratio"] for r in ok if r.get("mse-ratio") is not None]
        mses = [r["test-mse"] for r in ok if r.get("test-mse") is not None]
        eps = [r["epsilon"] for r in ok if r.get("epsilon") is not None]
        deltas = sorted({r["delta"] for r in ok if r.get("delta") is not None})
        walls = [r["wall-s"] for r in group if r.get("wall-s") is not None and r.get("status") == "completed"]
        level: dict[str, Any] = {
            "noise": noise,
            "private": noise > 0,
            "runs": len(group),
            "completed": len(ok),
            "failed": len(group) - len(ok),
            "ratio-n": len(ratios),
            "ratio-mean": statistics.fmean(ratios) if ratios else None,
            "ratio-std": statistics.stdev(ratios) if len(ratios) >= 2 else None,
            "ratio-min": min(ratios) if ratios else None,
            "ratio-max": max(ratios) if ratios else None,
            "test-mse-mean": statistics.fmean(mses) if mses else None,
            "epsilon": statistics.fmean(eps) if eps else None,
            "epsilon-min": min(eps) if eps else None,
            "epsilon-max": max(eps) if eps else None,
            "deltas": deltas,
            "wall-s-mean": statistics.fmean(walls) if walls else None,
        }
        out.append(level)
    return out


def _g(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def _eps_cell(level: dict[str, Any]) -> str:
    if not level["private"]:
        return "∞ (no DP)"
    if level["epsilon"] is None:
        return "-"
    lo, hi = level["epsilon-min"], level["epsilon-max"]
    if hi - lo > 1e-9 * max(1.0, abs(hi)):
        return f"{level['epsilon']:.4g} ({lo:.4g}-{hi:.4g})"
    return f"{level['epsilon']:.4g}"


def delta_label(levels: list[dict[str, Any]]) -> str:
    deltas = sorted({d for lv in levels for d in lv["deltas"]})
    if not deltas:
        return "δ: -"
    return "δ = " + ", ".join(f"{d:.3g}".replace("e-0", "e-").replace("e+0", "e+") for d in deltas)


def markdown_table(levels: list[dict[str, Any]], title: str = "") -> str:
    """The per-noise-level table (GitHub Markdown)."""
    lines = []
    if title:
        lines += [title, ""]
    lines += [
        f"| noise z | final ε ({delta_label(levels)}) | runs completed | MSE / LS mean | std | min | max "
        "| test MSE mean | wall s mean |",
        "| ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        lines.append(
            f"| {noise_label(lv['noise'])} | {_eps_cell(lv)} | {lv['completed']}/{lv['runs']} "
            f"| {_g(lv['ratio-mean'], '.5g')} | {_g(lv['ratio-std'], '.3g')} | {_g(lv['ratio-min'], '.5g')} "
            f"| {_g(lv['ratio-max'], '.5g')} | {_g(lv['test-mse-mean'], '.5g')} | {_g(lv['wall-s-mean'], '.1f')} |"
        )
    lines += [
        "",
        "MSE / LS: final test MSE over the pooled least-squares test MSE (1 = the optimum); mean, sample std and "
        "min-max over the completed seeds. ε: the final ε of the run (the same for every seed unless a run stopped "
        "early; otherwise mean (min-max)). z = 0 is the non-private run (dp = none).",
    ]
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    os.replace(tmp, path)


def plot(path: str, levels: list[dict[str, Any]], title: str = "") -> bool:
    """sweep.png: MSE / LS (mean, min-max bars) against the final ε (log x); reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    private = [lv for lv in levels if lv["private"] and lv["epsilon"] is not None and lv["ratio-mean"] is not None]
    public = [lv for lv in levels if not lv["private"] and lv["ratio-mean"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ratios = [1.0]
    if private:
        xs = [lv["epsilon"] for lv in private]
        ys = [lv["ratio-mean"] for lv in private]
        lo = [lv["ratio-mean"] - lv["ratio-min"] for lv in private]
        hi = [lv["ratio-max"] - lv["ratio-mean"] for lv in private]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=4, color="tab:blue",
                    label="DP runs: mean over seeds (bars: min-max)")  # fmt: skip
        for lv in private:
            ax.annotate(f"z={noise_label(lv['noise'])}", (lv["epsilon"], lv["ratio-mean"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)  # fmt: skip
        ratios += [lv["ratio-max"] for lv in private]
        ax.set_xscale("log")
    else:
        ax.set_xscale("log")
        ax.set_xlim(0.1, 100)
        ax.text(0.5, 0.5, "no completed private run with an ε", transform=ax.transAxes, ha="center", color="gray")
    if public:
        lv = public[0]
        ax.axhline(lv["ratio-mean"], color="tab:green", linestyle="--",
                   label=f"non-private (dp = none): {lv['ratio-mean']:.4g}, mean of {lv['ratio-n']}")  # fmt: skip
        if lv["ratio-max"] > lv["ratio-min"]:
            ax.axhspan(lv["ratio-min"], lv["ratio-max"], color="tab:green", alpha=0.12)
        ratios.append(lv["ratio-max"])
    ax.axhline(1.0, color="black", linestyle=":", label="optimum: pooled least squares (ratio 1)")
    if max(ratios) > 5:
        ax.set_yscale("log")
    ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(ticks)
    lo_x, hi_x = ax.get_xlim()
    few_decades = lo_x > 0 and math.log10(hi_x / lo_x) <= 2
    ax.xaxis.set_minor_formatter(ticks if few_decades else matplotlib.ticker.NullFormatter())
    if ax.get_yscale() == "log":
        lo_y, hi_y = ax.get_ylim()
        ax.yaxis.set_major_formatter(ticks)
        few = lo_y > 0 and math.log10(hi_y / lo_y) <= 1.3
        ax.yaxis.set_minor_formatter(ticks if few else matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"final ε ({delta_label(levels)}), log scale")
    ax.set_ylabel("final test MSE / pooled least-squares test MSE")
    ax.set_title("\n".join(textwrap.wrap(title or "privacy / utility", 90)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def describe_sweep(settings: Settings) -> str:
    clients = f"{settings.clients} clients" if settings.clients else "all shards"
    seeds = settings.seeds
    seed_text = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    extra = f", --set {' '.join(settings.sets)}" if settings.sets else ""
    return (f"privacy/utility sweep: {clients} x {settings.rounds} rounds, {settings.mode}, dp = {settings.dp}, "
            f"{seed_text}{extra}; data {settings.data_dir}")  # fmt: skip


def write_outputs(settings: Settings, rows: list[dict[str, Any]], final: bool) -> str:
    write_csv(os.path.join(settings.out, "sweep.csv"), rows)
    levels = aggregate(rows)
    text = markdown_table(levels, title=f"**{describe_sweep(settings)}**")
    with open(os.path.join(settings.out, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    if final:
        plot(os.path.join(settings.out, "sweep.png"), levels, title=describe_sweep(settings))
    return text
