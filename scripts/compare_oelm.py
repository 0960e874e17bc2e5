"""Train the GPT / OELM pair on the same data, seed and token budget; write the comparison.

    python scripts/compare_oelm.py --steps 2000 --out runs/cmp \\
        --data /path/to/tinyshakespeare.txt [-- any torchtitan override for both runs]

A driver of a repository checkout (it needs run_train.sh and train_configs/), so it
lives in scripts/, not in the installed package.

Both runs go through run_train.sh with train_configs/medium512_gpt.toml and
medium512_oelm.toml (change with --gpt-config / --oelm-config), the same
`--debug.seed`, steps, batch and sequence length. `--data FILE` trains on the
first 90 % of FILE's characters and validates on the rest (the tinyshakespeare
split); without it the packaged tinyshakespeare text is used. Written to --out:
- comparison.md: the comparison table (best val loss, val perplexity, gap in
  perplexity relative to GPT, total and trainable parameters) plus the settings;
- comparison.json: the same numbers and both loss curves;
- loss_curves.png: train and val loss against step (needs matplotlib; skipped with a
  message when it is not installed);
- gpt/ and oelm/: each run's dump folder (train.log, param_report.md, TensorBoard events, checkpoints).

The losses, the parameter counts and the token budget are read from each run folder by
`titan_linear.analysis.runs` (TensorBoard events, param_report.json, the config and overrides);
TensorBoard is switched on for both runs whatever the overrides say.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from titan_linear.analysis.runs import read_run

REPO = Path(__file__).resolve().parents[1]


def _run(name: str, config: str, args, extra: list[str], out: Path) -> dict:
    dump = out / name
    dump.mkdir(parents=True, exist_ok=True)
    data = []
    if args.data:
        data = ["--training.dataset", "tinyshakespeare", "--training.dataset_path", args.data,
                "--validation.dataset", "tinyshakespeare_val", "--validation.dataset_path", args.data]
    cmd = [
        str(REPO / "run_train.sh"), "--config", config,
        "--job.dump_folder", str(dump), "--training.steps", str(args.steps),
        "--debug.seed", str(args.seed), "--metrics.log_freq", str(args.log_freq),
        "--metrics.disable_color_printing",
        "--validation.enable", "--validation.freq", str(args.val_freq), "--validation.steps", str(args.val_steps),
        "--lr_scheduler.warmup_steps", str(args.warmup if args.warmup >= 0 else max(1, args.steps // 20)),
        *data, *extra,
    ]
    if args.seq_len:
        cmd += ["--training.seq_len", str(args.seq_len), "--validation.seq_len", str(args.seq_len)]
    if args.batch:
        cmd += ["--training.local_batch_size", str(args.batch), "--training.global_batch_size", "-1"]
    cmd += ["--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb"]  # what the results are read from
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable), LOG_RANK="0")
    if args.ngpu:
        env["NGPU"] = str(args.ngpu)
    print(f"compare_oelm: training {name}: {' '.join(cmd)}", flush=True)
    with open(dump / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = (dump / "train.log").read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-30:])
        raise SystemExit(f"compare_oelm: the {name} run failed (exit {proc.returncode}); {dump}/train.log:\n{tail}")
    run = read_run(dump, config=config, overrides=cmd[3:])
    if not run["curves"]["val"]:
        raise SystemExit(f"compare_oelm: the {name} run logged no validation loss; see {dump}/train.log")
    if run.get("params_trainable") is None:
        raise SystemExit(f"compare_oelm: the {name} run wrote no param_report.json in {dump}")
    seq_len, per_step = run["seq_len"], run["tokens_per_step"]
    return {
        "config": config, "train": dict(run["curves"]["train"]), "val": dict(run["curves"]["val"]),
        "best_val": run["best_val_loss"],
        "total": run["n_params_total"], "trainable": run["params_trainable"], "frozen": run["params_frozen"],
        "global_batch": per_step // seq_len if per_step and seq_len else None, "seq_len": seq_len,
    }


def table(gpt: dict, oelm: dict) -> str:
    def row(name, r, base):
        ppl = math.exp(r["best_val"])
        gap = "baseline" if base is None else f"{100 * (ppl / math.exp(base['best_val']) - 1):+.1f}%"
        return (f"| {name} | {r['best_val']:.4f} | {ppl:.2f} | {gap} | {r['total']:,} | "
                f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.1f}%) |")

    return "\n".join([
        "| Model | Val Loss | Val PPL | Relative gap (PPL) | Total params | Trainable params |",
        "|---|---:|---:|---:|---:|---:|",
        row("GPT", gpt, None),
        row("OELM", oelm, gpt),
    ])


def plot(gpt: dict, oelm: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: loss_curves.png skipped (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r, color in (("GPT", gpt, "tab:blue"), ("OELM", oelm, "tab:red")):
        s = sorted(r["train"])
        ax.plot(s, [r["train"][k] for k in s], color=color, alpha=0.5, label=f"{name} train")
        v = sorted(r["val"])
        ax.plot(v, [r["val"][k] for k in v], "o-", color=color, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, required=True, help="training steps of each run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default="", help="a .txt file: 90%% train / 10%% val (default: packaged tinyshakespeare)")
    p.add_argument("--gpt-config", default=str(REPO / "train_configs" / "medium512_gpt.toml"))
    p.add_argument("--oelm-config", default=str(REPO / "train_configs" / "medium512_oelm.toml"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ngpu", type=int, default=0, help="processes per run (default: run_train.sh's)")
    p.add_argument("--seq-len", type=int, default=0, help="override training/validation seq_len")
    p.add_argument("--batch", type=int, default=0, help="override local batch size (no accumulation)")
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps (default steps // 20)")
    p.add_argument("--log-freq", type=int, default=10)
    p.add_argument("--val-freq", type=int, default=0, help="validation every N steps (default steps // 10)")
    p.add_argument("--val-steps", type=int, default=20)
    args = p.parse_args(argv)
    args.val_freq = args.val_freq or max(1, args.steps // 10)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        args.data = str(Path(args.data).resolve())

    gpt = _run("gpt", args.gpt_config, args, extra, out)
    oelm = _run("oelm", args.oelm_config, args, extra, out)
    tokens = args.steps * (gpt["global_batch"] or 0) * (gpt["seq_len"] or 0)
    md = [
        "# GPT vs OELM",
        "",
        table(gpt, oelm),
        "",
        "Best validation loss over the run; perplexity = exp(loss); gap = OELM PPL / GPT PPL - 1.",
        f"Same data ({args.data or 'packaged tinyshakespeare'}), seed {args.seed}, {args.steps} steps, "
        f"global batch {gpt['global_batch']} x seq {gpt['seq_len']} = {tokens:,} training tokens per model.",
        f"Configs: {args.gpt_config}, {args.oelm_config}; overrides: {' '.join(extra) or 'none'}.",
        f"OELM frozen parameters: {oelm['frozen']:,}.",
        "",
    ]
    msg = plot(gpt, oelm, out / "loss_curves.png")
    md.append(f"_{msg}_" if msg else "![loss curves](loss_curves.png)")
    (out / "comparison.md").write_text("\n".join(md) + "\n")
    (out / "comparison.json").write_text(json.dumps({"gpt": gpt, "oelm": oelm, "steps": args.steps,
                                                     "seed": args.seed, "tokens": tokens}, indent=2))
    print("\n".join(md))
    if msg:
        print(f"compare_oelm: {msg}")
    print(f"compare_oelm: wrote {out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
