"""The one reader of training runs: `python -m titan_linear.analysis.runs`.

    python -m titan_linear.analysis.runs outputs/sweep [outputs/other_run ...] \\
        --out table.csv|table.json [--warmup 10] \\
        [--config train_configs/debug_model.toml [-- TorchTitan overrides the runs were trained with]]

A run folder is a TorchTitan dump folder (`job.dump_folder`). It holds, and this reads:
- TensorBoard events under `<dump>/<metrics.save_tb_folder>/` (default `tb/`), written by
  rank 0 when `metrics.enable_tensorboard = true`, read with tensorboard's EventAccumulator;
- checkpoints `<dump>/<checkpoint.folder>/step-N` (the steps whose `.metadata` exists);
- `param_report.json` (OELM runs write it: total / trainable / frozen by component);
- evaluation results `<dump>/eval/*.json` (what `python -m titan_linear.eval.<tool> --out` writes);
- `run.json`, written by the sweep driver: {"name", "group", "base_config", "overrides", "seed"}.
  Without it the run is named after its folder and configured by `--config` plus the overrides
  after `--` (then its group is the config's file name), or by nothing (then its group is its
  name, and only param_report.json, if any, gives a parameter count).

A DIR that is not a run folder (no run.json, no tb/) is searched for run folders below it.

Numbers per run (`read_run`): the train loss curve (`loss_metrics/global_avg_loss`), the
validation curve (`validation_metrics/loss`), the best validation loss and the step of its first
occurrence, the final train and validation losses; mean tokens/s (`throughput(tps)`, TorchTitan's
per device) and MFU (`mfu(%)`) over the logged steps after the first `--warmup` steps (default
min(10, last step // 2): compilation and allocator warm-up; `tps_warmup_steps` says how many were
skipped); peak memory, the largest `memory/max_reserved(GiB)`; tokens = last step x tokens per step
(`n_tokens_seen` / its step, else global batch x seq_len of the config); `n_params` = parameters
without the token embedding and `flops_per_token` as `python -m titan_linear.analysis.flops`
counts them (its `count_model`: the model built on the meta device from the config), else
n_params from param_report.json; `flops` = FLOPs per token x tokens; `loss` = the best
validation loss, or the final train loss when nothing was validated (`loss_source` says which).
A resumed run's events (a later events file starting at step s) replace earlier ones from step s on.
Evaluation results are flattened to `eval.<file stem>.<metric>@<length>`, e.g.
`eval.perplexity.loss@2048`, `eval.passkey.exact_match@1024,0.5` (length, depth).

Output: `--out table.json` (a list of runs, each with its curves) or `table.csv` (one row per run:
the fixed columns of `FIXED_COLUMNS` first, then config keys and eval results sorted by name).
"""

import csv
import glob
import io
import json
import math
import os
import re
import sys
import warnings

from titan_linear.analysis.flops import count_model
from titan_linear.analysis.sweep_spec import cli_args
from titan_linear.cli import check_at_least, Parser, run_main, split_overrides, write_json, write_text
from titan_linear.config_errors import is_number

PROG = "titan_linear.analysis.runs"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The scalar tags TorchTitan 0.2.2 writes (components/metrics.py, train.py's extra metrics).
TAG_LOSS = "loss_metrics/global_avg_loss"
TAG_VAL_LOSS = "validation_metrics/loss"
TAG_TPS = "throughput(tps)"
TAG_MFU = "mfu(%)"
TAG_MEMORY = "memory/max_reserved(GiB)"
TAG_TOKENS = "n_tokens_seen"
DEFAULT_WARMUP = 10

FIXED_COLUMNS = (
    "name", "group", "family", "seed", "loss", "loss_source", "n_params", "tokens", "flops",
    "best_val_loss", "best_val_step", "final_val_loss", "final_train_loss", "steps", "steps_planned",
    "tokens_per_s", "mfu", "peak_memory_gib", "tps_warmup_steps", "tokens_per_step", "seq_len",
    "global_batch_size", "n_params_total", "flops_per_token", "layer_map", "last_checkpoint", "path",
)
# Resolved settings every parsed config contributes to the table (beside the run's overrides).
CONFIG_KEYS = (
    "model.name", "model.flavor", "model.linear_attn_ratio", "model.linear_attn_placement",
    "model.linear_attn_layers", "training.steps", "training.seq_len", "training.local_batch_size",
    "training.global_batch_size", "optimizer.lr", "debug.seed",
)
# Per evaluation tool, the fields worth a column (other tools: every number of each record).
EVAL_FIELDS = {"perplexity": ("loss", "perplexity"), "passkey": ("exact_match", "key_logprob_per_digit"),
               "attention_maps": ("entropy", "mean_distance", "first_token_mass", "diagonal_mass")}
EVAL_IDS = ("seq_len", "length", "depth", "kv_pairs", "layer_map", "task", "layer")
# Also averaged over the later ids, one column per first id (passkey: per length, over depths).
EVAL_MEANS = {"passkey": "length"}


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ---- TensorBoard events ---------------------------------------------------------------------

def event_files(tb_dir: str) -> list[str]:
    """The events files of one run's TensorBoard folder: those not under `rank_N/`, or, when every
    file is (metrics.save_for_all_ranks), the lowest rank's."""
    files = glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)
    ranked = {}
    for f in files:
        m = re.search(r"(?:^|/)rank_(\d+)(?:/|$)", os.path.relpath(os.path.dirname(f), tb_dir))
        ranked.setdefault(int(m.group(1)) if m else -1, []).append(f)
    return sorted(ranked[min(ranked)]) if ranked else []


def read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)] by step} from every events file under `tb_dir`.

    Files are taken in the order their first event was written; a file whose first step is s
    (a resumed or restarted run) replaces what earlier files hold from step s on.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    loaded = []
    for path in event_files(tb_dir):
        acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0})
        acc.Reload()
        series = {t: [(e.wall_time, e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        events = [e for s in series.values() for e in s]
        if events:
            loaded.append((min(e[0] for e in events), min(e[1] for e in events), series))
    merged: dict[str, dict[int, float]] = {}
    for _, first_step, series in sorted(loaded, key=lambda x: x[0]):
        for tag in merged:
            merged[tag] = {s: v for s, v in merged[tag].items() if s < first_step}
        for tag, events in series.items():
            merged.setdefault(tag, {}).update({step: value for _, step, value in events})
    return {tag: sorted(points.items()) for tag, points in merged.items() if points}


def curve_summary(scalars: dict, warmup: int | None = None) -> dict:
    """The numbers of one run's scalars (see the module docstring); None where a tag is missing."""
    train = scalars.get(TAG_LOSS, [])
    val = scalars.get(TAG_VAL_LOSS, [])
    last = max((s for tag in (TAG_LOSS, TAG_TPS, TAG_TOKENS) for s, _ in scalars.get(tag, [])), default=None)
    out = {
        "steps": last,
        "final_train_loss": train[-1][1] if train else None,
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": None, "best_val_step": None,
        "tokens_per_s": None, "mfu": None, "tps_warmup_steps": None, "peak_memory_gib": None,
        "tokens_per_step": None,
    }
    if val:
        best_step, best = min(val, key=lambda p: (p[1], p[0]))
        out.update(best_val_loss=best, best_val_step=best_step)
    if last is not None:
        skip = min(DEFAULT_WARMUP, last // 2) if warmup is None else warmup
        out["tps_warmup_steps"] = skip
        tps = [v for s, v in scalars.get(TAG_TPS, []) if s > skip]
        mfu = [v for s, v in scalars.get(TAG_MFU, []) if s > skip]
        out["tokens_per_s"] = sum(tps) / len(tps) if tps else None
        out["mfu"] = sum(mfu) / len(mfu) if mfu else None
    memory = [v for _, v in scalars.get(TAG_MEMORY, [])]
    out["peak_memory_gib"] = max(memory) if memory else None
    tokens = scalars.get(TAG_TOKENS, [])
    if tokens and tokens[-1][0] > 0:
        out["tokens_per_step"] = round(tokens[-1][1] / tokens[-1][0])
    return out


# ---- configuration ----------------------------------------------------------------------------

def find_config(path: str, run_dir: str) -> str | None:
    """run.json's base_config: as given, else relative to the run folder, else to the repository."""
    for candidate in (path, os.path.join(run_dir, path), os.path.join(ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    return None


_CONFIG_CACHE: dict = {}


def config_summary(config: str, overrides: list[str]) -> dict:
    """What the run's config fixes: CONFIG_KEYS' values, the layer map, sequence length, global
    batch (None when it depends on the world size), parameter counts and FLOPs per token.

    Raises ValueError (naming the key) when the config does not parse."""
    key = (os.path.abspath(config), tuple(overrides))
    if key in _CONFIG_CACHE:
        return _CONFIG_CACHE[key]
    from titan_linear.inference.build import parse_job_config

    job, model_args = parse_job_config(config, overrides)
    counts = count_model(job, model_args)
    values = {}
    for k in CONFIG_KEYS:
        section, name = k.split(".")
        value = getattr(getattr(job, section, None), name, None)
        values[k] = list(value) if isinstance(value, tuple) else value
    values["model.n_layers"], values["model.dim"] = model_args.n_layers, model_args.dim
    if job.model.name == "llama3_oelm":
        values["model.oelm_freeze"], values["model.freeze_ratio"] = job.model.oelm_freeze, job.model.freeze_ratio
    t = job.training
    dp = job.parallelism.data_parallel_shard_degree * job.parallelism.data_parallel_replicate_degree
    global_batch = t.global_batch_size if t.global_batch_size > 0 else (t.local_batch_size * dp if dp > 0 else None)
    out = {
        "config": values, "layer_map": counts["layer_map"],
        "seq_len": t.seq_len, "global_batch_size": global_batch, "steps_planned": t.steps,
        "n_params": counts["non_embedding"], "n_params_total": counts["nparams"],
        "flops_per_token": counts["flops_per_token"],
        "tb_folder": job.metrics.save_tb_folder, "checkpoint_folder": job.checkpoint.folder,
    }
    _CONFIG_CACHE[key] = out
    return out


def family_of(config: dict) -> str | None:
    """The layer-kind recipe, independent of size and budget: what a scaling law is fitted per."""
    name = config.get("model.name")
    if name is None:
        return None
    ratio = config.get("model.linear_attn_ratio") or 0.0
    parts = [name]
    if config.get("model.linear_attn_layers"):
        parts.append("layers=" + ",".join(map(str, config["model.linear_attn_layers"])))
    else:
        parts.append(f"ratio={ratio:g}")
        if 0 < ratio < 1:
            parts.append(str(config.get("model.linear_attn_placement")))
    if config.get("model.oelm_freeze") is not None:
        parts.append(f"freeze={config['model.oelm_freeze']}")
    return " ".join(parts)


# ---- evaluation results ----------------------------------------------------------------------

def _number(v) -> bool:
    return is_number(v) and math.isfinite(v)


def _id_text(value) -> str:
    """An id as a column name holds it: 0.5, 1024, SLSL."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def flatten_eval(doc, stem: str) -> dict:
    """One evaluation JSON as {"eval.<stem>.<metric>@<ids>": number} (see the module docstring)."""
    tool = str(doc.get("tool", stem)).rsplit(".", 1)[-1] if isinstance(doc, dict) else stem
    results = doc.get("results", doc) if isinstance(doc, dict) else doc
    if tool == "attention_maps" and isinstance(doc, dict) and isinstance(doc.get("layers"), list):
        # Per layer, its statistics averaged over heads (the per-head values stay in the JSON).
        results = [{"layer": rec.get("layer"), **rec.get("mean", {})} for rec in doc["layers"] if isinstance(rec, dict)]
    out = {}
    if isinstance(results, list):
        by = EVAL_MEANS.get(tool)
        means: dict[str, list] = {}
        for rec in results:
            if not isinstance(rec, dict):
                continue
            ids = [rec[k] for k in EVAL_IDS if k in rec]
            suffix = "@" + ",".join(_id_text(v) for v in ids) if ids else ""
            for field in EVAL_FIELDS.get(tool, rec.keys()):
                if field not in EVAL_IDS and _number(rec.get(field)):
                    out[f"eval.{stem}.{field}{suffix}"] = rec[field]
                    if by is not None and by in rec:
                        means.setdefault(f"eval.{stem}.{field}@{_id_text(rec[by])}", []).append(rec[field])
        out.update({k: sum(v) / len(v) for k, v in means.items() if k not in out})
    elif isinstance(results, dict):
        def walk(prefix, node):
            for k, v in node.items():
                k = str(k).removesuffix(",none")  # lm-eval's "acc,none": the metric without a filter
                if isinstance(v, dict):
                    walk(f"{prefix}.{k}", v)
                elif _number(v):
                    out[f"{prefix}.{k}"] = v
        walk(f"eval.{stem}", results)
    return out


def eval_results(run_dir: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            _warn(f"{path}: not read ({e})")
            continue
        out.update(flatten_eval(doc, os.path.splitext(os.path.basename(path))[0]))
    return out


# ---- one run, many runs ----------------------------------------------------------------------

def checkpoint_steps(folder: str) -> list[int]:
    """The steps of `folder`'s complete DCP checkpoints (those with `.metadata`), ascending."""
    steps = []
    for d in glob.glob(os.path.join(folder, "step-*")):
        m = re.fullmatch(r"step-(\d+)", os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, ".metadata")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _load_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"RUN_DIR = {os.path.dirname(path)!r} is not allowed: its {os.path.basename(path)} "
                         f"is not JSON ({e})") from None


def read_run(run_dir: str, config: str | None = None, overrides=None, warmup: int | None = None) -> dict:
    """Everything one run folder says, as a plain dict: FIXED_COLUMNS' keys, "config" (its
    settings), "eval" (flattened results) and "curves" {"train", "val": [[step, loss]]}.

    `config` / `overrides` configure a run without run.json; run.json's base_config and overrides
    take precedence. `warmup`: logged steps skipped for tokens/s and MFU (default min(10, last // 2)).
    """
    run_dir = os.path.abspath(run_dir)
    meta = _load_json(os.path.join(run_dir, "run.json")) or {}
    name = meta.get("name") or os.path.basename(run_dir)
    overrides = cli_args(meta.get("overrides", overrides or []))
    if meta.get("base_config"):
        config = find_config(meta["base_config"], run_dir)
        if config is None:
            _warn(f"{run_dir}/run.json: base_config {meta['base_config']!r} not found; no config read")
    summary = {}
    if config is not None:
        try:
            summary = config_summary(config, overrides)
        except ValueError as e:
            _warn(f"{run_dir}: its config does not parse ({e}); no config read")
    settings = dict(summary.get("config", {}))
    if isinstance(meta.get("overrides"), dict):
        settings.update(meta["overrides"])

    scalars = read_scalars(os.path.join(run_dir, summary.get("tb_folder", "tb")))
    row = dict.fromkeys(FIXED_COLUMNS)
    row.update(curve_summary(scalars, warmup))
    for k in ("seq_len", "global_batch_size", "steps_planned", "n_params", "n_params_total",
              "flops_per_token", "layer_map"):
        row[k] = summary.get(k)
    report = _load_json(os.path.join(run_dir, "param_report.json"))
    if report:
        row["n_params_total"] = report["total"]
        if row["n_params"] is None:
            row["n_params"] = report["total"] - report["components"].get("embeddings", {}).get("total", 0)
        row.update(params_trainable=report["trainable"], params_frozen=report["frozen"])
    if row["tokens_per_step"] is None and row["global_batch_size"] and row["seq_len"]:
        row["tokens_per_step"] = row["global_batch_size"] * row["seq_len"]
    if row["steps"] is not None and row["tokens_per_step"] is not None:
        row["tokens"] = row["steps"] * row["tokens_per_step"]
    if row["tokens"] is not None and row["flops_per_token"] is not None:
        row["flops"] = row["tokens"] * row["flops_per_token"]
    if row["best_val_loss"] is not None:
        row.update(loss=row["best_val_loss"], loss_source="best validation")
    elif row["final_train_loss"] is not None:
        row.update(loss=row["final_train_loss"], loss_source="final train")
    ckpt = checkpoint_steps(os.path.join(run_dir, summary.get("checkpoint_folder", "checkpoint")))
    seed = meta.get("seed")
    if seed is None:
        seed = next((v for k, v in settings.items() if k.endswith(".seed")), None)
    group = meta.get("group") or (os.path.splitext(os.path.basename(config))[0] if config else name)
    row.update(
        name=name, group=group, family=family_of(settings), seed=seed, path=run_dir,
        last_checkpoint=os.path.join(run_dir, summary.get("checkpoint_folder", "checkpoint"), f"step-{ckpt[-1]}")
        if ckpt else None,
    )
    row["config"] = settings
    row["eval"] = eval_results(run_dir)
    row["curves"] = {"train": [list(p) for p in scalars.get(TAG_LOSS, [])],
                     "val": [list(p) for p in scalars.get(TAG_VAL_LOSS, [])]}
    return row


def is_run_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "run.json")) or os.path.isdir(os.path.join(path, "tb"))


def run_folders(paths: list[str], max_depth: int = 4) -> list[str]:
    """Run folders named by `paths`: each path itself when it is one, else those below it.

    Raises ValueError naming the path when it is missing or holds no run folder."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"RUN_DIR = {path!r} is not allowed: no such directory")
        if is_run_folder(path):
            found.append(os.path.abspath(path))
            continue
        below = []
        base = path.rstrip(os.sep).count(os.sep)
        for d, subdirs, _ in os.walk(path):
            subdirs.sort()
            if d != path and is_run_folder(d):
                below.append(os.path.abspath(d))
                subdirs.clear()
            elif d.count(os.sep) - base >= max_depth:
                subdirs.clear()
        if not below:
            raise ValueError(f"RUN_DIR = {path!r} is not allowed: no run folder in it "
                             "(a run folder holds run.json or TensorBoard events under tb/)")
        found += below
    return list(dict.fromkeys(found))


def read_runs(paths: list[str], config: str | None = None, overrides=None, warmup: int | None = None) -> list[dict]:
    """`read_run` of every run folder `paths` name, in order."""
    return [read_run(d, config=config, overrides=overrides, warmup=warmup) for d in run_folders(paths)]


# ---- the table -----------------------------------------------------------------------------

def table_row(run: dict) -> dict:
    """One run as a flat row: the fixed columns, then its settings and evaluation results."""
    row = {k: v for k, v in run.items() if k not in ("config", "eval", "curves")}
    row.update(run.get("config", {}))
    row.update(run.get("eval", {}))
    return row


def columns(rows: list[dict]) -> list[str]:
    rest = sorted({k for r in rows for k in r} - set(FIXED_COLUMNS))
    return [*FIXED_COLUMNS, *rest]


def table_csv(runs: list[dict]) -> str:
    rows = [table_row(r) for r in runs]
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = columns(rows)
    writer.writerow(cols)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else json.dumps(r[c]) if isinstance(r[c], (list, dict))
                         else r[c] for c in cols])
    return buf.getvalue()


def write_table(runs: list[dict], path: str) -> None:
    """`path` ends in .json (the runs, curves included) or .csv (one row per run); written whole."""
    if path.lower().endswith(".json"):
        write_json(path, runs)
    else:
        write_text(path, table_csv(runs))


def add_reader_flags(p: Parser) -> None:
    """The flags of every command that reads runs (this one, the report)."""
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding run folders")
    p.add_argument("--config", default=None, help="the training TOML of runs without run.json")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"logged steps skipped for tokens/s and MFU (default min({DEFAULT_WARMUP}, last step // 2))")


def check_reader_flags(args, overrides: list[str]) -> None:
    if overrides and args.config is None:
        raise ValueError(f"-- {' '.join(overrides)} is not allowed: overrides need --config")
    if args.config is not None and not os.path.isfile(args.config):
        raise ValueError(f"--config = {args.config!r} is not allowed: no such file")
    check_at_least("--warmup", args.warmup, 0)


def _parser() -> Parser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__)
    add_reader_flags(p)
    p.add_argument("--out", required=True, help="table.json or table.csv")
    return p


def run(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = _parser().parse_args(own)
    if not args.out.lower().endswith((".json", ".csv")):
        raise ValueError(f"--out = {args.out!r} is not allowed: a .json or .csv file")
    check_reader_flags(args, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = read_runs(args.runs, config=args.config, overrides=overrides, warmup=args.warmup)
    write_table(runs, args.out)
    for r in runs:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f} ({r['loss_source']})"
        print(f"{r['name']}: loss {loss}, steps {r['steps']}, tokens {r['tokens']}, n_params {r['n_params']}",
              file=sys.stderr)
    print(f"{PROG}: {len(runs)} runs -> {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
