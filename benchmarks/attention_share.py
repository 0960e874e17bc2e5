"""What share of a training step's GPU time is attention: read from TorchTitan profiler traces.

    python benchmarks/e2e_train.py --configs llama3_3b --seq-lens 8192:1 --steps 10 --out prof.json \
        -- --profiling.enable_profiling --profiling.profile_freq 10 --profiling.profiler_warmup 1
    python benchmarks/attention_share.py outputs/bench_e2e/llama3_3b_8192_1gpu --out share.json

Each argument is a chrome trace (`rank0_trace.json`, gzipped or not) or a folder searched for
them (TorchTitan writes `<dump>/profile_traces/iteration_<step>/rank<r>_trace.json`). Per trace:
the summed duration of the GPU kernels, of the softmax attention's kernels (FlashAttention,
cuDNN or memory-efficient SDPA: names holding "flash", "fmha", "attention" or "attn") and of
this project's efficient-attention kernels (the Triton kernels' function names), in ms and as a
share of all kernel time. Kernels on other streams that overlap are counted in full, so the
shares are of kernel time, not of the wall-clock step.

The share a bounds what linear layers can give: a model with a fraction r of its layers linear
runs at most 1 / (1 − r·a) times the softmax model's tokens/s if the linear layers cost nothing,
and 1 / (1 − r·a·(1 − t_lin / t_softmax)) if they cost t_lin where softmax attention costs t_softmax.
"""

import argparse
import glob
import gzip
import json
import os
import sys

# The Triton kernels of titan_linear/ops/efficient_attn (forward, backward, scans, decode).
LINEAR_KERNELS = ("chunk_summary_kernel", "chunk_output_kernel", "state_scan_kernel", "reverse_scan_kernel",
                  "bwd_query_kernel", "bwd_key_kernel", "state_fill_kernel", "block_output_kernel", "block_bwd_query_kernel",
                  "block_dq_kernel", "block_bwd_dk_kernel", "block_bwd_dv_kernel")
SOFTMAX_MARKERS = ("flash", "fmha", "attention", "attn")


def kind(name: str) -> str:
    """'linear', 'softmax' or 'other' for one kernel name."""
    if any(k in name for k in LINEAR_KERNELS):
        return "linear"
    low = name.lower()
    return "softmax" if any(m in low for m in SOFTMAX_MARKERS) else "other"


def share(trace_path: str) -> dict:
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    ms = {"softmax": 0.0, "linear": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        d = float(e.get("dur", 0.0)) / 1000.0  # chrome traces are in microseconds
        ms[kind(e.get("name", ""))] += d
        top[e["name"]] = top.get(e["name"], 0.0) + d
    total = sum(ms.values())
    if total == 0.0:
        raise ValueError(f"{trace_path}: no GPU kernel events (a trace of a CPU run, or not a profiler trace)")
    return {"trace": trace_path, "kernel_ms": round(total, 2),
            "softmax_attention_ms": round(ms["softmax"], 2), "linear_attention_ms": round(ms["linear"], 2),
            "softmax_attention_share": round(ms["softmax"] / total, 4),
            "linear_attention_share": round(ms["linear"] / total, 4),
            "top_kernels_ms": {n[:120]: round(t, 2) for n, t in sorted(top.items(), key=lambda kv: -kv[1])[:12]}}


def traces(paths: list[str]) -> list[str]:
    found = []
    for p in paths:
        if os.path.isdir(p):
            hits = sorted(glob.glob(os.path.join(p, "**", "rank*_trace.json*"), recursive=True))
            if not hits:
                raise ValueError(f"{p}: no rank*_trace.json under it (was --profiling.enable_profiling set?)")
            found += hits
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="traces, or folders holding them")
    ap.add_argument("--out", default="", help="write the rows here (JSON)")
    a = ap.parse_args(argv)
    try:
        rows = [share(t) for t in traces(a.paths)]
    except ValueError as e:  # one line naming the path, exit 2, nothing written
        ap.error(str(e))
    for r in rows:
        print(f"{r['trace']}: kernels {r['kernel_ms']} ms, softmax attention {r['softmax_attention_ms']} ms "
              f"({100 * r['softmax_attention_share']:.1f} %), linear attention {r['linear_attention_ms']} ms "
              f"({100 * r['linear_attention_share']:.1f} %)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
