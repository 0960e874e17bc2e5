"""Launch parameters of the Triton kernels: one table keyed by (head dim, dtype).

`launch_config(head_dim, dtype)` gives the `LaunchConfig` the kernels run with: tile shapes,
warps, the scans' block, the products' operand type and the exact path's threshold.
`efficient_attention_triton` looks it up once per call (head dim = max(d_k, d_v)) and passes
it to the forward and backward custom ops as arguments, so the backward always uses the
forward's chunking. The table holds every supported key: head dims 16, 32, 64, 128 ×
bf16 / fp16 / fp32.

To time or test other settings, `override` replaces fields for the calls inside a `with`
(benchmarks/tune_attention.py sweeps candidates this way; tests force the exact path with
`span=-1` and the interpreter's bf16 products with `prec="bf16sim"`):

    with override(chunk=128, sub_chunk=32, warps=8):
        o = efficient_attention(q, k, v)

Nothing here is read from the environment.
"""

import contextlib
import os
import warnings
from typing import Iterator, NamedTuple

import torch

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PRECISIONS = ("ieee", "tf32", "bf16", "bf16sim")


class LaunchConfig(NamedTuple):
    """How the kernels are launched for one (head dim, dtype).

    chunk        positions per chunk: the unit of parallel work and of the carried state. Larger
                 chunks move fewer (d_k × d_v) states through memory and give fewer, longer
                 programs. A power of two >= 16, a multiple of sub_chunk.
    sub_chunk    positions per same-sub-chunk block (triton_diag.py), the unit of the products:
                 larger blocks mean fewer, bigger products but fall back to the exact loop
                 sooner. A power of two >= 16.
    warps        num_warps of the per-chunk kernels.
    scan_chunks  chunks per step of the scans' parallel block (a power of two).
    scan_block   state elements per scan program (a power of two).
    prec         the products' operands (triton_diag.mm): "bf16" for bf16 inputs (the rounding
                 FlashAttention applies to its probabilities, 2^-9, below a bf16 result's own);
                 "tf32" for fp16 (bf16 would round the fp16 values themselves); "ieee" (full
                 fp32) for fp32; "bf16sim" (bf16 rounding, fp32 products) only for Triton's CPU
                 interpreter, which multiplies bf16 operands wrongly. Cumulative sums keep ~16
                 bits whatever this is (triton_diag.cumsum_rows). Not a speed setting.
    span         how far (log2 units) the keys of a sub-chunk may spread before its chunk goes
                 to the exact kernels instead of products (triton_diag.py); negative sends every
                 chunk there. A correctness threshold, not a speed setting.
    v_split      blocks of the value features: each per-chunk kernel runs one program per
                 (chunk, kv head, block of d_v / v_split value features), holding a (d_k,
                 d_v / v_split) slice of the state. At head dim 128 the whole fp32 state is 128
                 registers per thread at 4 warps; a slice of half is 64. The products over the
                 keys (the c × c block, the query softmax) are recomputed per block, and dq and
                 dk, sums over the value features, are summed from per-block fp32 parts. 1 in
                 every entry: on an H200 every split was slower (head dim 128: 14.7-21.5 ms
                 against 9.5-9.8; head dim 64: 6.2 against 2.6), the recomputed products and
                 the fp32 parts costing more than the smaller state saves. d_v / v_split >= 16.
    max_registers  registers per thread the per-chunk kernels and the chunk summary may use
                 (Triton's `maxnreg`); 0 leaves it to the compiler, which takes up to 255. At
                 head dim 128 and 8 warps the per-chunk kernels take 200-255, so one SM holds one
                 program (8 of its 64 warps); 128 lets it hold two, at the cost of spills
                 (benchmarks/results/kernels_sm90_d128.json). 0 in every entry: on an H100 a cap
                 of 128 at head dim 128 took 23.99 ms against the table's 9.32 (and 16 warps,
                 whose registers Triton caps at 128, 13.48). 0, or a multiple of 8 from 24 to 255.
    fill         F > 0: the chunk stays the unit of the summaries and the scan, but
                 `state_fill_kernel` (triton_fwd.py) then stores the state and z after every F
                 positions, and the blocks the factorised form takes run triton_blocks.py's
                 kernels: one program per block of F positions, nothing carried from block to
                 block, the key features taken 64 at a time, so no program holds a (d_k, d_v)
                 state or a full-width (F, d_k) fp32 tile. Flagged blocks run the carried-state
                 exact kernels over the block in sub-chunks. Costs one fp32 state per F positions in
                 memory (saved for the backward). A power of two from sub_chunk to chunk;
                 v_split must be 1. 0: the per-chunk kernels walk the chunk's sub-chunks,
                 carrying the state. 0 in every entry (see the table's notes for what was timed).
    """

    chunk: int = 256
    sub_chunk: int = 16
    warps: int = 4
    scan_chunks: int = 8
    scan_block: int = 64
    prec: str = "bf16"
    span: float = 100.0
    v_split: int = 1
    max_registers: int = 0
    fill: int = 0


def _check(cfg: LaunchConfig) -> LaunchConfig:
    def pow2(x: int) -> bool:
        return isinstance(x, int) and x >= 1 and not x & (x - 1)

    for name in ("chunk", "sub_chunk"):
        value = getattr(cfg, name)
        if not pow2(value) or value < 16:
            raise ValueError(f"{name} = {value} is not allowed: a power of two >= 16")
    if cfg.chunk % cfg.sub_chunk:
        raise ValueError(f"chunk = {cfg.chunk} is not allowed: a multiple of the sub-chunk ({cfg.sub_chunk})")
    for name in ("warps", "scan_chunks", "scan_block", "v_split"):
        if not pow2(getattr(cfg, name)):
            raise ValueError(f"{name} = {getattr(cfg, name)} is not allowed: a power of two")
    regs = cfg.max_registers
    if not isinstance(regs, int) or not (regs == 0 or (24 <= regs <= 255 and regs % 8 == 0)):
        raise ValueError(f"max_registers = {regs} is not allowed: 0 (the compiler's choice) or a multiple of 8 "
                         "from 24 to 255")
    if cfg.fill and not (pow2(cfg.fill) and cfg.fill >= 16 and cfg.fill % cfg.sub_chunk == 0
                         and cfg.chunk % cfg.fill == 0):
        raise ValueError(f"fill = {cfg.fill} is not allowed: 0 (carry the state through the chunk) or a power of "
                         f"two from the sub-chunk ({cfg.sub_chunk}) to the chunk ({cfg.chunk}): the positions "
                         "between filled states")
    if cfg.fill and cfg.v_split != 1:
        raise ValueError(f"v_split = {cfg.v_split} is not allowed with fill = {cfg.fill}: 1 (the filled-state "
                         "kernels split the key features, not the values)")
    if cfg.prec not in PRECISIONS:
        raise ValueError(f"prec = {cfg.prec!r} is not allowed: one of {', '.join(PRECISIONS)}")
    return cfg._replace(span=float(cfg.span))


# Products' operands per input dtype (see LaunchConfig.prec).
_PREC = {torch.bfloat16: "bf16", torch.float16: "tf32", torch.float32: "ieee"}

# Tile shapes and warps per (head dim, dtype). What was measured, bf16 fwd+bwd, 65,536 tokens
# per call, 16 heads (benchmarks/tune_attention.py; numbers in benchmarks/results/README.md):
# - H100 (tune_h100.json, head dim 64, T = 2K / 8K / 64K, kernels of 2026-11-22): chunk 256,
#   sub-chunk 16, 4 warps won at 2.92 ms (2K) against 2.97 (256/32/4), 3.19-3.21 (128/32/4),
#   3.23 (512/32/4), 3.26 (128/16/4), 3.96-4.02 (128/32/8), 5.16-5.25 (chunk 64), 8.06-8.55
#   (sub-chunk 64); 512/16 was not tried. 4 warps beat 8 at head dim 64 (more programs per SM
#   hide the latency of each program's chain of small products).
# - H200 (tune_h200.json, T = 8K): chunk 512 beat 256 at sub-chunk 16 with the warps kept:
#   head dim 64, 512/16/4 2.61 ms against 256/16/4 2.74 (128/16/4 3.02, 256/32/8 3.57);
#   head dim 128, 512/16/8 9.76 against 256/16/8 10.28 (256/32/8 10.79, 128/16/8 11.47,
#   any 4-warp candidate 14.3-16.0: its (d_k, d_v) fp32 state alone is 128 registers per
#   thread at 4 warps). attention_h200_tuning.json has them at T = 2K-64K against the old 256.
#   Chunk 1024 was faster still at 8K (2.55 and 9.51 ms) but was timed at no other T.
# - H200, 2026-12-04 (tune_h200_vsplit*.json): head dim 128, 1024/16/8 against 512/16/8 at T = 2K
#   / 8K / 64K: 9.83 / 9.47 / 9.53 ms against 9.98 / 9.76 / 9.72, so the table takes 1024. Value
#   blocks (v_split) lost everywhere: 512/16/4 v_split 2 14.9 ms, 8 warps 17.0, v_split 4 21.5,
#   256/16/4 v_split 2 15.4, 1024/16/4 v_split 2 14.7; at head dim 64 v_split 2 6.2 ms against
#   2.63. Head dim 64 at 1024/16/4: 2.55 ms at 8K (twice), other T not timed, so it stays at 512.
# - Compiled for sm_90 without a GPU (benchmarks/kernel_resources.py, kernels_sm90_d*.json): at
#   head dim 128 and 8 warps the per-chunk kernels take 200-255 registers (one program per SM) and
#   the backward spills 104-144 B per thread; the loops' products are HMMA, not HGMMA. Why no
#   entry here reaches the 4.4 ms goal is in benchmarks/results/README.md.
# - H200, 2026-12-05 (tune_h200_fill.json, T = 8K): fill = 1 lost at both head dims: 128, sub-chunk
#   64 / 32 at 8 warps 14.06 / 13.32 ms (4 warps 16.01 / 13.88, v_split 2 23.08) against 9.44;
#   64, sub-chunk 64 / 32 3.15 / 3.83 against 2.63.
# - 2026-12-05, later (tune_h100_blocks*.json, tune_h200_blocks*.json, T = 8K): fill = F rebuilt with
#   the key-blocked kernels (triton_blocks.py). Head dim 128: best fill 64 at 4 warps, 9.92 ms against
#   the table's 9.46 on the H200 (10.31 against 9.28 on the H100); fill 128 / 32 and 8 or 2 warps
#   slower. Head dim 64: 3.59 (H100) and 4.34 (H200, 2 warps) against 2.60 / 2.64. So fill stays 0.
# Not measured, so the defaults the kernels had before this table (chunk 256, sub-chunk 16,
# 4 warps up to head dim 64, 8 at 128): every fp16 and fp32 entry and head dims 16 and 32. The
# scans' 8 chunks x 64 elements were never swept. A larger chunk also sends more positions to
# the exact kernels when one of its sub-chunks' keys spread past `span` (triton_diag.py).
_BF16, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32
_TILES = {  # (head dim, dtype): (chunk, sub_chunk, warps)
    (16, _BF16): (256, 16, 4),   # not measured
    (16, _FP16): (256, 16, 4),   # not measured
    (16, _FP32): (256, 16, 4),   # not measured
    (32, _BF16): (256, 16, 4),   # not measured
    (32, _FP16): (256, 16, 4),   # not measured
    (32, _FP32): (256, 16, 4),   # not measured
    (64, _BF16): (512, 16, 4),   # measured: H200 (above)
    (64, _FP16): (256, 16, 4),   # not measured
    (64, _FP32): (256, 16, 4),   # not measured
    (128, _BF16): (1024, 16, 8),  # measured: H200 (above)
    (128, _FP16): (256, 16, 8),  # not measured
    (128, _FP32): (256, 16, 8),  # not measured
}

TABLE: dict[tuple[int, torch.dtype], LaunchConfig] = {
    (d, dtype): _check(LaunchConfig(chunk, sub_chunk, warps, prec=_PREC[dtype]))
    for (d, dtype), (chunk, sub_chunk, warps) in _TILES.items()
}

_active = TABLE  # what launch_config reads: TABLE, or TABLE with an override's fields replaced


def launch_config(head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The launch parameters for inputs of this head dim (max of d_k, d_v) and dtype."""
    try:
        return _active[(head_dim, dtype)]
    except KeyError:
        raise ValueError(f"the Triton kernels take head dims {HEAD_DIMS} and dtypes {DTYPES}, "
                         f"not {head_dim}, {dtype}") from None


@contextlib.contextmanager
def override(config: LaunchConfig | None = None, **fields) -> Iterator[None]:
    """Inside the `with`, every key of the table runs with `config` (if given) and then `fields`
    replaced (e.g. `override(chunk=128, warps=8)`, `override(span=-1)`). Overrides nest.
    For benchmarks and tests: a call's config is fixed at its forward, so a backward outside
    the `with` still matches its forward."""
    global _active
    unknown = set(fields) - set(LaunchConfig._fields)
    if unknown:
        raise TypeError(f"override: unknown fields {sorted(unknown)}; allowed: {', '.join(LaunchConfig._fields)}")
    previous = _active
    base = {key: (config if config is not None else cfg) for key, cfg in previous.items()}
    _active = {key: _check(cfg._replace(**fields)) for key, cfg in base.items()}
    try:
        yield
    finally:
        _active = previous


_OLD_KNOBS = [name for name in os.environ if name.startswith("TITAN_LINEAR_TRITON_")]
if _OLD_KNOBS:
    warnings.warn(f"{', '.join(sorted(_OLD_KNOBS))}: ignored; the Triton kernels take their launch parameters "
                  "from titan_linear/ops/efficient_attn/triton_tuning.py (TABLE, override)", stacklevel=2)
