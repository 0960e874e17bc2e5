"""Pieces the Triton kernels share: the log2-domain log-add-exp and the scan over chunks.

The kernels work in base 2 (k2 = k · log2 e, z2 = z · log2 e, exp2 everywhere): every
exponential is then one hardware ex2 instruction, and exp2(k2 − z2) = exp(k − z) exactly.
"""

import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634
LN2_F = 0.6931471805599453
# Kernels may read module globals only when they are constexpr.
LOG2E = tl.constexpr(LOG2E_F)


@triton.jit
def lae2(a, b):
    """log2(2^a + 2^b), with -inf + -inf = -inf (padding positions hold k = -inf)."""
    m = tl.maximum(a, b)
    res = m + tl.log2(1.0 + tl.exp2(tl.minimum(a, b) - m))
    return tl.where(m == float("-inf"), m, res)


@triton.jit
def softmax_rows(q):
    """softmax over the last axis of a (c, D) tile, in fp32."""
    q2 = q.to(tl.float32) * LOG2E
    p = tl.exp2(q2 - tl.max(q2, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _gate_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): x ↦ a2 · (a1 · x + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def chunk_scan_kernel(
    U, A, F, X,
    NC, E,
    W: tl.constexpr,
    HAS_F: tl.constexpr,
    REVERSE: tl.constexpr,
    NB: tl.constexpr,
    BLK: tl.constexpr,
):
    """X_n = A_n[row] · X_{n∓1} + F_n[row] · U_n over the chunks n of one (batch, kv head).

    U, X: (BH, NC, E) fp32, E = rows · W, element e in row e // W; A, F: (BH, NC, rows).
    Forward (REVERSE False) runs n = 0 … NC−1 from X_{−1} = 0, reverse from X_{NC} = 0.
    The chunks are taken NB at a time, each block by a parallel associative scan, so a long
    sequence is NC / NB dependent steps, not NC.
    Grid: (BH, cdiv(E, BLK)).
    """
    bh = tl.program_id(0)
    e = tl.program_id(1) * BLK + tl.arange(0, BLK)
    emask = e < E
    row = e // W
    rows = E // W
    carry = tl.zeros([BLK], dtype=tl.float32)
    last = tl.arange(0, NB) == NB - 1
    for start in range(0, NC, NB):
        i = start + tl.arange(0, NB)
        n = (NC - 1 - i) if REVERSE else i
        m2 = (i < NC)[:, None] & emask[None, :]
        base = bh.to(tl.int64) * NC + n
        u = tl.load(U + base[:, None] * E + e[None, :], mask=m2, other=0.0)
        a = tl.load(A + base[:, None] * rows + row[None, :], mask=m2, other=1.0)
        if HAS_F:
            u = u * tl.load(F + base[:, None] * rows + row[None, :], mask=m2, other=0.0)
        aa, xx = tl.associative_scan((a, u), 0, _gate_combine)
        x = aa * carry[None, :] + xx
        tl.store(X + base[:, None] * E + e[None, :], x, mask=m2)
        # Rows past NC have a = 1, u = 0, so the block's last row is the carry.
        carry = tl.sum(tl.where(last[:, None], x, 0.0), axis=0)
