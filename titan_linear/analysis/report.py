"""The report of a sweep: `python -m titan_linear.analysis.report`.

    python -m titan_linear.analysis.report outputs/sweep [more run folders ...] --out-dir reports/sweep \\
        [--reference-group NAME] [--warmup 10] [--config TOML [-- TorchTitan overrides]]

Reads every run folder with `titan_linear.analysis.runs` (same RUN_DIR, `--config` and `--warmup`
as its CLI) and groups the runs by configuration: a run's group is run.json's `group` (the sweep
driver writes the run's name without its seed), else the name of `--config`, else its folder name;
the runs of a group are its seeds. Written to `--out-dir`:

- report.md: per group, mean ± std [min–max] (n) of the best validation loss and its step, the
  final train and validation losses, tokens/s, MFU, peak memory, and every evaluation result;
  the difference of each group's `loss` (best validation loss, or final train loss without
  validation) to its reference group in nats, with the standard error of the difference
  sqrt(s_a²/n_a + s_b²/n_b), whether it is beyond the seed spread, and a Welch t-test p-value
  (scipy); the placement comparison at equal ratio;
- report.json: the same numbers;
- ratio.png (loss, tokens/s and peak memory against model.linear_attn_ratio, error bars the
  seeds' min–max), placement.png, loss_curves.png (train and validation, the mean over seeds
  with its min–max band): these need matplotlib; without it the report says so and writes
  the markdown and JSON only.

Spread: std is the sample standard deviation (ddof = 1) over the seeds; with one seed it is
not given. Beyond the seed spread: |mean difference| exceeds both groups' max − min over their
seeds, which needs at least 2 seeds in each group (else "n/a").

At equal tokens mid-run: `--at-step N` compares the validation loss at step N instead of the best
one (runs cut before their end, or a look at the curves' early part). Every run must have
validated at step N; the steps each run did validate at are named otherwise.

Reference: `--reference-group NAME` for every group; by default, for each group, the group at
model.linear_attn_ratio = 0 whose other settings (all but ratio, placement, explicit layers
and seed) are the same, so a sweep over sizes compares each size with its own softmax model.
"""

import math
import os
import shutil
import sys
import warnings

from titan_linear.analysis.runs import (
    add_reader_flags, check_reader_flags, read_runs, table_row,
)
from titan_linear.cli import Parser, run_main, split_overrides, write_json

PROG = "titan_linear.analysis.report"
RATIO, PLACEMENT, LAYERS = "model.linear_attn_ratio", "model.linear_attn_placement", "model.linear_attn_layers"
# (column, heading, format) of the per-group table.
METRICS = (
    ("best_val_loss", "best val loss", ".4f"),
    ("best_val_step", "best val step", ".0f"),
    ("final_train_loss", "final train loss", ".4f"),
    ("final_val_loss", "final val loss", ".4f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("mfu", "MFU %", ".2f"),
    ("peak_memory_gib", "peak memory GiB", ".2f"),
)
BEYOND_RULE = ("beyond the seed spread: |mean difference| > the larger of the two groups' max − min "
               "over seeds (needs ≥ 2 seeds in each)")


def spread(values) -> dict:
    """{"n", "mean", "std" (ddof 1; None below 2 values), "min", "max"} of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(xs), "max": max(xs)}


def _is_seed(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def group_runs(runs: list[dict]) -> list[dict]:
    """The runs by `group`, ordered by (ratio, placement, name): each {"name", "runs", "seeds",
    "config" (the settings all its runs share, seeds left out), "stats", "eval"}."""
    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(r["group"], []).append(r)
    groups = []
    for name, members in by_name.items():
        shared = {k: v for k, v in members[0]["config"].items()
                  if not _is_seed(k) and all(m["config"].get(k) == v for m in members)}
        keys = sorted({k for m in members for k in m["eval"]})
        groups.append({
            "name": name, "runs": [m["name"] for m in members], "seeds": [m["seed"] for m in members],
            "config": shared, "layer_map": members[0]["layer_map"],
            "stats": {c: spread(m[c] for m in members) for c in ("loss", "tokens", "n_params", *[x[0] for x in METRICS])},
            "eval": {k: spread(m["eval"].get(k) for m in members) for k in keys},
            "loss_source": sorted({m["loss_source"] for m in members if m["loss_source"]}),
            "curves": [m["curves"] for m in members],
        })
    groups.sort(key=lambda g: (g["config"].get(RATIO) if g["config"].get(RATIO) is not None else math.inf,
                               str(g["config"].get(PLACEMENT)), g["name"]))
    return groups


def family_key(config: dict, drop=(RATIO, PLACEMENT, LAYERS)) -> tuple:
    """A group's settings minus the layer-kind keys: groups with equal keys differ only in those."""
    return tuple(sorted((k, repr(v)) for k, v in config.items() if k not in drop and not _is_seed(k)))


def reference_of(group: dict, groups: list[dict], name: str | None = None) -> dict | None:
    """`name`'s group, or the ratio-0 group with the same other settings (None when there is none)."""
    if name is not None:
        return next(g for g in groups if g["name"] == name)
    key = family_key(group["config"])
    for g in groups:
        if g["config"].get(RATIO) == 0 and not g["config"].get(LAYERS) and family_key(g["config"]) == key:
            return g
    return None


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value, or None (no scipy, fewer than 2 values, no variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    try:
        from scipy import stats
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def compare(a: dict, b: dict, runs_a: list[float], runs_b: list[float]) -> dict:
    """Group a's `loss` against group b's: difference, its standard error, the seed-spread rule, Welch's p."""
    sa, sb = a["stats"]["loss"], b["stats"]["loss"]
    out = {"group": a["name"], "reference": b["name"], "diff": None, "se": None, "range": None,
           "beyond_spread": None, "welch_p": None, "n": [sa["n"], sb["n"]]}
    if sa["mean"] is None or sb["mean"] is None:
        return out
    out["diff"] = sa["mean"] - sb["mean"]
    if sa["n"] > 1 and sb["n"] > 1:
        out["se"] = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
        out["range"] = max(sa["max"] - sa["min"], sb["max"] - sb["min"])
        out["beyond_spread"] = abs(out["diff"]) > out["range"]
        out["welch_p"] = welch_p(runs_a, runs_b)
    return out


def _fmt(s: dict, f: str) -> str:
    if s["mean"] is None:
        return "–"
    text = format(s["mean"], f)
    if s["std"] is not None:
        text += f" ± {format(s['std'], f)} [{format(s['min'], f)}–{format(s['max'], f)}]"
    return text + f" ({s['n']})"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "–" if v is None or v == [] else str(v)


def placement_rows(groups: list[dict]) -> list[dict]:
    """Groups that share every setting but placement, at the same ratio in (0, 1): one entry per
    (settings, ratio) with two placements or more."""
    sets: dict[tuple, list[dict]] = {}
    for g in groups:
        ratio = g["config"].get(RATIO)
        if ratio is not None and 0 < ratio < 1 and not g["config"].get(LAYERS):
            sets.setdefault((family_key(g["config"], drop=(PLACEMENT,)), ratio), []).append(g)
    return [{"ratio": ratio, "groups": gs} for (_, ratio), gs in sets.items()
            if len({g["config"].get(PLACEMENT) for g in gs}) > 1]


def _count(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['min']:,.0f}" if s["min"] == s["max"] else f"{s['min']:,.0f}–{s['max']:,.0f}"


def _comparison_cells(c: dict) -> str:
    num = lambda v, f=".4f": "–" if v is None else format(v, f)  # noqa: E731
    beyond = "n/a" if c["beyond_spread"] is None else ("**yes**" if c["beyond_spread"] else "no")
    return f"{num(c['diff'], '+.4f')} | {num(c['se'])} | {num(c['range'])} | {beyond} | {num(c['welch_p'], '.3g')}"


COMPARISON_HEAD = "Δ loss | ± s.e. | larger seed range | beyond seed spread | Welch p"


def markdown(rep: dict, figures: dict, notes: list[str]) -> str:
    groups = rep["groups"]
    lines = ["# Sweep report", "",
             f"{sum(len(g['runs']) for g in groups)} runs in {len(groups)} groups. Each cell: mean ± std "
             "[min–max] (n runs); std is the sample standard deviation over seeds (ddof 1). `loss` is what "
             "column `loss is` names: the best validation loss, the final train loss for runs without "
             "validation, or the validation loss at the step `--at-step` chose.", ""]
    lines += [f"_{n}_" for n in notes] + ([""] if notes else [])
    lines += ["## Groups", "", "| group | seeds | ratio | placement | layer map | n_params | tokens | loss is |",
              "|---|---|---|---|---|---:|---:|---|"]
    for g in groups:
        c = g["config"]
        lines.append(f"| {g['name']} | {', '.join(map(_value, g['seeds']))} | {_value(c.get(RATIO))} | "
                     f"{_value(c.get(PLACEMENT))} | {_value(g['layer_map'])} | {_count(g['stats']['n_params'])} | "
                     f"{_count(g['stats']['tokens'])} | {', '.join(g['loss_source']) or '–'} |")
    for title, metrics in (("Quality", METRICS[:4]), ("Speed and memory", METRICS[4:])):
        lines += ["", f"## {title}", "", "| group | " + " | ".join(h for _, h, _ in metrics) + " |",
                  "|---|" + "---:|" * len(metrics)]
        lines += [f"| {g['name']} | " + " | ".join(_fmt(g["stats"][col], f) for col, _, f in metrics) + " |"
                  for g in groups]
    lines += ["", "## Difference to the reference (loss, nats)", "",
              "Δ = mean loss of the group − mean loss of its reference; ± its standard error "
              f"sqrt(s_a²/n_a + s_b²/n_b); {BEYOND_RULE}; Welch's two-sided t-test p (scipy).", ""]
    if rep["comparisons"]:
        lines += [f"| group | reference | {COMPARISON_HEAD} |", "|---|---|---:|---:|---:|---|---:|"]
        lines += [f"| {c['group']} | {c['reference']} | {_comparison_cells(c)} |" for c in rep["comparisons"]]
    else:
        lines.append("_No reference group: no group at model.linear_attn_ratio = 0 with the same other settings "
                     "(pass --reference-group)._")
    if rep["placements"]:
        lines += ["", "## Placement at equal ratio", "",
                  "Groups that differ only in model.linear_attn_placement, best first; Δ against uniform.", ""]
        for p in rep["placements"]:
            vs = {c["group"]: c for c in p["vs_uniform"]}
            lines += [f"Ratio {p['ratio']:g}:", "", f"| placement | group | loss | best val step | {COMPARISON_HEAD} |",
                      "|---|---|---|---:|---:|---:|---:|---|---:|"]
            for g in sorted(p["groups"], key=lambda g: (g["stats"]["loss"]["mean"] is None, g["stats"]["loss"]["mean"] or 0.0)):
                cells = _comparison_cells(vs[g["name"]]) if g["name"] in vs else "– | – | – | – | –"
                lines.append(f"| {g['config'].get(PLACEMENT)} | {g['name']} | {_fmt(g['stats']['loss'], '.4f')} | "
                             f"{_fmt(g['stats']['best_val_step'], '.0f')} | {cells} |")
            lines.append("")
    # One row per result, one column per group (few groups, many results); results with two or more
    # ids (passkey per length and depth) are left to report.json and the tools' own figures.
    keys = sorted({k for g in groups for k in g["eval"] if k.partition("@")[2].count(",") < 1}, key=_by_id)
    if keys:
        lines += ["", "## Evaluation results", "",
                  "Per group: mean ± std [min–max] (n runs) of each result (`eval.<tool>.<field>@<id>`; passkey "
                  "averaged over depths; attention maps averaged over heads).", "",
                  "| result | " + " | ".join(g["name"] for g in groups) + " |", "|---|" + "---:|" * len(groups)]
        lines += [f"| {k} | " + " | ".join(_fmt(g["eval"][k], ".4g") if k in g["eval"] else "–" for g in groups) + " |"
                  for k in keys]
    if figures:
        lines += ["", "## Figures"]
        for name, title in figures.items():
            lines += ["", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"


def _by_id(key: str) -> tuple:
    """Sort `eval.<tool>.<field>@<id>` by name, then by the id as a number where it is one (512 < 2048)."""
    name, _, ident = key.partition("@")
    try:
        return name, 0, float(ident), ""
    except ValueError:
        return name, 1, 0.0, ident


def loss_at_step(runs: list[dict], step: int) -> None:
    """Set each run's `loss` to its validation loss at `step` (in place); ValueError naming the
    runs without one."""
    missing = []
    for r in runs:
        val = dict((int(s), v) for s, v in r["curves"]["val"])
        if step not in val:
            missing.append(f"{r['name']} ({', '.join(map(str, sorted(val))) or 'none'})")
            continue
        r.update(loss=val[step], loss_source=f"validation at step {step}")
    if missing:
        raise ValueError(f"--at-step = {step} is not allowed: these runs did not validate at step {step} "
                         f"(their validation steps): {'; '.join(missing)}")


def build_report(runs: list[dict], reference: str | None = None) -> dict:
    """Groups, comparisons and placement sets of `runs` (what report.json holds, curves aside)."""
    groups = group_runs(runs)
    names = [g["name"] for g in groups]
    if reference is not None and reference not in names:
        raise ValueError(f"--reference-group = {reference!r} is not allowed: one of {', '.join(names)}")
    losses = {g["name"]: [r["loss"] for r in runs if r["group"] == g["name"] and r["loss"] is not None]
              for g in groups}
    comparisons = []
    for g in groups:
        ref = reference_of(g, groups, reference)
        if ref is not None and ref is not g:
            comparisons.append(compare(g, ref, losses[g["name"]], losses[ref["name"]]))
    placements = placement_rows(groups)
    for p in placements:
        uniform = next((g for g in p["groups"] if g["config"].get(PLACEMENT) == "uniform"), None)
        p["vs_uniform"] = [compare(g, uniform, losses[g["name"]], losses[uniform["name"]])
                           for g in p["groups"] if uniform is not None and g is not uniform]
    return {"groups": groups, "comparisons": comparisons, "placements": placements}


def _parser() -> Parser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__)
    add_reader_flags(p)
    p.add_argument("--out-dir", required=True, help="the folder for report.md, report.json and the PNGs")
    p.add_argument("--reference-group", default=None, help="the group every other is compared with "
                   "(default: the ratio-0 group with the same other settings)")
    p.add_argument("--at-step", type=int, default=None, metavar="N",
                   help="compare the validation loss at step N (equal tokens) instead of the best one")
    return p


def run(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    check_reader_flags(args, overrides)
    if args.at_step is not None and args.at_step < 1:
        raise ValueError(f"--at-step = {args.at_step} is not allowed: a step >= 1")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir = {args.out_dir!r} is not allowed: it is a file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = read_runs(args.runs, config=args.config, overrides=overrides, warmup=args.warmup)
    notes = []
    if args.at_step is not None:
        loss_at_step(runs, args.at_step)
        notes.append(f"Compared at step {args.at_step} (equal tokens); the tokens column is how far each run got.")
    rep = build_report(runs, args.reference_group)
    if any(g["config"].get(RATIO) is None for g in rep["groups"]):
        notes.append("Groups without model.linear_attn_ratio (runs without run.json or --config) are left out "
                     "of the ratio figure and the placement comparison.")
    tmp = f"{os.path.abspath(args.out_dir).rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        figures = {}
        try:
            from titan_linear.analysis.report_figures import draw_all
            from titan_linear.eval.report import pyplot

            figures = draw_all(pyplot("--out-dir"), rep, tmp)
        except ValueError as e:
            if "matplotlib is not installed" not in str(e):
                raise
            notes.append("matplotlib is not installed: no figures (pip install matplotlib); markdown and JSON only.")
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(markdown(rep, figures, notes))
        write_json(os.path.join(tmp, "report.json"), {
            "tool": PROG, "runs": [table_row(r) for r in runs], "beyond_spread_rule": BEYOND_RULE,
            "groups": [{k: v for k, v in g.items() if k != "curves"} for g in rep["groups"]],
            "comparisons": rep["comparisons"],
            "placements": [{"ratio": p["ratio"], "groups": [g["name"] for g in p["groups"]],
                            "vs_uniform": p["vs_uniform"]} for p in rep["placements"]],
            "figures": list(figures), "notes": notes,
        })
        os.makedirs(args.out_dir, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(args.out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{PROG}: {len(runs)} runs in {len(rep['groups'])} groups -> {os.path.join(args.out_dir, 'report.md')}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
