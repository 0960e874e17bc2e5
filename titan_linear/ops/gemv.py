"""y = x Wᵀ for a few rows of x: the decode step's matrix-vector products as one Triton kernel.

At batch 1 a decode step's products read every weight once and do two flops per weight: they
are bound by memory bandwidth, and only a kernel that keeps every SM loading reaches it. On an
H200 cuBLAS read the output head (128256 × 2048) and the fused w1·w3 (16384 × 2048) at 3.7-4.4
TB/s but w2 (2048 × 8192), the fused q·k·v (3072 × 2048) and wo (2048 × 2048) at ~2.2 of the
4.8 (docs/inference.md): a matrix of 2048 rows, cut into row tiles, gives too few programs
for 132 SMs. So `gemv_kernel` also cuts K ("split-K"): program (i, s) takes row tile i over the
s-th of `split` slices of K, and a matrix of few rows still gives several programs per SM.

One program: `block_n` rows of W, `block_k` columns per step, each thread loading 8 contiguous
bf16 (16 bytes) at a time; fp32 sums. Two ways to multiply:

- one row of x (dot=False): the products summed elementwise in a (block_n, block_k) fp32 tile,
  reduced across K once at the end (no tensor cores: 2 flops per weight are nothing to them,
  and they would waste 15 of 16 rows);
- 2 to 16 rows (dot=True): `tl.dot` of the W tile with x's rows padded to 16, on the tensor
  cores, since elementwise sums would cost 16 fp32 FMAs per weight, more than the CUDA cores
  do at 4.8 TB/s; loads into shared memory are then software-pipelined over `stages` steps.

Split-K sums are deterministic in one kernel: each program writes its fp32 partial (split,
rows, N) to a workspace, then counts itself in with an atomic add on its row tile's counter;
the program that arrives last sums the `split` partials in slice order (the same sum whichever
program comes last), writes y and resets the counter for the next launch. The counters are one
persistent zeroed tensor per device (a launch leaves them zero), so nothing is cleared per
call and a CUDA graph replays the kernel as is. Calls must be stream-ordered (two products
running at once on two streams would share counters); a decode step's are.

Exposed as the custom op `titan_linear::gemv` (opaque to torch.compile, captured by CUDA
graphs); `linear(x, weight)` takes it where it applies (`supports`) and F.linear elsewhere,
and `GemvLinear` is an nn.Linear whose forward is `linear` (models/fused.py's `use_gemv`).
Launch parameters come from `launch_config(rows, N, K, sms)`, a heuristic; `override` replaces
fields for benchmarks (benchmarks/gemv.py) and tests. Nothing is read from the environment.
"""

import contextlib
import functools
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

MAX_ROWS = 16  # rows of x the kernel takes: the dot path pads them to one 16-row tile
DTYPES = (torch.bfloat16, torch.float16)  # what `linear` sends to the kernel (the kernel also takes fp32)
DEVICES = ("cuda",)  # where `linear` sends it; tests add "cpu" under Triton's interpreter
COUNTERS = 1 << 16  # row tiles one split-K launch may have (int32 counters per device)
SMS_WITHOUT_GPU = 132  # an H100 / H200, for configs chosen off the GPU (interpreter, tests)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                DOT: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    n_in = rn < N
    k_len = K // SPLIT
    # A multiple of BK (`check`): said so, the compiler can load 16 bytes at a time along K
    # (it cannot see through the division).
    k0 = tl.multiple_of(pid_k * k_len, BK)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :]  # (BN, BK)
    if DOT:
        x_ptrs = x_ptr + rm[None, :] * stride_xm + (k0 + rk)[:, None]  # (BK, BM): x's rows as columns
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        x_ptrs = x_ptr + (k0 + rk)[None, :]  # (1, BK): the one row
        acc = tl.zeros((BN, BK), tl.float32)
    for _ in range(0, k_len, BK):
        w = tl.load(w_ptrs, mask=n_in[:, None], other=0.0)
        if DOT:
            x = tl.load(x_ptrs, mask=(rm < M)[None, :], other=0.0)
            acc = tl.dot(w, x, acc, input_precision=PREC)
        else:
            x = tl.load(x_ptrs)
            acc += w.to(tl.float32) * x.to(tl.float32)
        w_ptrs += BK
        x_ptrs += BK
    if DOT:
        out = acc  # (BN, BM)
    else:
        out = tl.sum(acc, axis=1)[:, None]  # (BN, 1)
    mask = n_in[:, None] & (rm < M)[None, :]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    if SPLIT == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = part_ptr + rm[None, :] * N + rn[:, None]  # slice pid_k of the (SPLIT, M, N) workspace
        tl.store(part + pid_k * M * N, out, mask=mask)
        # Every thread's partial is stored before the count (the barrier), and the count's
        # release / acquire makes the partials of all earlier arrivals visible to the last one.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BN, BM), tl.float32)
            for s in range(SPLIT):
                total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


class GemvConfig(NamedTuple):
    """How `gemv_kernel` is launched for one product.

    block_n  rows of W per program (a power of two >= 16; 64 or more lets the dot path use
             Hopper's warpgroup products).
    block_k  columns of W per step of a program's loop (a power of two >= 16 dividing K / split).
    split    slices of K, each its own program (split-K); 1: no workspace, no counters.
    warps    num_warps.
    stages   num_stages: loads in flight across steps of the loop (the pipeliner's depth).
    dot      tensor-core products (any rows up to 16) or elementwise sums (one row only).
    """

    block_n: int
    block_k: int
    split: int
    warps: int = 4
    stages: int = 3
    dot: bool = False


_overrides: dict = {}  # fields `override` replaces in every launch_config


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and not x & (x - 1)


def _pow2_dividing(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    return min(cap, n & -n)


def launch_config(rows: int, n: int, k: int, sms: int = SMS_WITHOUT_GPU) -> GemvConfig:
    """The launch for x (rows, k) times W (n, k)ᵀ on a GPU of `sms` SMs, `override`'s fields replaced.

    The heuristic: one row takes elementwise sums in tiles of 16 rows × up to 512 columns (16 KB
    of bf16 per step, 64 B in flight per thread), more rows the tensor cores in 64 × up to 128
    tiles (wgmma's 64-row minimum at 4 warps). K is then split in two until the row tiles times
    the splits make 4 programs per SM, keeping slices of at least 256 columns (a smaller slice
    makes the partials' traffic and the reduction a larger share). At the 1B decode shapes, one
    row, 132 SMs: the output head and w1·w3 no split (8016 and 1024 tiles), q·k·v 4 (192 tiles,
    slices of 512), wo 8 (128 tiles, slices of 256), w2 8 (128 tiles, slices of 1024). Timed per
    shape against cuBLAS on an H100 (benchmarks/results/gemv_h100.json: slower except on the
    output head); other candidates not timed: benchmarks/gemv.py --sweep times them.
    """
    dot = rows > 1
    block_n, block_k_max = (64, 128) if dot else (16, 512)
    tiles = -(-n // block_n)
    split = 1
    while tiles * split < 4 * sms and k % (2 * split) == 0 and k // (2 * split) >= 256:
        split *= 2
    cfg = GemvConfig(block_n, _pow2_dividing(k // split, block_k_max), split, dot=dot)
    return check(cfg._replace(**_overrides), rows, n, k)


def check(cfg: GemvConfig, rows: int, n: int, k: int) -> GemvConfig:
    """cfg if the kernel can run it for x (rows, k), W (n, k); ValueError naming the field if not."""
    for name in ("block_n", "block_k", "split", "warps"):
        if not _pow2(getattr(cfg, name)):
            raise ValueError(f"gemv {name} = {getattr(cfg, name)!r} is not allowed: a power of two")
    if not isinstance(cfg.stages, int) or isinstance(cfg.stages, bool) or cfg.stages < 1:
        raise ValueError(f"gemv stages = {cfg.stages!r} is not allowed: an integer >= 1")
    if cfg.block_n < 16 or cfg.block_k < 16:
        raise ValueError(f"gemv block_n = {cfg.block_n}, block_k = {cfg.block_k} are not allowed: each >= 16")
    if k % (cfg.split * cfg.block_k):
        raise ValueError(f"gemv block_k = {cfg.block_k}, split = {cfg.split} are not allowed for K = {k}: "
                         "block_k × split must divide K")
    if not 1 <= rows <= (MAX_ROWS if cfg.dot else 1):
        raise ValueError(f"gemv dot = {cfg.dot} is not allowed for {rows} rows: dot=False takes 1 row, "
                         f"dot=True 1 to {MAX_ROWS}")
    if cfg.split > 1 and -(-n // cfg.block_n) > COUNTERS:
        raise ValueError(f"gemv split = {cfg.split} is not allowed for N = {n} at block_n = {cfg.block_n}: "
                         f"more than {COUNTERS} row tiles")
    return cfg


@contextlib.contextmanager
def override(**fields) -> Iterator[None]:
    """Inside the `with`, every launch_config has these GemvConfig fields replaced (e.g.
    `override(split=8, block_k=256)`); for benchmarks and tests. Overrides nest."""
    global _overrides
    unknown = set(fields) - set(GemvConfig._fields)
    if unknown:
        raise TypeError(f"override: unknown fields {sorted(unknown)}; allowed: {', '.join(GemvConfig._fields)}")
    previous = _overrides
    _overrides = {**previous, **fields}
    try:
        yield
    finally:
        _overrides = previous


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    # Kept for the process: a CUDA graph that captured a launch keeps its address.
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


# Called at trace time under torch.compile, its result a constant of the graph.
@torch.compiler.assume_constant_result
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS_WITHOUT_GPU


@torch.library.custom_op("titan_linear::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, split: int, warps: int, stages: int,
         dot: bool) -> torch.Tensor:
    """x (rows, K) @ weight (N, K)ᵀ -> (rows, N) in x's dtype; the remaining arguments are a
    GemvConfig's fields (`check`ed by the caller). K contiguous in both."""
    rows, k = x.shape
    n = weight.shape[0]
    y = x.new_empty(rows, n)
    device = x.device
    # split == 1 writes y directly: the workspace and counters are not touched.
    part = torch.empty(split, rows, n, dtype=torch.float32, device=device) if split > 1 else y
    counters = _counters(device) if split > 1 else y
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32: exact products; 16-bit: ignored
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        gemv_kernel[(triton.cdiv(n, block_n), split)](
            x, weight, y, part, counters, rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
            BM=16 if dot else 1, BN=block_n, BK=block_k, SPLIT=split, DOT=dot, PREC=prec,
            num_warps=warps, num_stages=stages)
    return y


@gemv.register_fake
def _(x, weight, block_n, block_k, split, warps, stages, dot):
    return x.new_empty(x.shape[0], weight.shape[0])


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` takes the kernel: at most MAX_ROWS rows, no bias, x and W of one dtype
    in DTYPES on a device in DEVICES, K a multiple of 16 (the smallest block) and contiguous."""
    k = weight.shape[-1]
    return (bias is None and x.dtype == weight.dtype and x.dtype in DTYPES and x.device.type in DEVICES
            and weight.dim() == 2 and weight.stride(1) == 1 and k % 16 == 0 and x.shape[-1] == k
            and x.numel() // k <= MAX_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through `gemv` when it `supports` the inputs (a decode step's
    few rows), else F.linear itself (a prefill's many rows, fp32, CPU)."""
    if not supports(x, weight, bias):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    flat = x.reshape(-1, k)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    cfg = launch_config(flat.shape[0], n, k, sm_count(x.device))
    return gemv(flat, weight, *cfg).view(*x.shape[:-1], n)


class GemvLinear(nn.Linear):
    """An nn.Linear whose forward is `linear`: the kernel for a few rows, F.linear otherwise.
    Set on a model's modules by models/fused.py's `use_gemv` (by class, so weights, hooks and
    state-dict names stay the module's own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
