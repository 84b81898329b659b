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


def write_csv(path: str, rows: list[dict[str, Any]], fields: tuple[str, ...] = CSV_FIELDS) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
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
    data = f"table {settings.table}" if settings.table else f"data {settings.data_dir}"
    if settings.epsilons is not None:
        names = " vs ".join(
            f"{STRATEGY_LABELS.get(s, s)}" + (f" ({settings.dp}, {settings.rounds} rounds)" if s == "fedavg" else "")
            for s in settings.strategies
        )
        return f"privacy/utility at equal ε: {names}; {clients}, {settings.mode}, {seed_text}{extra}; {data}"
    return (f"privacy/utility sweep: {clients} x {settings.rounds} rounds, {settings.mode}, dp = {settings.dp}, "
            f"{seed_text}{extra}; {data}")  # fmt: skip


# -- --epsilon: strategies side by side at equal ε -----------------------------------------------------

COMPARE_FIELDS = ("strategy", "target-epsilon", *CSV_FIELDS)
STRATEGY_LABELS = {"fedavg": "DP-FedAvg", "fedols": "DP-FedOLS"}
NEIGHBOURING = {
    "fedavg": "client-level (add/remove one party)",
    "fedols": "row-level (add/remove one row)",
}


def compare(rows: Iterable[dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """Per strategy, per target ε: the per-level summary of :func:`aggregate` (its ``noise`` is the target ε)."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_strategy.setdefault(str(row.get("strategy", "fedavg")), []).append(row)
    for strategy, group in by_strategy.items():
        levels = aggregate({**r, "noise": float(r["target-epsilon"])} for r in group)
        out[strategy] = {lv["noise"]: lv for lv in levels}
    return out


def _ratio_cell(level: dict[str, Any] | None) -> str:
    if level is None or level["ratio-mean"] is None:
        return "-" if level is None else f"- ({level['completed']}/{level['runs']})"
    spread = f" ({level['ratio-min']:.4g}-{level['ratio-max']:.4g})" if level["ratio-n"] > 1 else ""
    return f"{level['ratio-mean']:.4g}{spread}"


def compare_table(rows: list[dict[str, Any]], strategies: tuple[str, ...], title: str = "") -> str:
    """Target ε down, one column pair (MSE / LS, ε reported) per strategy, and which is better."""
    table = compare(rows)
    targets = sorted({float(r["target-epsilon"]) for r in rows})
    levels = [lv for by in table.values() for lv in by.values()]
    head = "| target ε | " + " | ".join(
        f"{STRATEGY_LABELS.get(s, s)} MSE / LS mean (min-max) | ε reported" for s in strategies
    ) + (" | better |" if len(strategies) > 1 else " |")
    lines = [title, ""] if title else []
    lines += [head, "| ---: | " + " | ".join("---: | ---:" for _ in strategies) + (" | :---: |" if len(strategies) > 1 else " |")]
    for eps in targets:
        cells, means = [], {}
        for s in strategies:
            lv = table.get(s, {}).get(eps)
            cells += [_ratio_cell(lv), _eps_cell(lv) if lv else "-"]
            if lv and lv["ratio-mean"] is not None:
                means[s] = lv["ratio-mean"]
        label = f"{eps:g}" if eps > 0 else "non-private"
        row = f"| {label} | " + " | ".join(cells)
        if len(strategies) > 1:
            best = min(means, key=means.get) if len(means) == len(strategies) else None
            label_of = STRATEGY_LABELS.get(best, best) if best else "-"
            row += f" | {label_of[3:] if eps == 0 and label_of.startswith('DP-') else label_of}"
        lines.append(row + " |")
    lines += [
        "",
        "MSE / LS: final test MSE over the pooled least-squares test MSE (1 = the optimum), mean and min-max over "
        f"the completed seeds; ε reported by each run's accountant at {delta_label(levels)} (RDP). Each run's noise "
        "multiplier is derived from the target ε (dp-target-epsilon). The guarantees differ in what a neighbour is: "
        + "; ".join(f"{STRATEGY_LABELS.get(s, s)}: {NEIGHBOURING.get(s, '?')}" for s in strategies)
        + " (neither implies the other at the same ε: a row added to a party can move its clipped update by "
        "up to 2 C, twice what adding a party does).",
    ]
    return "\n".join(lines)


def compare_plot(path: str, rows: list[dict[str, Any]], strategies: tuple[str, ...], title: str = "") -> None:
    """sweep.png for --epsilon: MSE / LS against the target ε (log-log), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = compare(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for s, colour in zip(strategies, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        levels = [lv for eps, lv in sorted(table.get(s, {}).items()) if eps > 0 and lv["ratio-mean"] is not None]
        if levels:
            xs = [lv["noise"] for lv in levels]
            ys = [lv["ratio-mean"] for lv in levels]
            err = [[lv["ratio-mean"] - lv["ratio-min"] for lv in levels], [lv["ratio-max"] - lv["ratio-mean"] for lv in levels]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, color=colour,
                        label=f"{STRATEGY_LABELS.get(s, s)} ({NEIGHBOURING.get(s, '')})")  # fmt: skip
        public = table.get(s, {}).get(0.0)
        if public and public["ratio-mean"] is not None:
            ax.axhline(public["ratio-mean"], color=colour, linestyle="--", alpha=0.6,
                       label=f"{STRATEGY_LABELS.get(s, s)[3:]} non-private: {public['ratio-mean']:.4g}")  # fmt: skip
    ax.axhline(1.0, color="black", linestyle=":", label="optimum: pooled least squares (ratio 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    import matplotlib.ticker

    targets = sorted({float(r["target-epsilon"]) for r in rows if float(r["target-epsilon"]) > 0})
    if targets:
        ax.set_xticks(targets)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("target ε (= ε reported), log scale")
    ax.set_ylabel("final test MSE / pooled least-squares test MSE")
    ax.set_title("\n".join(textwrap.wrap(title or "privacy / utility at equal ε", 90)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(settings: Settings, rows: list[dict[str, Any]], final: bool) -> str:
    if settings.epsilons is not None:
        write_csv(os.path.join(settings.out, "sweep.csv"), rows, COMPARE_FIELDS)
        text = compare_table(rows, settings.strategies, title=f"**{describe_sweep(settings)}**")
        with open(os.path.join(settings.out, "sweep.md"), "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        if final:
            compare_plot(os.path.join(settings.out, "sweep.png"), rows, settings.strategies, describe_sweep(settings))
        return text
    write_csv(os.path.join(settings.out, "sweep.csv"), rows)
    levels = aggregate(rows)
    text = markdown_table(levels, title=f"**{describe_sweep(settings)}**")
    with open(os.path.join(settings.out, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    if final:
        plot(os.path.join(settings.out, "sweep.png"), levels, title=describe_sweep(settings))
    return text
