"""Where the Triton path's time goes: CUDA time per kernel of one fwd+bwd, by torch.profiler.

    python benchmarks/profile_attention.py --seq-lens 8192 65536 --head-dims 64 128

Same inputs as benchmarks/attention.py (bf16, 65,536 tokens per call, 16 heads). Prints, per
(T, head_dim), each kernel's CUDA ms per fwd+bwd and its share, and writes them to --out.
Launch parameters: the tuning table's (triton_tuning.py), or --candidate chunk:sub_chunk:warps
(as benchmarks/tune_attention.py takes them) for every head dim.
"""

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.tune_attention import parse_candidate  # noqa: E402
from titan_linear.ops.efficient_attn import efficient_attention_triton  # noqa: E402
from titan_linear.ops.efficient_attn.triton_tuning import launch_config, override  # noqa: E402


def profile_one(B: int, H: int, T: int, D: int, reps: int) -> dict[str, float]:
    """CUDA ms per fwd+bwd of every kernel that ran, averaged over `reps` steps."""
    mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    do = torch.randn_like(q)

    def step():
        out = efficient_attention_triton(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    for _ in range(3):  # compile and warm up outside the profile
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1000 / reps for e in prof.key_averages() if e.device_time_total > 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--candidate", type=parse_candidate, default={},
                    help="chunk:sub_chunk:warps[:scan_chunks:scan_block] instead of the table's entry")
    a = ap.parse_args()
    rows = []
    for D in a.head_dims:
        for T in a.seq_lens:
            B = max(1, a.tokens // T)
            with override(**a.candidate):
                ms = profile_one(B, a.heads, T, D, a.reps)
                cfg = launch_config(D, torch.bfloat16)
            total = sum(ms.values())
            print(f"T={T} batch={B} heads={a.heads} head_dim={D}: {total:.3f} ms per fwd+bwd")
            for name, t in sorted(ms.items(), key=lambda kv: -kv[1]):
                print(f"  {t:8.3f} ms  {100 * t / total:5.1f} %  {name[:70]}")
            rows.append({"T": T, "batch": B, "heads": a.heads, "head_dim": D, "total_ms": round(total, 3),
                         "kernels_ms": {n: round(t, 4) for n, t in ms.items()}, "launch": cfg._asdict(),
                         "device": torch.cuda.get_device_name()})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
