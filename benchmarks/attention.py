"""Attention alone, forward + backward, bf16: FlashAttention (SDPA) against efficient attention.

Each call holds 65,536 tokens (batch x T) by default, so time per call should stay flat in T
for a linear-time method. Rows go to a JSON file:

    python benchmarks/attention.py --out benchmarks/results/attention_h100.json

impl names: `sdpa` (torch SDPA, FlashAttention on Hopper), `titan_triton` (this project's Triton
kernels, the path models take on a GPU), `torch_chunked` (the plain-torch chunked path under
torch.compile), `torch_chunked_eager`.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titan_linear.ops.efficient_attn import efficient_attention_chunked, efficient_attention_triton  # noqa: E402


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def bench(fn, B, H, T, D, reps: int) -> tuple[float, float]:
    """Median ms of fwd+bwd and peak GiB allocated during it."""
    from triton.testing import do_bench

    mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = do_bench(step, warmup=25, rep=reps, return_mode="median")
    return ms, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    # torch.compile of the chunked path takes minutes per new shape (its scan unrolls log2(T/64)
    # levels): time it at the short lengths only.
    ap.add_argument("--compiled-max-T", type=int, default=4096,
                    help="longest T at which torch_chunked (compiled) is timed; default 4096")
    ap.add_argument("--impls", nargs="+", default=["sdpa", "titan_triton", "torch_chunked"])
    ap.add_argument("--rep-ms", type=int, default=200)
    a = ap.parse_args()
    impls = {
        "sdpa": _sdpa,
        "torch_chunked": torch.compile(efficient_attention_chunked, fullgraph=True),
        "torch_chunked_eager": efficient_attention_chunked,
        "titan_triton": efficient_attention_triton,
    }
    rows = []
    device = torch.cuda.get_device_name()
    for D in a.head_dims:
        for T in a.seq_lens:
            B = max(1, a.tokens // T)
            for name in a.impls:
                if name == "torch_chunked" and T > a.compiled_max_T:
                    continue
                row = {"impl": name, "T": T, "batch": B, "heads": a.heads, "head_dim": D, "device": device}
                try:
                    ms, peak = bench(impls[name], B, a.heads, T, D, a.rep_ms)
                    row.update(ms=round(ms, 3), peak_gib=round(peak, 3))
                except Exception as e:  # e.g. out of memory or a compiler failure at one size
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
                with open(a.out, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
