"""Inference latency and memory by layer mix and batch size: prefill, per-token decode, caches.

For each linear-attention ratio, context length, batch size and compile setting: one prefill of
`context` random tokens per sequence (timed after an untimed prefill of the same length), then
`--decode-tokens` greedy decode steps, each timed on its own. On CUDA each step replays a
captured CUDA graph (titan_linear/inference/graph_decode.py), unless --eager-decode (row key
"decode"); `--compile` picks what the graph holds: "on" the torch.compile'd step (default),
"off" the eager step's kernels, "tuned" the compiled step with inductor's
coordinate_descent_tuning (batch-1 matrix-vector products become tuned Triton reductions, as
gpt-fast compiles; longer compile). Several settings give one row each, so one command compares
them. Compiling and capturing happen before the timed steps (row key "capture_s"); a step that
passes into a new KV bucket captures its graph first and is left out of the mean. Softmax
layers decode from a KV cache that grows in buckets (a graph's step reads the bucket, row key
"kv_positions"), linear layers from their constant-size recurrent state. Random weights; the
model is the train spec's flavor with `linear_attn_ratio` set (uniform placement).

    python benchmarks/inference.py --compile on off --out benchmarks/results/inference_h200.json
    python benchmarks/inference.py --ratios 0.5 --contexts 4096 --batches 1 2 4 8 16 32 64 --out ...
    python benchmarks/inference.py --device cpu --flavor debugmodel --contexts 64 128 --out /tmp/inf.json

Rows (one JSON object each, printed and written as a list to --out, or added to its list with
--append; the file is rewritten after every row): config, ratio, layer_map, batch, context,
compile, fused_projections (`--fused-projections`: q, k, v and w1, w3 each one product,
titan_linear/models/fused.py), gemv (`--gemv`: the step's products of at most 16 rows through the
Triton matrix-vector kernel of titan_linear/ops/gemv.py, `use_gemv` in models/fused.py),
kv_splits (`--kv-splits`: blocks of positions of the softmax layers' attention kernel in the
graph's step, titan_linear/ops/decode_attention.py; 0, the default, lets it choose),
softmax_attention (what that attention ran as: "kernel", "products" (the masked two products,
the CPU path), "sdpa" (eager steps), null without softmax layers), prefill_ms,
decode_ms_per_token (mean time per step: one token for each of the batch's sequences; the first
replay of a newly captured graph, which also uploads it, is an untimed warm-up step),
tokens_per_s (batch / seconds per step), kv_positions (KV positions each softmax layer reads at
the last step: the bucket for a graph, the filled positions eagerly; 0 without softmax layers),
capture_s (compiling and capturing; null when eager), cache_gib (caches as grown by the end: KV
storage plus recurrent states), peak_prefill_gib / peak_decode_gib (CUDA max allocated during each
phase, weights included; null on CPU), peak_gib (the larger), device, dtype,
linear_attn_impl, decode ("cuda graph" or "eager").

`--profile-steps N` adds a "profile" object to each row: N more decode steps under torch.profiler,
after the timed ones, split into what ran (on CUDA the GPU kernels, replayed graphs included; on
the CPU the top-level operators): events_per_step, busy_ms_per_step (their summed durations per
step; on CUDA the time the GPU was working), matmul_ms_per_step (the matrix products' share: GEMM
and GEMV kernels, or aten mm / addmm / bmm / linear on the CPU), step_ms (wall time per profiled
step, which on the CPU includes the profiler's own cost), gap_ms_per_step (step_ms less the busy
time: launch gaps and idle GPU), weights_gib (the bytes every step must read at
least once), and the 10 events that took longest (name, calls per step, ms per step). This is
how to tell a step bound by reading the weights (matmul time near weights / bandwidth) from one
bound by the number and latency of its kernels (many short events, or a large gap).
"""

import argparse
import copy
import gc
import itertools
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import titan_linear  # noqa: E402,F401 (registers the train specs)
from torchtitan.protocols.train_spec import get_train_spec  # noqa: E402

from titan_linear.inference import decode_step, prefill, prepare_model  # noqa: E402
from titan_linear.inference.build import materialize  # noqa: E402
from titan_linear.inference.graph_decode import decoder  # noqa: E402
from titan_linear.ops import decode_attention  # noqa: E402
from titan_linear.models.fused import fuse_projections, use_gemv  # noqa: E402
from titan_linear.ops.efficient_attn import impl_name  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2**30


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


# Names of matrix-product kernels (cuBLAS / cuBLASLt / CUTLASS families, inductor's extern mm)
# and of the CPU operators that do the products.
_MATMUL_KERNELS = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk", "wgmma")
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm")


def _is_matmul(name: str, device: torch.device) -> bool:
    if device.type == "cuda":
        return any(part in name.lower() for part in _MATMUL_KERNELS)
    return name in _MATMUL_OPS


def profile_steps(step, token: torch.Tensor, steps: int, device: torch.device, weights_gib: float) -> dict:
    """What `steps` decode steps ran, per step (module docstring, `--profile-steps`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = _now(device)
        for _ in range(steps):
            token = step(token).argmax(-1)
        step_ms = 1000 * (_now(device) - start) / steps
    if device.type == "cuda":
        # GPU work: kernels, copies and sets (device events), replayed CUDA graphs included.
        events = [(e.name, e.device_time_total) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [(e.name, e.cpu_time_total) for e in prof.events() if e.cpu_parent is None]
    by_name: dict[str, list] = {}
    for name, us in events:
        calls_us = by_name.setdefault(name, [0, 0.0])
        calls_us[0] += 1
        calls_us[1] += us
    busy = sum(us for _, us in events) / 1000 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
    return {
        "steps": steps,
        "events_per_step": round(len(events) / steps, 2),
        "step_ms": round(step_ms, 4),
        "busy_ms_per_step": round(busy, 4),
        "matmul_ms_per_step": round(sum(us for name, us in events if _is_matmul(name, device)) / 1000 / steps, 4),
        "gap_ms_per_step": round(step_ms - busy, 4),
        "weights_gib": round(weights_gib, 4),
        "top": [{"name": name[:120], "calls_per_step": round(calls / steps, 2), "ms_per_step": round(us / 1000 / steps, 4)}
                for name, (calls, us) in top],
    }


def measure(model, context: int, decode_tokens: int, batch: int, device: torch.device, seed: int,
            graph: bool = False, compile_options: dict | None = None, kv_splits: int = 0,
            profile_steps_n: int = 0) -> dict:
    """Prefill and decode timings and memory at one context length and batch size; graph: decode
    by replaying CUDA graphs (titan_linear/inference/graph_decode.py) instead of eagerly, of the
    torch.compile'd step with these inductor options unless compile_options is None."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, model.model_args.vocab_size, (batch, context), generator=gen).to(device)
    max_len = context + 1 + decode_tokens + profile_steps_n
    # Warm-up at this length: kernel plans and allocator blocks depend on the shapes.
    logits, caches = prefill(model, tokens, max_len=max_len)
    decode_step(model, logits[:, -1].argmax(-1), caches)
    del logits, caches

    _reset_peak(device)
    start = _now(device)
    logits, caches = prefill(model, tokens, max_len=max_len)
    prefill_ms = 1000 * (_now(device) - start)
    peak_prefill = _peak_gib(device)

    _reset_peak(device)
    token = logits[:, -1].argmax(-1)
    # A graph compiles (once per model and batch size) and captures its first step here.
    step = decoder(model, caches, graph, compile=compile_options is not None, compile_options=compile_options,
                   kv_splits=kv_splits)
    # Untimed: a graph's first replay also uploads it (measured on an H100, it put up to 0.16 ms
    # on the mean of 32 steps).
    token = step(token).argmax(-1)
    times = []
    for _ in range(decode_tokens):
        captured = step.capture_ms if graph else 0.0
        start = _now(device)
        token = step(token).argmax(-1)
        # A step that passed into a new bucket captured its graph first: not a decode time.
        if not graph or step.capture_ms == captured:
            times.append(1000 * (_now(device) - start))
    peak_decode = _peak_gib(device)
    ms = sum(times) / len(times)
    extra = {}
    if profile_steps_n:
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        extra["profile"] = profile_steps(step, token, profile_steps_n, device, weights)
    return {
        "context": context,
        "prefill_ms": round(prefill_ms, 3),
        "decode_ms_per_token": round(ms, 4),
        "tokens_per_s": round(1000 * batch / ms, 1),
        # the graph's step reads the whole bucket, the eager one the filled positions
        "kv_positions": (caches.capacity if graph else caches.length) if caches.kv_caches() else 0,
        "capture_s": round(step.capture_ms / 1000, 2) if graph else None,
        "cache_gib": round(caches.allocated_nbytes() / GIB, 6),
        "peak_prefill_gib": peak_prefill,
        "peak_decode_gib": peak_decode,
        "peak_gib": None if peak_prefill is None else max(peak_prefill, peak_decode),
        **extra,
    }


# What the CUDA graph holds, per --compile setting: None the eager step's kernels, else the
# inductor options of the compiled step.
COMPILE = {"off": None, "on": {}, "tuned": {"coordinate_descent_tuning": True}}


def softmax_attention(layer_map: str, graph: bool, device: torch.device, dtype: torch.dtype,
                      head_dim: int) -> str | None:
    """What the softmax layers' attention over the cache ran as (row key "softmax_attention"):
    "kernel" (ops/decode_attention.py), "products" (the masked two products) or "sdpa" (the
    eager step); None without softmax layers. The graph's step asks `decode_attention.supports`
    of its query and keys; so does this, of an empty query of the same kind."""
    if "S" not in layer_map:
        return None
    if not graph:
        return "sdpa"
    q = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
    return "kernel" if decode_attention.supports(q, q) else "products"


def _positive(text: str) -> int:
    """argparse type of the sizes: an integer >= 1 (0 sequences or positions would fail deep inside)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer >= 1")
    return int(text)


def _non_negative(text: str) -> int:
    """argparse type of --kv-splits: an integer >= 0 (0: automatic)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer >= 0 (0: automatic)")
    return int(text)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--append", action="store_true", help="add the rows to the list in --out (if it exists)")
    ap.add_argument("--name", default="llama3_mixed", help="train spec")
    ap.add_argument("--flavor", default="1B")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--contexts", type=_positive, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--decode-tokens", type=_positive, default=32)
    ap.add_argument("--batches", "--batch", type=_positive, nargs="+", default=[1], help="sequences decoded together")
    ap.add_argument("--compile", nargs="+", default=["on"], choices=list(COMPILE),
                    help="what the CUDA graph replays (module docstring); default on")
    ap.add_argument("--kv-splits", type=_non_negative, nargs="+", default=[0],
                    help="blocks of positions of the softmax layers' attention kernel in the graph's step "
                         "(titan_linear/ops/decode_attention.py); 0 (default) lets it choose; several give one row each")
    ap.add_argument("--fused-projections", nargs="+", default=["off"], choices=["off", "on"],
                    help="decode with each block's q, k, v (and w1, w3) weights as one product "
                         "(titan_linear/models/fused.py); several give one row each; default off")
    ap.add_argument("--gemv", nargs="+", default=["off"], choices=["off", "on"],
                    help="decode with the projections and the output head through the Triton matrix-vector "
                         "kernel (titan_linear/ops/gemv.py) instead of cuBLAS; several give one row each; default off")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many more decode steps per row (module docstring); 0: none")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager-decode", action="store_true",
                    help="decode eagerly on cuda too (default there: replay captured CUDA graphs)")
    a = ap.parse_args(argv)
    if a.profile_steps < 0:
        ap.error(f"--profile-steps {a.profile_steps} is not allowed: 0 (no profile) or more steps")
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    spec = get_train_spec(a.name)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    rows = json.load(open(a.out)) if a.append and os.path.exists(a.out) else []
    graph = device.type == "cuda" and not a.eager_decode
    settings = a.compile if graph else ["off"]
    if not graph and a.kv_splits != [0]:
        ap.error(f"--kv-splits {' '.join(map(str, a.kv_splits))}: splits apply to the CUDA-graph step only "
                 f"(a CUDA device without --eager-decode)")
    last = None
    for ratio in a.ratios:
        args = copy.deepcopy(spec.model_args[a.flavor])
        args.linear_attn_ratio = ratio
        args.max_seq_len = max(a.contexts) + 1 + a.decode_tokens + a.profile_steps  # 1: the warm-up step
        model = prepare_model(materialize(spec.model_cls, args, device, a.seed), dtype)
        for context in a.contexts:
            for batch in a.batches:
                for fused, gemv, setting, splits in itertools.product(a.fused_projections, a.gemv, settings,
                                                                      a.kv_splits):
                    fuse_projections(model, on=fused == "on")
                    use_gemv(model, on=gemv == "on")
                    if last is not None and (fused, gemv) != last:
                        # Dynamo's guards do not see a module's class change (use_gemv swaps the
                        # Linear classes): measured, a --gemv on row after an off row replayed the
                        # off row's compiled step. Compile afresh for every setting.
                        torch._dynamo.reset()
                    last = (fused, gemv)
                    row = {"config": f"{a.name} {a.flavor}", "ratio": ratio, "layer_map": args.layer_map,
                           "batch": batch, "device": device_name, "dtype": str(dtype).removeprefix("torch."),
                           "linear_attn_impl": impl_name(device, dtype, args.dim // args.n_heads),
                           "decode": "cuda graph" if graph else "eager", "compile": setting, "kv_splits": splits,
                           "fused_projections": fused == "on", "gemv": gemv == "on",
                           "softmax_attention": softmax_attention(args.layer_map, graph, device, dtype,
                                                                  args.dim // args.n_heads)}
                    try:
                        row.update(measure(model, context, a.decode_tokens, batch, device, a.seed, graph,
                                           COMPILE[setting], splits, a.profile_steps))
                    except torch.OutOfMemoryError as e:
                        row.update(context=context, error=f"OutOfMemoryError: {str(e).splitlines()[0][:200]}")
                        torch.cuda.empty_cache()
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    with open(a.out, "w") as f:  # after every row: a run cut short keeps what it measured
                        json.dump(rows, f, indent=1)
        # The model holds reference cycles (bound-method load hooks): collect it now, so the
        # next ratio's memory readings do not include it.
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
