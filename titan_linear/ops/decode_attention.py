"""Softmax attention of one new token per sequence over its KV cache, split over positions
(flash-decoding): the decode step's softmax layers, as one Triton kernel and a combine.

At batch 1 the plain form, two batched products (inference/graph_decode.py's
`_cached_attention`, kept as the reference and the CPU path), has too little parallel work for a
long cache: its product with V has bs · n_kv_heads outputs of (group × head_dim), and cuBLAS ran
it as 8 programs for the 1B model (measured on an H100 at 32K cached positions: 0.23 ms per
layer for 34 MB of V, 0.15 TB/s; with the scores' product and softmax 0.29 ms per layer, 2.3 of
the ratio-0.5 step's 3.7 ms).

`decode_attention_kernel` runs program (kv head of a sequence, split s) over its split's block of
positions, `block` positions at a time: the group's query rows (padded to 16, the tensor cores'
smallest tile) times the keys, an online softmax in base 2, and the probabilities times the
values, all in one pass, so K and V are each read once. Positions past `pos` (the token being
decoded) are not read at all: each program loops only to min(its block's end, pos + 1), so a
bucket of KV storage larger than the text costs nothing past the text. Each program writes its
running max, sum and unnormalised output (fp32); `decode_attention` combines the splits in
torch (inductor fuses the few elementwise ops and the sum over splits into one kernel).

The scores and sums are fp32 and the probabilities meet V in V's dtype, as in FlashAttention
and the reference. Exposed as the custom op `titan_linear::decode_attention_splits` (opaque
to torch.compile, captured by CUDA graphs). `DEVICES` is where `_cached_attention` takes it;
tests add "cpu" under Triton's interpreter.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .gemv import sm_count

DEVICES = ("cuda",)
BLOCK = 64  # positions per step of a program's loop
MIN_ROWS = 16  # tl.dot's smallest tile: the group's query rows are padded to it
LOG2E = 1.4426950408889634


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, n_kv, rows, split_len, scale,
                            sq_b, sq_h, sq_r, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                            R: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // n_kv
    h = bh % n_kv
    rr = tl.arange(0, R)
    rd = tl.arange(0, D)
    rn = tl.arange(0, BN)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rr[:, None] * sq_r + rd[None, :], mask=(rr < rows)[:, None], other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    start = s * split_len
    end = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, start + split_len)
    m = tl.full((R,), float("-inf"), tl.float32)
    l = tl.zeros((R,), tl.float32)
    acc = tl.zeros((R, D), tl.float32)
    for n0 in range(start, end, BN):
        n = n0 + rn
        valid = n < end
        k = tl.load(k_base + n[:, None] * sk_n + rd[None, :], mask=valid[:, None], other=0.0)
        # scores in log2 units: exp2 is the hardware's exponential
        x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        x = tl.where(valid[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))  # finite: every step has a valid position
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(x - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * sv_n + rd[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    out = (bh * splits + s) * rows + rr  # row of the (bs · n_kv, splits, rows) outputs
    keep = rr < rows
    tl.store(m_ptr + out, m, mask=keep)
    tl.store(l_ptr + out, l, mask=keep)
    tl.store(acc_ptr + out[:, None] * D + rd[None, :], acc, mask=keep[:, None])


@torch.library.custom_op("titan_linear::decode_attention_splits", mutates_args=())
def decode_attention_splits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, splits: int,
                            split_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per split of positions: (max in log2 units, sum of exp2, unnormalised output), fp32,
    shaped (bs · n_kv, splits, rows) and (bs · n_kv, splits, rows, d). Arguments as for
    `decode_attention`, plus split_len, the positions per split (a multiple of BLOCK)."""
    bs, n_kv, rows, d = q.shape
    m = torch.empty(bs * n_kv, splits, rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(bs * n_kv, splits, rows, d, dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products; 16-bit: ignored
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        decode_attention_kernel[(bs * n_kv, splits)](
            q, k, v, pos, m, l, acc, n_kv, rows, split_len, d**-0.5 * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            R=max(MIN_ROWS, triton.next_power_of_2(rows)), D=d, BN=BLOCK, PREC=prec, num_warps=4, num_stages=2)
    return m, l, acc


@decode_attention_splits.register_fake
def _(q, k, v, pos, splits, split_len):
    bs, n_kv, rows, d = q.shape
    m = q.new_empty(bs * n_kv, splits, rows, dtype=torch.float32)
    return m, torch.empty_like(m), q.new_empty(bs * n_kv, splits, rows, d, dtype=torch.float32)


def auto_splits(bs: int, n_kv: int, device: torch.device) -> int:
    """Splits that give about two programs per SM: at batch 1 with 8 kv heads on 132 SMs, 33."""
    return max(1, -(-2 * sm_count(device) // (bs * n_kv)))


def check_splits(splits) -> None:
    """ValueError naming `kv_splits` unless it is an integer >= 0 (GraphDecoder checks it up front)."""
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 0:
        raise ValueError(f"kv_splits = {splits!r} is not allowed: an integer >= 0 (0: automatic)")


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `decode_attention` runs here: a device in DEVICES, fp32 / fp16 / bf16, a power-of-two
    head dim of at least 16 (the tile's last dim), features contiguous."""
    d = q.shape[-1]
    return (q.device.type in DEVICES and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and d >= 16 and not d & (d - 1) and q.stride(-1) == 1 and k.stride(-1) == 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     splits: int = 0) -> torch.Tensor:
    """softmax(q kᵀ / √d over positions 0..pos) v for each sequence's kv head.

    Args:
        q: (bs, n_kv, rows, d), the query heads that share each kv head as its rows.
        k, v: (bs, n_kv, capacity, d), the KV storage; positions past pos are never read.
        pos: (1,) integer tensor on q's device, the last filled position (< capacity).
        splits: blocks of positions, each its own program per kv head; 0 picks `auto_splits`.

    Returns:
        (bs, n_kv, rows, d) in q's dtype.
    """
    check_splits(splits)
    bs, n_kv, rows, d = q.shape
    splits = splits or auto_splits(bs, n_kv, q.device)
    capacity = k.shape[2]
    split_len = triton.cdiv(triton.cdiv(capacity, splits), BLOCK) * BLOCK
    m, l, acc = decode_attention_splits(q, k, v, pos, splits, split_len)
    # splits past pos have m = -inf and weigh 0; split 0 always holds position 0
    w = torch.exp2(m - m.amax(1, keepdim=True))
    out = (acc * w[..., None]).sum(1) / (l * w).sum(1)[..., None]
    return out.reshape(bs, n_kv, rows, d).to(q.dtype)
