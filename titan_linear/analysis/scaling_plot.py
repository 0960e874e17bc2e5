"""The scaling-law figures, drawn from the result JSON of titan_linear.analysis.scaling alone.

- loss_vs_tokens.png: each run's loss against D, coloured by N, and the fitted L(N, D) for
  each N; one line style per family.
- isoflop.png: loss against N in each equal-compute group (colour: C), the group's parabola
  and its minimum (a filled star inside the group's N range, a hollow one when extrapolated).
- compute_optimal.png: N_opt(C) and D_opt(C) of each family's law (band: the bootstrap
  interval at each budget) with the IsoFLOP minima as points.
"""

import os

import numpy as np

from titan_linear.analysis.scaling_fit import Law
from titan_linear.eval.report import pyplot, save_figure

STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
MAX_CURVES = 6  # fitted curves per family in loss_vs_tokens.png


def _law(fam: dict) -> Law:
    f = fam["fit"]
    return Law(E=f["E"], A=f["A"], B=f["B"], alpha=f["alpha"], beta=f["beta"])


def _log_norm(plt, values):
    v = np.log10(np.asarray(values, float))
    lo, hi = v.min(), v.max()
    return plt.Normalize(lo, hi if hi > lo else lo + 1)


def _family_legend(ax, families, extra=()):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", linestyle=STYLES[j % 4], marker=MARKERS[j % 6], label=f)
               for j, f in enumerate(families)]
    ax.legend(handles=handles + list(extra), fontsize=8, title="family", title_fontsize=8)


def _finish_loss_axes(plt, fig, ax, xlabel: str, colour: tuple, families, path: str, title: str) -> None:
    """Log x axis, loss on y, the colour bar (`colour` = (norm, cmap, label)), the family legend; saved."""
    norm, cmap, label = colour
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label)
    _family_legend(ax, list(families))
    save_figure(plt, fig, path, title)


def loss_vs_tokens(plt, result: dict, path: str) -> None:
    fams = result["families"]
    all_n = [r["n_params"] for fam in fams.values() for r in fam["runs"]]
    norm, cmap = _log_norm(plt, all_n), plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for j, (name, fam) in enumerate(fams.items()):
        law = _law(fam)
        runs = fam["runs"]
        d_all = np.array([r["tokens"] for r in runs])
        grid = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
        sizes = sorted({r["n_params"] for r in runs})
        for r in runs:
            ax.scatter([r["tokens"]], [r["loss"]], color=cmap(norm(np.log10(r["n_params"]))),
                       marker=MARKERS[j % 6], s=22, zorder=3)
        # An IsoFLOP design gives every run its own N: draw the law at a few sizes spanning them.
        if len(sizes) > MAX_CURVES:
            sizes = np.geomspace(sizes[0], sizes[-1], MAX_CURVES)
        for n in sizes:
            ax.plot(grid, law.loss(n, grid), color=cmap(norm(np.log10(n))), linestyle=STYLES[j % 4], linewidth=1.2)
    _finish_loss_axes(plt, fig, ax, "training tokens D", (norm, cmap, "log10 N (non-embedding parameters)"), fams,
                      path, "runs and the fitted L(N, D) = E + A/N^alpha + B/D^beta")


def isoflop_curves(plt, result: dict, path: str) -> None:
    fams = result["families"]
    all_c = [g["flops"] for fam in fams.values() for g in fam["isoflop"]["groups"]]
    norm, cmap = _log_norm(plt, all_c), plt.get_cmap("plasma")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for j, (name, fam) in enumerate(fams.items()):
        runs = fam["runs"]
        for g in fam["isoflop"]["groups"]:
            if g["coeffs"] is None:
                continue
            colour = cmap(norm(np.log10(g["flops"])))
            n = np.array([runs[i]["n_params"] for i in g["runs"]])
            loss = np.array([runs[i]["loss"] for i in g["runs"]])
            ax.scatter(n, loss, color=colour, marker=MARKERS[j % 6], s=22, zorder=3)
            x = np.linspace(np.log(n.min()) - 0.2, np.log(n.max()) + 0.2, 100)
            p0, p1, p2 = g["coeffs"]
            ax.plot(np.exp(x), p0 + p1 * x + p2 * x * x, color=colour, linestyle=STYLES[j % 4], linewidth=1.1)
            if g["n_star"] is not None:
                ax.scatter([g["n_star"]], [g["loss_star"]], marker="*", s=140, zorder=4, edgecolors=colour,
                           facecolors=colour if g["inside"] else "none")
    _finish_loss_axes(plt, fig, ax, "N (non-embedding parameters)", (norm, cmap, "log10 C (training FLOPs)"), fams,
                      path, "IsoFLOP curves: parabola in ln N per compute group, minima starred")


def compute_optimal(plt, result: dict, path: str) -> None:
    fams = result["families"]
    budgets = [b for fam in fams.values() for b in (r["flops"] for r in fam["compute_optimal"]["budgets"])]
    budgets += [r["flops"] for fam in fams.values() for r in fam["runs"]]
    grid = np.geomspace(min(budgets), max(budgets), 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for j, (name, fam) in enumerate(fams.items()):
        law, k = _law(fam), fam["compute"]["k"]
        colour = plt.get_cmap("tab10")(j % 10)
        n_opt, d_opt = law.optimum(grid, k)
        table = fam["compute_optimal"]["budgets"]
        stars = [g for g in fam["isoflop"]["groups"] if g["inside"]]
        for ax, curve, key, star in ((axes[0], n_opt, "n_opt", "n_star"), (axes[1], d_opt, "d_opt", "d_star")):
            ax.plot(grid, curve, color=colour, linestyle=STYLES[j % 4], label=f"{name} (law, k = {k:.2f})")
            band = [(r["flops"], *r[f"{key}_interval"]) for r in table
                    if r.get(f"{key}_interval") and r[f"{key}_interval"][0] is not None]
            if len(band) > 1:
                c, lo, hi = zip(*band)
                ax.fill_between(c, lo, hi, color=colour, alpha=0.15, linewidth=0)
            if stars:
                ax.scatter([g["flops"] for g in stars], [g[star] for g in stars], color=colour,
                           marker=MARKERS[j % 6], zorder=3, label=f"{name} (IsoFLOP minima)")
    for ax, what in zip(axes, ("N_opt (non-embedding parameters)", "D_opt (tokens)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    save_figure(plt, fig, path, "compute-optimal allocation under C = k N D")


def plot_all(result: dict, folder: str) -> list[str]:
    """Write the three PNGs into `folder`; returns their paths."""
    plt = pyplot("--plot-dir")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, draw in (("loss_vs_tokens", loss_vs_tokens), ("isoflop", isoflop_curves),
                       ("compute_optimal", compute_optimal)):
        paths.append(os.path.join(folder, f"{name}.png"))
        draw(plt, result, paths[-1])
    return paths
