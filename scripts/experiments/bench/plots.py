"""The plots of ``fedlinear bench`` (matplotlib, Agg): ``ratios.png``, the table as bars (each case's wall
clock over its floor's, and each target's measured ratio over its bound), and ``scaling.png``."""

from __future__ import annotations

from typing import Any

from fedlinear.scripts.experiments.bench.cases import MODE_LABEL, GiB


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_bars(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> tuple[list, list]:
    """The bars of ``ratios.png``: (label, x floor) of every case with a floor in this invocation, and
    (label, share of the bound, status) of every judged target: measured / bound for a ``<=`` target and
    bound / measured for a ``>=`` one, so a bar at or under 1 is a target met."""
    cases = [(f"{r['label']} {MODE_LABEL[r['mode']]} {r['clients']}x{r['rounds']}", r["x-floor"])
             for r in rows if r.get("ok") and r.get("x-floor")]  # fmt: skip
    judged = []
    for t in targets:
        if t.get("ratio") is None or not t.get("limit"):
            continue
        share = t["ratio"] / t["limit"] if t["bound"].startswith("<=") else t["limit"] / t["ratio"]
        judged.append((t["target"], share, t["status"]))
    return cases, judged


def plot_ratios(path: str, rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> bool:
    """Write ``ratios.png``; False (no file) when nothing has a ratio."""
    cases, judged = ratio_bars(rows, targets)
    if not cases and not judged:
        return False
    plt = _pyplot()
    height = 2.5 + 0.4 * max(len(cases), len(judged), 1)
    fig, axes = plt.subplots(1, 2, figsize=(16, height))
    ax = axes[0]
    if cases:
        ax.barh([c[0] for c in cases], [c[1] for c in cases], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.invert_yaxis()
    ax.set_title("wall clock / the floor's (same invocation)")
    ax.set_xlabel("x floor (1 = the no-op app in Flower's engine)")
    ax.grid(True, axis="x", alpha=0.3)
    ax = axes[1]
    if judged:
        colours = ["tab:green" if j[2] == "met" else "tab:red" for j in judged]
        bars = ax.barh([j[0] for j in judged], [j[1] for j in judged], color=colours)
        ax.bar_label(bars, labels=[f"{j[1]:.2f}" for j in judged], padding=3)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlim(0, max(1.2, 1.15 * max(j[1] for j in judged)))
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no target judged: none of their cases ran at the issue's sizes", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_title("targets: measured ratio / bound (<= 1: met, green)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_scaling(path: str, rows: list[dict[str, Any]]) -> bool:
    rows = [r for r in rows if r["suite"] == "scaling" and r["ok"]]
    if not rows:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("round-s", "wall time per round (s)"), ("updates-per-s", "client updates per second"),
              ("peak-rss", "peak RSS of the process tree (GiB)")]  # fmt: skip
    for system, mode, style in (("fedlinear-numpy", "simulation", "o-"), ("floor", "simulation", "s--"),
                                ("fedlinear-numpy", "inline", "^-"), ("noop-inline", "inline", "v:")):  # fmt: skip
        series = sorted((r for r in rows if r["system"] == system and r["mode"] == mode), key=lambda r: r["clients"])
        if not series:
            continue
        xs = [r["clients"] for r in series]
        for ax, (field, title) in zip(axes, panels, strict=True):
            ys = [(r.get(field) or 0) / (GiB if field == "peak-rss" else 1) for r in series]
            ax.plot(xs, ys, style, label=f"{series[0]['label']} ({MODE_LABEL[mode]})")
            ax.set_title(title)
            ax.set_xscale("log")
            ax.set_xlabel("clients")
            ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"fedlinear vs the no-op floor, {rows[0]['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
