"""End-to-end training throughput and memory of shipped configs, through run_train.sh.

Runs each (config, seq_len) for a few steps with TorchTitan's real loop (compile and
AC as the config sets them, or as overridden), reads the logged tokens/s, MFU and
peak reserved memory of the steps after warm-up, and appends rows to a JSON file:

    python benchmarks/e2e_train.py --configs llama3_1b llama3_1b_linear_0.50 \
        --seq-lens 2048:4 8192:1 --steps 30 --out benchmarks/results/e2e_h100.json

`--seq-lens` takes seq_len:local_batch_size pairs. `--ngpu` sets the processes (NGPU, default
1: on a many-GPU machine run_train.sh would otherwise take them all); with FSDP the local batch
stays per GPU, so rows of 1 and N GPUs measure weak scaling (tokens/s is TorchTitan's, per GPU).
Each row records which efficient-attention implementation served the linear layers and the
loss at every logged step. Data: the packaged text and tokenizer (token ids < 2048 are valid
inputs of any vocabulary), so it runs offline. The numbers come from the run's TensorBoard
events (TensorBoard is switched on for every run), read by `titan_linear.analysis.runs`; the
console output is kept in `<log-dir>/<name>.log`.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from titan_linear.analysis.runs import read_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_attn_impl() -> str:
    """The implementation the training runs' linear layers get (bf16 on the GPU, if any)."""
    import torch

    from titan_linear.ops.efficient_attn import impl_name

    return impl_name("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)


def run_one(config: str, seq_len: int, batch: int, steps: int, extra: list[str], log_dir: str,
            ngpu: int = 1, log_freq: int = 5) -> dict:
    name = f"{config}_{seq_len}_{ngpu}gpu"
    dump = os.path.join(log_dir, name)
    cmd = [
        os.path.join(ROOT, "run_train.sh"), "--config", os.path.join(ROOT, "train_configs", f"{config}.toml"),
        "--training.steps", str(steps), "--training.seq_len", str(seq_len),
        "--training.local_batch_size", str(batch), "--training.dataset", "tinyshakespeare",
        "--model.hf_assets_path", os.path.join(ROOT, "titan_linear", "assets", "tokenizer"),
        "--metrics.log_freq", str(log_freq), "--metrics.disable_color_printing",
        "--checkpoint.no-enable", "--job.dump_folder", dump, *extra,
        # last, so that no override moves or turns off what the row is read from
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
    ]
    t0 = time.time()
    env = {**os.environ, "PYTHON": sys.executable, "NGPU": str(ngpu)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    with open(os.path.join(log_dir, f"{name}.log"), "w") as f:
        f.write(log)
    # Skip the first logged windows: compilation and allocator warm-up.
    run = read_run(dump, warmup=min(10, steps // 2)) if proc.returncode == 0 else None
    row = {"config": config, "seq_len": seq_len, "local_batch_size": batch, "ngpu": ngpu, "steps": steps,
           "extra_args": " ".join(extra), "linear_attn_impl": linear_attn_impl(),
           "returncode": proc.returncode, "wall_s": round(wall, 1)}
    if run is None or run["tokens_per_s"] is None:
        row["error"] = log.strip().splitlines()[-5:] if log.strip() else ["no output"]
        return row
    row.update({
        "tokens_per_s": round(run["tokens_per_s"]),
        "mfu": round(run["mfu"], 2),
        "peak_gib": round(run["peak_memory_gib"], 2),
        "final_loss": run["final_train_loss"],
        "losses": run["curves"]["train"],
    })
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--seq-lens", nargs="+", default=["2048:4", "8192:1"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ngpu", type=int, default=1, help="processes on this node (NGPU)")
    ap.add_argument("--log-freq", type=int, default=5, help="steps between logged losses")
    ap.add_argument("--out", required=True)
    ap.add_argument("--log-dir", default=os.path.join(ROOT, "outputs", "bench_e2e"))
    ap.add_argument("--device", default="", help="device name recorded in each row")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="torchtitan overrides after --")
    a = ap.parse_args()
    extra = [x for x in a.extra if x != "--"]
    os.makedirs(a.log_dir, exist_ok=True)
    rows = json.load(open(a.out)) if os.path.exists(a.out) else []
    for pair in a.seq_lens:
        seq_len, batch = (int(x) for x in pair.split(":"))
        for config in a.configs:
            row = run_one(config, seq_len, batch, a.steps, extra, a.log_dir, a.ngpu, a.log_freq)
            row["device"] = a.device
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
