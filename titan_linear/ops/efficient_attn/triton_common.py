"""Pieces the Triton kernels share: the log2-domain log-add-exp and the scans over chunks.

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
def _weighted_sum_combine(m1, s1, u1, m2, s2, u2):
    # (m, s, u) stands for the weights 2^(lse − m) summing to s and the sum u of the states so
    # weighted; merging two rescales both to the larger m (online softmax), so every factor is <= 1.
    m = tl.maximum(m1, m2)
    ref = tl.where(m == float("-inf"), 0.0, m)  # two empty prefixes: no -inf − -inf
    a1, a2 = tl.exp2(m1 - ref), tl.exp2(m2 - ref)
    return m, s1 * a1 + s2 * a2, u1 * a1 + u2 * a2


@triton.jit
def state_scan_kernel(
    L, LSE, S, Z,
    NC, E,
    W: tl.constexpr,
    NB: tl.constexpr,
    BLK: tl.constexpr,
):
    """The forward states from the chunks' own: S_n = Σ_{m<=n} 2^(LSE_m − Z_n) · L_m with
    Z_n = log2 Σ_{m<=n} 2^LSE_m, the log2 z at the end of chunk n (also written).

    L, S: (BH, NC, E) fp32, E = rows · W, element e in row (feature) e // W; LSE, Z: (BH, NC,
    rows) fp32. Each prefix is kept as (max LSE, sum of 2^(LSE − max), weighted sum of L), so no
    factor exceeds 1, and Z = max + log2(sum) rounds once, where a chain of fp32 log-add-exps
    would round |z| at every chunk (replacing the fp64 torch logcumsumexp this way left the
    errors of the H100 stress cases unchanged to three digits).
    The chunks are taken NB at a time, each block by a parallel associative scan, so a long
    sequence is NC / NB dependent steps, not NC. Grid: (BH, cdiv(E, BLK))."""
    bh = tl.program_id(0)
    e = tl.program_id(1) * BLK + tl.arange(0, BLK)
    emask = e < E
    row = e // W
    rows = E // W
    cm = tl.full([BLK], float("-inf"), dtype=tl.float32)
    cs = tl.zeros([BLK], dtype=tl.float32)
    cu = tl.zeros([BLK], dtype=tl.float32)
    last = tl.arange(0, NB) == NB - 1
    for start in range(0, NC, NB):
        n = start + tl.arange(0, NB)
        m2 = (n < NC)[:, None] & emask[None, :]
        base = bh.to(tl.int64) * NC + n
        u = tl.load(L + base[:, None] * E + e[None, :], mask=m2, other=0.0)
        lse = tl.load(LSE + base[:, None] * rows + row[None, :], mask=m2, other=float("-inf"))
        m, s, u = tl.associative_scan((lse, tl.where(m2, 1.0, 0.0), u), 0, _weighted_sum_combine)
        m, s, u = _weighted_sum_combine(cm[None, :], cs[None, :], cu[None, :], m, s, u)
        tl.store(S + base[:, None] * E + e[None, :], u / s, mask=m2)
        tl.store(Z + base[:, None] * rows + row[None, :], m + tl.log2(s), mask=m2 & (e % W == 0)[None, :])
        # Rows past NC are empty prefixes, so the block's last row is the carry.
        cm = tl.max(tl.where(last[:, None], m, float("-inf")), axis=0)
        cs = tl.sum(tl.where(last[:, None], s, 0.0), axis=0)
        cu = tl.sum(tl.where(last[:, None], u, 0.0), axis=0)


@triton.jit
def _gate_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): x ↦ a2 · (a1 · x + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def reverse_scan_kernel(
    U, Z, X,
    NC, E,
    W: tl.constexpr,
    NB: tl.constexpr,
    BLK: tl.constexpr,
):
    """X_n = 2^(Z_n − Z_{n+1})[row] · X_{n+1} + U_n for n = NC−1 … 0 from X_{NC} = 0: the
    backward's summary of the later chunks, normalised to each chunk's end.

    U, X: (BH, NC, E) fp32, E = rows · W, element e in row e // W; Z: (BH, NC, rows) fp32, the
    log2 z at each chunk's end. The chunks are taken NB at a time, as in state_scan_kernel.
    Grid: (BH, cdiv(E, BLK))."""
    bh = tl.program_id(0)
    e = tl.program_id(1) * BLK + tl.arange(0, BLK)
    emask = e < E
    row = e // W
    rows = E // W
    carry = tl.zeros([BLK], dtype=tl.float32)
    last = tl.arange(0, NB) == NB - 1
    for start in range(0, NC, NB):
        i = start + tl.arange(0, NB)
        n = NC - 1 - i
        m2 = (i < NC)[:, None] & emask[None, :]
        base = bh.to(tl.int64) * NC + n
        u = tl.load(U + base[:, None] * E + e[None, :], mask=m2, other=0.0)
        zp = Z + base[:, None] * rows + row[None, :]
        z = tl.load(zp, mask=m2, other=0.0)
        # The next chunk's z; past the last chunk the gate is 2^-inf = 0.
        a = tl.exp2(z - tl.load(zp + rows, mask=m2 & (n < NC - 1)[:, None], other=float("inf")))
        # Rows past NC have a = 1, u = 0, so the block's last row is the carry.
        a = tl.where(m2, a, 1.0)
        aa, xx = tl.associative_scan((a, u), 0, _gate_combine)
        x = aa * carry[None, :] + xx
        tl.store(X + base[:, None] * E + e[None, :], x, mask=m2)
        carry = tl.sum(tl.where(last[:, None], x, 0.0), axis=0)
