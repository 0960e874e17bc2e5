"""Scaling-law fits of a table of runs: `python -m titan_linear.analysis.scaling`.

    python -m titan_linear.analysis.scaling --runs runs.csv --out scaling.json \\
        [--plot-dir plots/] [--predict N D [N D ...]] [--bootstrap 200] [--seed 0] \\
        [--family-key family] [--compute auto|6nd|flops] [--holdout-largest K] \\
        [--budgets C [C ...]] [--isoflop-tol 0.1] [--level 0.95] [--refine 32 | --full-grid]

The table (CSV, or JSON: a list of objects or {"runs": [...]}) has one row per run with
`n_params` (non-embedding parameters N), `tokens` (D), `loss` (nats), and optionally `flops`
(training compute C), `flops_per_token` (C = it x D), `config` (+ `overrides`: a training TOML
whose model gives the FLOPs per token, see titan_linear/analysis/flops.py) and the family
column (`--family-key`, default `family`, e.g. "ratio 0.5"). Each family is fitted on its own:

- the law L = E + A/N^alpha + B/D^beta by Chinchilla approach 3 (scaling_fit.py), with
  `--bootstrap K` resamples of the runs giving percentile intervals of every parameter;
- the compute-optimal N_opt(C), D_opt(C) under C = k N D, where k = 6 (`--compute 6nd`) or
  the median of C / (N D) over the family's runs when every run has FLOPs (`flops`; `auto`
  picks it when it can), at `--budgets` (default: each power of ten the runs span);
- the predicted loss of each `--predict N D` with a confidence and a prediction interval;
- IsoFLOP minima and the power law of N* against C (isoflop.py);
- with `--holdout-largest K`, the law refitted without the K largest-compute runs and its
  error on them.

Families are then compared: alpha, beta and N_opt's exponent beta/(alpha+beta) side by side,
with whether their intervals overlap. The JSON holds all of it; a short table is printed;
`--plot-dir` adds loss_vs_tokens.png, isoflop.png and compute_optimal.png (scaling_plot.py).
"""

import csv
import itertools
import json
import math
import os
import sys

import numpy as np

from titan_linear.analysis.isoflop import isoflop
from titan_linear.analysis.scaling_fit import (
    N_PARAMS, bootstrap, fit_law, identifiable, parameter_intervals, percentile_interval, prediction,
)
from titan_linear.cli import check_at_least, Parser, run_main, write_json

PROG = "titan_linear.analysis.scaling"
REQUIRED = ("n_params", "tokens", "loss")
OPTIONAL_NUMBERS = ("flops", "flops_per_token")
COMPUTE_MODES = ("auto", "6nd", "flops")
DEFAULT_FAMILY = "all"


def _parser():
    p = Parser(prog="python -m titan_linear.analysis.scaling", description=__doc__)
    p.add_argument("--runs", required=True, help="CSV or JSON table of runs")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--plot-dir", default=None, help="folder for the PNGs (needs matplotlib)")
    p.add_argument("--predict", type=float, nargs="+", default=[], metavar="N D",
                   help="planned runs: pairs of non-embedding parameters and tokens")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (default 200; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap (default 0)")
    p.add_argument("--family-key", default=None, help="the column naming a run's family (default 'family')")
    p.add_argument("--compute", default="auto", help="compute model: auto, 6nd or flops (default auto)")
    p.add_argument("--holdout-largest", type=int, default=0, help="fit without the K largest-compute runs of each family and score them")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="compute budgets for N_opt, D_opt (default: powers of ten spanned)")
    p.add_argument("--isoflop-tol", type=float, default=0.1, help="runs within this relative compute share a group (default 0.1)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    starts = p.add_mutually_exclusive_group()
    starts.add_argument("--refine", type=int, default=32, help="L-BFGS from this many best grid points (default 32)")
    starts.add_argument("--full-grid", action="store_true", help="L-BFGS from all 4500 grid points (slow)")
    return p


def check_args(args) -> None:
    if len(args.predict) % 2 or not all(math.isfinite(v) and v > 0 for v in args.predict):
        raise ValueError(f"--predict = {args.predict} is not allowed: pairs N D of numbers > 0")
    for flag, value, lo in (("--bootstrap", args.bootstrap, 0), ("--holdout-largest", args.holdout_largest, 0),
                            ("--refine", args.refine, 1)):
        check_at_least(flag, value, lo)
    if args.bootstrap == 1:
        raise ValueError("--bootstrap = 1 is not allowed: 0 (no intervals) or at least 2")
    if args.compute not in COMPUTE_MODES:
        raise ValueError(f"--compute = {args.compute!r} is not allowed: one of {', '.join(COMPUTE_MODES)}")
    if args.budgets is not None and not all(math.isfinite(c) and c > 0 for c in args.budgets):
        raise ValueError(f"--budgets = {args.budgets} is not allowed: numbers > 0")
    if not args.isoflop_tol >= 0:
        raise ValueError(f"--isoflop-tol = {args.isoflop_tol} is not allowed: a number >= 0")
    if not 0 < args.level < 1:
        raise ValueError(f"--level = {args.level} is not allowed: a number in (0, 1)")


def _load_rows(path: str) -> list[dict]:
    bad = f"--runs = {path!r} is not allowed"
    if not os.path.isfile(path):
        raise ValueError(f"{bad}: no such file")
    with open(path, newline="") as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{bad}: not valid JSON ({e})") from None
        rows = data.get("runs") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{bad}: JSON must be a list of objects or {{\"runs\": [objects]}}")
    else:
        rows = list(csv.DictReader(text.splitlines()))
    # An empty CSV cell or a JSON null is an absent value.
    return [{k: v for k, v in row.items() if v is not None and v != ""} for row in rows]


def _row(i: int, r: dict) -> str:
    """"row 3", or "row 3 (name 'x')" when the table names its runs (as analysis/runs.py does)."""
    return f"row {i} (name {r['name']!r})" if "name" in r else f"row {i}"


def _number(path: str, i: int, r: dict, key: str) -> float:
    value = r[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"--runs = {path!r} is not allowed: {_row(i, r)} has {key} = {value!r} "
                         f"({', '.join(REQUIRED + OPTIONAL_NUMBERS)} must be finite numbers > 0)")
    return x


def read_runs(path: str, family_key: str | None = None) -> list[dict]:
    """Rows {n_params, tokens, loss, flops (or None), family} of a CSV or JSON table.

    The family is the `family_key` column as a string; without `family_key`, the `family`
    column when the table has one, else "all". Rows count from 1. Raises ValueError naming
    `--runs` (or `--family-key`), the row and the column.
    """
    rows = _load_rows(path)
    if not rows:
        raise ValueError(f"--runs = {path!r} is not allowed: the table has no runs")
    key = family_key or "family"
    keyed = any(key in r for r in rows)
    models = {}
    runs = []
    for i, r in enumerate(rows, 1):
        for col in REQUIRED:
            if col not in r:
                raise ValueError(f"--runs = {path!r} is not allowed: {_row(i, r)} has no {col!r} "
                                 f"(every row needs {', '.join(REQUIRED)})")
        run = {col: _number(path, i, r, col) for col in REQUIRED}
        if keyed or family_key is not None:
            if key not in r:
                raise ValueError(f"--family-key = {key!r} is not allowed: {_row(i, r)} of {path!r} has no such column")
            run["family"] = str(r[key])
        else:
            run["family"] = DEFAULT_FAMILY
        run["flops"] = None
        if "flops" in r:
            run["flops"] = _number(path, i, r, "flops")
        elif "flops_per_token" in r:
            run["flops"] = _number(path, i, r, "flops_per_token") * run["tokens"]
        elif "config" in r:
            over = r.get("overrides") or []
            over = over.split() if isinstance(over, str) else [str(o) for o in over]
            cache_key = (r["config"], tuple(over))
            if cache_key not in models:
                from titan_linear.analysis.flops import model_flops

                try:
                    models[cache_key] = model_flops(str(r["config"]), over)["flops_per_token"]
                except ValueError as e:
                    raise ValueError(f"--runs = {path!r} is not allowed: {_row(i, r)}: {e}") from None
            run["flops"] = models[cache_key] * run["tokens"]
        runs.append(run)
    return runs


def compute_model(runs: list[dict], mode: str, family: str) -> dict:
    """C per run and k (FLOPs per parameter per token) for C = k N D."""
    n = np.array([r["n_params"] for r in runs])
    d = np.array([r["tokens"] for r in runs])
    have = all(r["flops"] is not None for r in runs)
    if mode == "flops" and not have:
        raise ValueError(f"--compute = 'flops' is not allowed: family {family!r} has runs without "
                         "flops, flops_per_token or config")
    if mode == "6nd" or (mode == "auto" and not have):
        return {"model": "6nd", "k": 6.0, "k_range": [6.0, 6.0], "flops": 6.0 * n * d}
    c = np.array([r["flops"] for r in runs])
    ratio = c / (n * d)
    return {"model": "flops", "k": float(np.median(ratio)), "k_range": [float(ratio.min()), float(ratio.max())], "flops": c}


def _check_fittable(path: str, runs: list[dict], family: str, what: str = "") -> None:
    n = np.array([r["n_params"] for r in runs])
    d = np.array([r["tokens"] for r in runs])
    if n.size < N_PARAMS:
        raise ValueError(f"--runs = {path!r} is not allowed: family {family!r} has {n.size} runs{what}; the law "
                         f"has {N_PARAMS} parameters, so at least {N_PARAMS} are needed")
    if not identifiable(n, d):
        raise ValueError(f"--runs = {path!r} is not allowed: family {family!r} has {len(np.unique(n))} distinct "
                         f"n_params and {len(np.unique(d))} distinct tokens{what}; the law needs at least 2 of each")


def split_largest(runs: list[dict], flops, k: int) -> tuple[list[dict], list[int]]:
    """(the runs but the k of largest compute, the indices of those k in increasing compute)."""
    held = [int(i) for i in np.argsort(flops, kind="stable")[len(runs) - k:]]
    return [r for i, r in enumerate(runs) if i not in set(held)], held


def n_opt_exponent(law) -> float:
    """a in N_opt ~ C^a: beta / (alpha + beta); NaN without an interior optimum."""
    return law.beta / (law.alpha + law.beta) if law.alpha > 0 and law.beta > 0 else float("nan")


def fit_family(runs: list[dict], opts, k: float, budgets, seed: int):
    """(the JSON of one family's law, intervals, predictions and compute-optimal allocation,
    the full-data Fit, the bootstrap laws)."""
    n, d, loss = (np.array([r[c] for r in runs]) for c in REQUIRED)
    fit = fit_law(n, d, loss, refine=None if opts.full_grid else opts.refine)
    laws = bootstrap(n, d, loss, opts.bootstrap, seed, fit.law) if opts.bootstrap else []
    law = fit.law
    out = {"fit": fit.as_dict(), "intervals": parameter_intervals(laws, opts.level) if laws else None,
           "residuals_log_loss": fit.residuals.tolist()}
    out["n_opt_exponent"] = {"value": n_opt_exponent(law), "interval":
                             percentile_interval([n_opt_exponent(lw) for lw in laws], opts.level) if laws else None}
    preds = []
    pairs = list(zip(opts.predict[0::2], opts.predict[1::2]))
    for pn, pd in pairs:
        p = prediction(fit, laws, pn, pd, opts.level)
        p["flops"] = k * pn * pd
        preds.append(p)
    out["predictions"] = preds
    table = []
    for c in budgets:
        n_opt, d_opt = (float(v) for v in law.optimum(c, k))
        row = {"flops": c, "n_opt": n_opt, "d_opt": d_opt, "loss": float(law.loss(n_opt, d_opt))
               if math.isfinite(n_opt) else None}
        if laws:
            opt = np.array([lw.optimum(c, k) for lw in laws], float)
            row["n_opt_interval"] = percentile_interval(opt[:, 0], opts.level)
            row["d_opt_interval"] = percentile_interval(opt[:, 1], opts.level)
        table.append(row)
    out["compute_optimal"] = {"k": k, "G": None if law.alpha <= 0 or law.beta <= 0 else
                              (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta)),
                              "budgets": table}
    return out, fit, laws


def holdout(runs: list[dict], flops, opts, seed: int) -> dict:
    """Refit without the `--holdout-largest` largest-compute runs; the error of its predictions on them."""
    rest, held = split_largest(runs, flops, opts.holdout_largest)
    n, d, loss = (np.array([r[c] for r in rest]) for c in REQUIRED)
    fit = fit_law(n, d, loss, refine=None if opts.full_grid else opts.refine)
    laws = bootstrap(n, d, loss, opts.bootstrap, seed + 1, fit.law) if opts.bootstrap else []
    scored = []
    for i in held:
        r = runs[i]
        p = prediction(fit, laws, r["n_params"], r["tokens"], opts.level)
        p.update(flops=float(flops[i]), actual=r["loss"], error=p["loss"] - r["loss"],
                 relative_error=(p["loss"] - r["loss"]) / r["loss"],
                 inside_pi=None if p["pi"] is None else bool(p["pi"][0] <= r["loss"] <= p["pi"][1]))
        scored.append(p)
    errors = np.array([s["error"] for s in scored])
    return {"n_held_out": len(scored), "fit": fit.as_dict(), "runs": scored,
            "rmse": float(np.sqrt(np.mean(errors ** 2))), "max_abs_error": float(np.abs(errors).max())}


def notes(res: dict, lowest_loss: float) -> list[str]:
    """What a reader of one family's fit must not miss (lowest_loss: the family's lowest run loss)."""
    out = []
    if not res["fit"]["converged"]:
        out.append(f"L-BFGS-B did not report convergence ({res['fit']['lbfgs_message']}); the fit may be loose")
    if res["fit"]["alpha"] <= 0 or res["fit"]["beta"] <= 0:
        out.append("alpha or beta <= 0: loss does not fall with N or D here; no compute-optimal size")
    if res["fit"]["E"] < 0.01 * lowest_loss:
        # Runs far from convergence fit as well with E = 0 and a shallow B/D^beta as with a real floor.
        out.append(f"E fell to its lower bound ({res['fit']['E']:.2g}): these runs do not identify the irreducible "
                   "loss, so predictions beyond them have no floor and are not to be trusted; add larger token "
                   "budgets")
    extrapolated = sum(1 for g in res["isoflop"]["groups"] if g["n_star"] is not None and not g["inside"])
    if extrapolated:
        out.append(f"{extrapolated} IsoFLOP minimum(s) outside their group's N range, left out of N*(C)")
    return out


def compare(families: dict, level: float) -> list[dict]:
    """Each pair of families: alpha, beta and N_opt's exponent, their intervals, whether they overlap."""
    out = []
    for f1, f2 in itertools.combinations(families, 2):
        row = {"families": [f1, f2]}
        for name in ("alpha", "beta", "n_opt_exponent"):
            v = []
            for f in (f1, f2):
                r = families[f]
                if name == "n_opt_exponent":
                    v.append((r[name]["value"], r[name]["interval"]))
                else:
                    v.append((r["fit"][name], r["intervals"][name]["interval"] if r["intervals"] else None))
            (a, ia), (b, ib) = v
            overlap = None if ia is None or ib is None else bool(ia[0] <= ib[1] and ib[0] <= ia[1])
            row[name] = {f1: a, f2: b, "difference": b - a, "intervals": [ia, ib], "overlap": overlap}
        out.append(row)
    return out


def default_budgets(flops) -> list[float]:
    lo, hi = math.floor(math.log10(min(flops))), math.ceil(math.log10(max(flops)))
    return [10.0 ** e for e in range(lo, max(hi, lo + 1) + 1)]


def _json_safe(x):
    """NaN / inf -> None and numpy scalars -> Python, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def analyse(runs: list[dict], opts) -> dict:
    """Everything the JSON holds, for a table of runs and the parsed options."""
    families = list(dict.fromkeys(r["family"] for r in runs))
    grouped = {f: [r for r in runs if r["family"] == f] for f in families}
    compute = {f: compute_model(rs, opts.compute, f) for f, rs in grouped.items()}
    for f, rs in grouped.items():  # every refusal before the first (slow) fit
        _check_fittable(opts.runs, rs, f)
        if opts.holdout_largest:
            rest = split_largest(rs, compute[f]["flops"], opts.holdout_largest)[0]
            _check_fittable(opts.runs, rest, f, f" left by --holdout-largest {opts.holdout_largest}")
    budgets = opts.budgets or default_budgets(np.concatenate([c["flops"] for c in compute.values()]))
    results = {}
    for j, f in enumerate(families):
        rs, cm = grouped[f], compute[f]
        seed = opts.seed + 1000 * j
        res, fit, _ = fit_family(rs, opts, cm["k"], budgets, seed)
        res = {"n_runs": len(rs), "compute": {k: v for k, v in cm.items() if k != "flops"}, **res}
        n, d, loss = (np.array([r[c] for r in rs]) for c in REQUIRED)
        res["isoflop"] = isoflop(n, d, loss, cm["flops"], cm["k"], opts.isoflop_tol)
        if opts.holdout_largest:
            res["holdout"] = holdout(rs, cm["flops"], opts, seed)
        res["notes"] = notes(res, float(loss.min()))
        res["runs"] = [{**{c: r[c] for c in REQUIRED}, "flops": float(c), "fitted_loss": float(fit.law.loss(r["n_params"], r["tokens"]))}
                       for r, c in zip(rs, cm["flops"])]
        results[f] = res
    return {"tool": PROG, "settings": {
        "runs": opts.runs, "bootstrap": opts.bootstrap, "seed": opts.seed, "level": opts.level,
        "compute": opts.compute, "family_key": opts.family_key or "family", "budgets": budgets,
        "starts": "all 4500 grid points" if opts.full_grid else f"the {opts.refine} best of the 4500 grid points",
        "huber_delta": 1e-3, "holdout_largest": opts.holdout_largest, "isoflop_tol": opts.isoflop_tol,
        "law": "L = E + A / N^alpha + B / D^beta (N non-embedding parameters, D tokens, L nats)",
    }, "families": results, "comparison": compare(results, opts.level)}


def _iv(x, iv, fmt="{:.3f}") -> str:
    s = fmt.format(x) if x is not None else "-"
    return s if not iv or iv[0] is None else f"{s} [{fmt.format(iv[0])}, {fmt.format(iv[1])}]"


def summary(result: dict) -> str:
    """The short text table the CLI prints."""
    lvl = f"{100 * result['settings']['level']:.0f}%"
    w = max(len(f) for f in [*result["families"], "family"]) + 2
    lines = [f"{'family':<{w}}{'runs':>5}  {'E':<22}{'alpha':<22}{'beta':<22}{'N_opt ~ C^a':<22}rmse(log L)"]
    for f, r in result["families"].items():
        iv = r["intervals"] or {}
        get = lambda k: (iv.get(k) or {}).get("interval")  # noqa: E731
        lines.append(f"{f:<{w}}{r['n_runs']:>5}  {_iv(r['fit']['E'], get('E')):<22}{_iv(r['fit']['alpha'], get('alpha')):<22}"
                     f"{_iv(r['fit']['beta'], get('beta')):<22}"
                     f"{_iv(r['n_opt_exponent']['value'], r['n_opt_exponent']['interval']):<22}{r['fit']['rmse_log_loss']:.4f}")
    for f, r in result["families"].items():
        iso = r["isoflop"]["n_star_law"]
        if iso:
            lines.append(f"{f}: IsoFLOP N* ~ C^{iso['exponent']:.3f} from {r['isoflop']['n_groups_used']} groups")
        else:
            lines.append(f"{f}: IsoFLOP: {r['isoflop']['n_groups_used']} compute group(s) with a minimum inside "
                         "their N range; N*(C) needs 2 (each group needs 3+ distinct N)")
        for p in r["predictions"]:
            lines.append(f"{f}: N {p['n_params']:.3g}, D {p['tokens']:.3g}: loss {_iv(p['loss'], p['ci'], '{:.4f}')}"
                         + (f", one run {lvl}: [{p['pi'][0]:.4f}, {p['pi'][1]:.4f}]" if p["pi"] else ""))
        lines += [f"{f}: note: {n}" for n in r["notes"]]
        if "holdout" in r:
            h = r["holdout"]
            lines.append(f"{f}: {h['n_held_out']} largest runs held out: rmse {h['rmse']:.4f} nats, "
                         f"max |error| {h['max_abs_error']:.4f}")
    for c in result["comparison"]:
        f1, f2 = c["families"]
        for name in ("alpha", "beta"):
            ov = {None: "no intervals", True: "intervals overlap", False: "intervals do NOT overlap"}[c[name]["overlap"]]
            lines.append(f"{f1} vs {f2}: {name} {c[name][f1]:.3f} vs {c[name][f2]:.3f} ({ov})")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check_args(args)
    if args.plot_dir is not None:
        from titan_linear.eval.report import pyplot

        pyplot("--plot-dir")  # matplotlib missing: refuse before anything is written
    runs = read_runs(args.runs, args.family_key)
    result = _json_safe(analyse(runs, args))
    write_json(args.out, result)
    if args.plot_dir is not None:
        from titan_linear.analysis.scaling_plot import plot_all

        plot_all(result, args.plot_dir)
    print(summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
