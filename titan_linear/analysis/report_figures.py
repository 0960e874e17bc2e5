"""The sweep report's figures (titan_linear.analysis.report): ratio curves, placement bars, loss curves.

Every function takes pyplot from `titan_linear.eval.report.pyplot` (matplotlib imported only
there) and writes one PNG with `save_figure`. Error bars and bands are the seeds' min–max.
"""

import os

from titan_linear.analysis.report import LAYERS, PLACEMENT, RATIO, family_key
from titan_linear.eval.report import save_figure

# (column, axis label) of the ratio figure's panels.
RATIO_PANELS = (("loss", "loss (nats)"), ("tokens_per_s", "tokens/s (per device)"), ("peak_memory_gib", "peak memory (GiB)"))


def _errorbar(ax, xs, stats, **kw):
    pts = [(x, s) for x, s in zip(xs, stats) if s["mean"] is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    y = [p[1]["mean"] for p in pts]
    lo = [p[1]["mean"] - p[1]["min"] for p in pts]
    hi = [p[1]["max"] - p[1]["mean"] for p in pts]
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, **kw)


def ratio_series(groups: list[dict]) -> dict[str, list[dict]]:
    """{label: groups by ratio}: one series per placement and other settings; the groups at ratio 0
    and 1 (where placement means nothing) join every series of their settings."""
    placed = [g for g in groups if g["config"].get(RATIO) is not None and not g["config"].get(LAYERS)]
    keys = {}
    for g in placed:
        if 0 < g["config"][RATIO] < 1:
            keys.setdefault((family_key(g["config"]), g["config"].get(PLACEMENT)), []).append(g)
    if not keys:  # only ratios 0 and 1: one series per setting
        for g in placed:
            keys.setdefault((family_key(g["config"]), None), []).append(g)
    else:
        for g in placed:
            if g["config"][RATIO] in (0, 1):
                for (fk, _), members in keys.items():
                    if fk == family_key(g["config"]):
                        members.append(g)
    varying = {k for fk, _ in keys for k, v in fk if len({dict(f).get(k) for f, _ in keys}) > 1}
    series = {}
    for (fk, placement), members in keys.items():
        parts = ([str(placement)] if placement else []) + [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in fk if k in varying]
        series[", ".join(parts) or "all"] = sorted(members, key=lambda g: g["config"][RATIO])
    return series


def ratio_figure(plt, groups: list[dict], path: str) -> bool:
    series = ratio_series(groups)
    if not series:
        return False
    fig, axes = plt.subplots(1, len(RATIO_PANELS), figsize=(4.2 * len(RATIO_PANELS), 3.8))
    for ax, (col, label) in zip(axes, RATIO_PANELS):
        for name, members in series.items():
            _errorbar(ax, [g["config"][RATIO] for g in members], [g["stats"][col] for g in members], label=name)
        ax.set_xlabel("model.linear_attn_ratio")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(plt, fig, path, "ratio sweep: mean over seeds, bars = min–max")
    return True


def placement_figure(plt, placements: list[dict], path: str) -> bool:
    if not placements:
        return False
    fig, axes = plt.subplots(1, len(placements), figsize=(4 * len(placements), 3.8), squeeze=False)
    for ax, p in zip(axes[0], placements):
        gs = p["groups"]
        _errorbar(ax, range(len(gs)), [g["stats"]["loss"] for g in gs], linestyle="none")
        ax.set_xticks(range(len(gs)), [f"{g['config'].get(PLACEMENT)}\n{g['name']}" for g in gs], fontsize=6)
        ax.set_title(f"ratio {p['ratio']:g}", fontsize=9)
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3, axis="y")
    save_figure(plt, fig, path, "placement at equal ratio: mean over seeds, bars = min–max")
    return True


def mean_curve(curves: list[list]) -> tuple[list, list, list, list]:
    """(steps, mean, min, max) over the steps every curve has."""
    if not curves or not all(curves):
        return [], [], [], []
    maps = [dict((int(s), v) for s, v in c) for c in curves]
    steps = sorted(set.intersection(*(set(m) for m in maps)))
    vals = [[m[s] for m in maps] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def curves_figure(plt, groups: list[dict], path: str) -> bool:
    if not any(c["train"] for g in groups for c in g["curves"]):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for i, g in enumerate(groups):
        color = colors(i % colors.N)
        for ax, kind in zip(axes, ("train", "val")):
            steps, mean, lo, hi = mean_curve([c[kind] for c in g["curves"]])
            if steps:
                ax.plot(steps, mean, color=color, marker="o" if kind == "val" else None, markersize=3,
                        label=f"{g['name']} ({len(g['curves'])})")
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
    for ax, title in zip(axes, ("train loss", "validation loss")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats)")
    axes[0].legend(fontsize=6)
    save_figure(plt, fig, path, "mean over seeds (n), band = min–max")
    return True


def draw_all(plt, report: dict, folder: str) -> dict[str, str]:
    """Write every figure that has data into `folder`; {file name: title} of those written."""
    out = {}
    if ratio_figure(plt, report["groups"], os.path.join(folder, "ratio.png")):
        out["ratio.png"] = "loss, throughput and memory against the linear-attention ratio"
    if placement_figure(plt, report["placements"], os.path.join(folder, "placement.png")):
        out["placement.png"] = "placement at equal ratio"
    if curves_figure(plt, report["groups"], os.path.join(folder, "loss_curves.png")):
        out["loss_curves.png"] = "train and validation loss curves"
    return out
