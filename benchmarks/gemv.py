"""The decode step's matrix-vector products: the Triton kernel (titan_linear/ops/gemv.py) against
F.linear (cuBLAS), per weight shape of the 1B model and batch, in GB/s.

    python benchmarks/gemv.py --out gemv_h200.json
    python benchmarks/gemv.py --batches 1 --sweep --out gemv_h200_sweep.json

Each product is timed as a decode step runs it: launches captured in a CUDA graph and replayed,
back to back, each on another copy of the weight so that the copies together are 4x the 50 MB
L2 of an H100 / H200 (a step reads every weight once: a weight left in L2 by the previous
launch would time the cache, not the memory). Time per product = replay time / launches (the
median of --repeats replays), so the gaps between kernels count, as they do in a step. GB/s =
(weight + x + y) bytes / time.

--out holds {command, device, sms, torch, triton, rows, step_us}. Rows (each also printed):
shape (qkv, wo, w13, w2, output: fused q·k·v, attention output, fused w1·w3, w2, output head;
wq, wkv, w1 for the unfused products), n, k, batch, impl ("cublas", "gemv" with
launch_config's launch, or "candidate" with --sweep), config
(GemvConfig fields; null for cuBLAS), us, gb_per_s. step_us, per batch, sums a fused 1B decode
step's products (16 layers of qkv, wo, w13, w2, and the output head) for cuBLAS, the kernel as
launched by default ("gemv") and, with --sweep, the fastest candidate of each shape ("best");
null unless those five shapes were timed.
"""

import argparse
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titan_linear.ops import gemv  # noqa: E402

# (name, N, K) of the 1B llama shape: dim 2048, 32 heads / 8 kv heads of 64, ffn 8192, vocab 128256.
SHAPES = [("qkv", 3072, 2048), ("wo", 2048, 2048), ("w13", 16384, 2048), ("w2", 2048, 8192),
          ("output", 128256, 2048), ("wq", 2048, 2048), ("wkv", 512, 2048), ("w1", 8192, 2048)]
STEP = {"qkv": 16, "wo": 16, "w13": 16, "w2": 16, "output": 1}  # products per fused decode step
L2_BYTES = 50 * 2**20


def candidates(rows: int, n: int, k: int, sms: int):
    """Launches --sweep times: the dot path for any rows, the elementwise path for one row; K
    split 1 to 16 times, but not past the split at which half as many already made 8 programs per
    SM (the output head's 8016 tiles of 16 rows need none)."""
    grids = [dict(dot=[True], block_n=[64, 128], block_k=[128, 256], warps=[4], stages=[3, 4])]
    if rows == 1:
        grids.append(dict(dot=[False], block_n=[16, 32], block_k=[256, 512], warps=[4, 8], stages=[1]))
    for grid in grids:
        for values in itertools.product(*grid.values(), [1, 2, 4, 8, 16]):
            cfg = gemv.GemvConfig(**dict(zip([*grid, "split"], values)))
            if cfg.split > 1 and -(-n // cfg.block_n) * cfg.split // 2 >= 8 * sms:
                continue
            try:
                yield gemv.check(cfg, rows, n, k)
            except ValueError:
                continue


def time_product(fn, weights: list, x: torch.Tensor, repeats: int) -> float:
    """Microseconds per call of fn(x, w) replayed from one CUDA graph over the weights in turn."""
    launches = max(len(weights), 16)
    for w in weights[:2]:
        fn(x, w)  # compile, workspaces, split-K counters: before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(x, weights[i % len(weights)])
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / launches)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    ap.add_argument("--sweep", action="store_true", help="also time every candidate launch (`candidates`)")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    for b in a.batches:
        if not 1 <= b <= gemv.MAX_ROWS:
            ap.error(f"--batches {b} is not allowed: 1 to {gemv.MAX_ROWS} (the kernel's rows)")
    if not torch.cuda.is_available():
        ap.error("benchmarks/gemv.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows, step = [], {}
    result = {"command": "python " + " ".join(sys.argv if argv is None else ["benchmarks/gemv.py", *argv]),
              "device": torch.cuda.get_device_name(device), "sms": sms, "torch": torch.__version__,
              "triton": triton.__version__, "rows": rows, "step_us": None}

    def dump() -> None:  # after every shape: a run cut short keeps what it measured
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    for name, n, k in SHAPES:
        if name not in a.shapes:
            continue
        nbytes = n * k * 2
        copies = max(1, math.ceil(4 * L2_BYTES / nbytes))
        weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
        for batch in a.batches:
            x = torch.randn(batch, k, device=device, dtype=dtype)
            moved = nbytes + 2 * batch * (n + k)

            def row(impl, cfg, us):
                return {"shape": name, "n": n, "k": k, "batch": batch, "impl": impl,
                        "config": cfg._asdict() if cfg else None, "us": round(us, 3),
                        "gb_per_s": round(moved / us / 1e3, 1)}

            default = gemv.launch_config(batch, n, k, sms)
            timed = {"cublas": (None, time_product(F.linear, weights, x, a.repeats)),
                     "gemv": (default, time_product(lambda x, w: gemv.gemv(x, w, *default), weights, x, a.repeats))}
            for impl, (cfg, us) in timed.items():
                record(row(impl, cfg, us))
            if a.sweep:
                best = None
                for cfg in candidates(batch, n, k, sms):
                    try:
                        us = time_product(lambda x, w, cfg=cfg: gemv.gemv(x, w, *cfg), weights, x, a.repeats)
                    except OutOfResources as e:  # more shared memory than an SM has (big tiles, deep stages)
                        print(json.dumps({"shape": name, "batch": batch, "config": cfg._asdict(),
                                          "skipped": str(e)[:200]}), flush=True)
                        continue
                    record(row("candidate", cfg, us))
                    best = min(best or (us, cfg), (us, cfg), key=lambda t: t[0])
                timed["best"] = (best[1], best[0])
            if name in STEP:
                for impl, (_, us) in timed.items():
                    step.setdefault(batch, {}).setdefault(impl, 0.0)
                    step[batch][impl] += STEP[name] * us
        del weights
        torch.cuda.empty_cache()
        dump()
    if set(STEP) <= set(a.shapes):
        result["step_us"] = {b: {impl: round(us, 1) for impl, us in per.items()} for b, per in step.items()}
    print(json.dumps({"step_us": result["step_us"]}), flush=True)
    dump()
    return rows


if __name__ == "__main__":
    main()
