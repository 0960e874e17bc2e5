"""Sweep the Triton kernels' launch parameters: candidates against the tuning table's entry.

    python benchmarks/tune_attention.py --out benchmarks/results/tune_h200.json \
        --head-dims 64 128 --seq-lens 8192 --candidates 256:16:4 256:16:8 256:32:4 128:16:4 512:16:4

A candidate is chunk:sub_chunk:warps[:scan_chunks:scan_block], or named integer fields of the
launch config, e.g. `chunk=256,warps=4,v_split=2` (fields left out keep the table's). Each runs through triton_tuning.override, in this one process, on the same inputs as
benchmarks/attention.py (bf16, fwd+bwd, 65,536 tokens per call, 16 heads); the table's own
entry is timed first, as the row with "table": true. Every candidate's output and gradients are
compared with the table entry's on the same inputs ("rel_err", the largest of o, dq, dk, dv),
so a candidate that computes something else shows. The last lines printed name, per head dim
and T, the fastest candidate and its time against the table's: a winner goes into
triton_tuning.py's _TILES by hand, with its numbers in benchmarks/results/README.md.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.attention import bench  # noqa: E402
from titan_linear.ops.efficient_attn import efficient_attention_triton  # noqa: E402
from titan_linear.ops.efficient_attn.triton_tuning import launch_config, override  # noqa: E402

FIELDS = ("chunk", "sub_chunk", "warps", "scan_chunks", "scan_block")
NAMED = FIELDS + ("v_split", "max_registers", "fill")


def parse_candidate(text: str) -> dict[str, int]:
    """"256:16:4" -> {"chunk": 256, "sub_chunk": 16, "warps": 4} (up to five fields, FIELDS);
    "warps=4,v_split=2" -> {"warps": 4, "v_split": 2} (any of NAMED). The values must pass the
    tuning table's own checks (triton_tuning.override), so a bad one stops before anything runs."""
    if "=" in text:
        fields = dict(item.split("=", 1) for item in text.split(","))
        if not fields.keys() <= set(NAMED) or not all(v.isdigit() for v in fields.values()):
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=INTEGER,... with NAME one of {', '.join(NAMED)}")
        fields = {k: int(v) for k, v in fields.items()}
    else:
        values = [int(x) for x in text.split(":")]
        if not 1 <= len(values) <= len(FIELDS):
            raise argparse.ArgumentTypeError(f"{text!r}: expected chunk:sub_chunk:warps[:scan_chunks:scan_block]")
        fields = dict(zip(FIELDS, values))
    try:
        with override(**fields):
            pass
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return fields


def _rel_err(fields: dict, reference: list[torch.Tensor], B: int, H: int, T: int, D: int) -> float:
    """Largest relative difference of o, dq, dk, dv between `fields` and the table's entry."""
    g = torch.Generator(device="cuda").manual_seed(T + D)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    with override(**fields):
        out = efficient_attention_triton(q, k, v)
        got = [out, *torch.autograd.grad(out, (q, k, v), do)]
    if not reference:
        reference.extend(x.detach() for x in got)
        return 0.0
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, reference))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--candidates", type=parse_candidate, nargs="+",
                    default=[parse_candidate(c) for c in ("128:16:4", "128:16:8", "128:32:4", "256:16:4", "256:16:8",
                                                          "256:32:4", "256:32:8", "512:16:4", "512:16:8")])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    ap.add_argument("--rep-ms", type=int, default=100)
    a = ap.parse_args()
    device = torch.cuda.get_device_name()
    rows, best = [], []
    for D in a.head_dims:
        table = launch_config(D, torch.bfloat16)
        for T in a.seq_lens:
            B = max(1, a.tokens // T)
            reference: list[torch.Tensor] = []
            candidates = [{}] + [c for c in a.candidates if table._replace(**c) != table]
            for fields in candidates:
                cfg = table._replace(**fields)
                row = {"impl": "titan_triton", "T": T, "batch": B, "heads": a.heads, "head_dim": D, "device": device,
                       **{f: getattr(cfg, f) for f in NAMED}, "prec": cfg.prec, "table": not fields}
                try:
                    row["rel_err"] = round(_rel_err(fields, reference, B, a.heads, T, D), 5)
                    with override(**fields):
                        ms, peak = bench(efficient_attention_triton, B, a.heads, T, D, a.rep_ms)
                    row.update(ms=round(ms, 3), peak_gib=round(peak, 3))
                except Exception as e:  # e.g. out of shared memory or registers at one shape
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
                with open(a.out, "w") as f:
                    json.dump(rows, f, indent=1)
            timed = [r for r in rows if r["head_dim"] == D and r["T"] == T and "ms" in r and r["rel_err"] < 2e-2]
            if timed:
                base = next((r for r in timed if r["table"]), None)
                win = min(timed, key=lambda r: r["ms"])
                best.append(f"head_dim {D} T {T}: fastest {','.join(f'{f}={win[f]}' for f in NAMED)} {win['ms']} ms; "
                            f"table {','.join(f'{f}={getattr(table, f)}' for f in NAMED)} "
                            f"{base['ms'] if base else 'failed'} ms")
    print("\n".join(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
