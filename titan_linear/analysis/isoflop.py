"""IsoFLOP analysis (Hoffmann et al. 2022, approach 2): at a fixed compute budget, the loss
against log N is close to a parabola near its minimum; the minima N*(C) over several budgets
follow a power law N* = k_N C^a, whose exponent estimates how parameters should grow with
compute without assuming the form of L(N, D).

Runs are grouped by compute: sorted by C, a group takes every following run within a factor
(1 + tol) of its first run's C. Each group with at least three distinct N gets a least-squares
parabola L = p0 + p1 x + p2 x^2 in x = ln N; its minimum is x* = -p1 / (2 p2) when p2 > 0.
A minimum outside the group's range of N is an extrapolation: it is reported, flagged, and left
out of the power law.
"""

import math

import numpy as np


def group_by_compute(flops, tol: float) -> list[np.ndarray]:
    """Indices of runs in groups of roughly equal compute (each within (1 + tol) of its smallest)."""
    c = np.asarray(flops, float)
    order = np.argsort(c, kind="stable")
    groups, current = [], [order[0]]
    for i in order[1:]:
        if c[i] <= c[current[0]] * (1.0 + tol):
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    groups.append(np.array(current))
    return groups


def parabola_minimum(n, loss) -> dict:
    """Fit loss against ln n with a parabola; its minimum (n_star, loss_star), or why there is none."""
    x, y = np.log(np.asarray(n, float)), np.asarray(loss, float)
    if len(np.unique(x)) < 3:
        return {"n_star": None, "loss_star": None, "inside": False, "coeffs": None,
                "note": "fewer than 3 distinct N"}
    p2, p1, p0 = np.polyfit(x, y, 2)
    coeffs = [float(p0), float(p1), float(p2)]
    if p2 <= 0:
        return {"n_star": None, "loss_star": None, "inside": False, "coeffs": coeffs,
                "note": "not convex in ln N (no minimum)"}
    xs = -p1 / (2.0 * p2)
    inside = bool(x.min() <= xs <= x.max())
    return {"n_star": float(math.exp(xs)), "loss_star": float(p0 + p1 * xs + p2 * xs * xs),
            "inside": inside, "coeffs": coeffs,
            "note": None if inside else "minimum outside the group's N range (extrapolated)"}


def power_law(c, y) -> dict | None:
    """Least squares of ln y = ln k + a ln c: {"exponent": a, "coefficient": k}; None under two points."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    if c.size < 2 or len(np.unique(c)) < 2:
        return None
    a, lnk = np.polyfit(np.log(c), np.log(y), 1)
    return {"exponent": float(a), "coefficient": float(math.exp(lnk))}


def isoflop(n, d, loss, flops, k: float, tol: float = 0.1) -> dict:
    """Groups of equal compute, each group's parabola minimum, and N*(C), D*(C) power laws.

    Args:
        n, d, loss, flops: one value per run.
        k: FLOPs per parameter per token (C = k N D), to turn N* into D* = C / (k N*).
        tol: relative width of a compute group (default 0.1: runs within 10 %).
    """
    n, d, loss, flops = (np.asarray(v, float) for v in (n, d, loss, flops))
    groups = []
    for idx in group_by_compute(flops, tol):
        c = float(np.exp(np.mean(np.log(flops[idx]))))
        m = parabola_minimum(n[idx], loss[idx])
        d_star = None if m["n_star"] is None else c / (k * m["n_star"])
        groups.append({"flops": c, "n_runs": int(idx.size), "runs": [int(i) for i in idx],
                       "d_star": d_star, **m})
    used = [g for g in groups if g["inside"]]
    n_law = power_law([g["flops"] for g in used], [g["n_star"] for g in used])
    d_law = power_law([g["flops"] for g in used], [g["d_star"] for g in used])
    return {"tolerance": tol, "groups": groups, "n_groups_used": len(used), "n_star_law": n_law, "d_star_law": d_law}
