"""Triton forward kernels of causal efficient attention (docs/kernels.md, "Forward"; the
symbols are defined in docs/attention.md, "Notation of the Triton kernels").

Three passes, each parallel over chunks of C positions, so a 64K-token sequence keeps the GPU
as busy as 32 sequences of 2K:

1. `chunk_summary_kernel`, per (chunk, kv head): lse_n = log2-sum-exp2 of the chunk's keys and
   its local state L_n = Σ_s 2^(k2_s − lse_n) ⊗ v_s. Nothing here depends on earlier chunks.
2. `state_scan_kernel` (triton_common) carries the states across chunks:
   S_n = Σ_{m<=n} 2^(lse_m − Z_n) · L_m, with Z_n = log2 Σ_{m<=n} 2^lse_m, the z at the end of
   chunk n, which it also returns. S_n is normalised to Z_n.
3. `chunk_output_kernel`, per (chunk, kv head), walks the chunk's sub-chunks of c positions:
   the keys of the same sub-chunk through its c × c block (triton_diag.py, the only place
   where exp(k_s − z_t) needs both indices); everything earlier through the state S
   normalised to r, the z before the sub-chunk: o_t += (p_t · 2^(r − z_t)) S, exponents <= 0.
   The query heads of a group share the kv head's gates, block and state, so one program
   serves them all.
"""

import triton
import triton.language as tl

from .triton_common import LOG2E, softmax_rows
from .triton_diag import (advance_state, diag_scores, load_rows, load_sub_chunk, mm, state_before_chunk,
                          sub_chunks_exact_only, z_before_chunk)


@triton.jit
def chunk_summary_kernel(
    K, V, L, LSE, FLAGS,
    skb, skh, skt, svb, svh, svt,
    T, HK, NC,
    C: tl.constexpr, SB: tl.constexpr, c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, SPAN: tl.constexpr,
):
    """Grid (NC, B · HK, DV // BV). L: (B · HK, NC, DK, DV), LSE: (B · HK, NC, DK), both fp32;
    FLAGS: (B · HK, NC) int32, 1 where the chunk needs the exact kernels (triton_diag.py).
    Program (n, bhk, j) writes value features j · BV … j · BV + BV − 1 of L; the first block's
    program writes LSE and FLAGS.

    The chunk is read SB rows at a time with a running max (as in online softmax), so a long
    chunk at head dim 128 in fp32 does not outgrow shared memory."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    vb = tl.program_id(2)
    b, hk = bhk // HK, bhk % HK
    b64 = b.to(tl.int64)
    dk, dv = tl.arange(0, DK), vb * BV + tl.arange(0, BV)
    m = tl.full([DK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([DK], dtype=tl.float32)
    state = tl.zeros([DK, BV], dtype=tl.float32)
    flag = 0
    for j in range(C // SB):
        t0 = n * C + j * SB
        t = t0 + tl.arange(0, SB)
        tm = t < T
        kp = K + b64 * skb + hk * skh + t[:, None].to(tl.int64) * skt + dk[None, :]
        vp = V + b64 * svb + hk * svh + t[:, None].to(tl.int64) * svt + dv[None, :]
        k2 = tl.load(kp, mask=tm[:, None], other=float("-inf")).to(tl.float32) * LOG2E
        v = tl.load(vp, mask=tm[:, None], other=0.0).to(tl.float32)
        # Finite from the first block on: every chunk starts with a real position.
        m_new = tl.maximum(m, tl.max(k2, axis=0))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(k2 - m_new[None, :])
        s = s * alpha + tl.sum(e, axis=0)
        state = state * alpha[:, None] + mm(tl.trans(e), v, PREC)
        m = m_new
        flag = tl.maximum(flag, sub_chunks_exact_only(K, b64, hk, t0, T, skb, skh, skt, k2, SPAN, SB, c, DK))
    base = bhk.to(tl.int64) * NC + n
    tl.store(L + base * DK * DV + dk[:, None] * DV + dv[None, :], state / s[:, None])
    if vb == 0:
        tl.store(LSE + base * DK + dk, m + tl.log2(s))
        tl.store(FLAGS + base, flag)


@triton.jit
def chunk_output_kernel(
    Q, K, V, O, S_END, Z_END, FLAGS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, HK, NC,
    G: tl.constexpr, C: tl.constexpr, c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (NC, B · HK, DV // BV). S_END: (B · HK, NC, DK, DV) state after each chunk (scan
    output); Z_END: (B · HK, NC, DK) log2 z at the end of each chunk. Program (n, bhk, j) writes
    value features j · BV … j · BV + BV − 1 of the output (V, O and S_END are read from that
    column on). FAST takes the chunks FLAGS leaves unflagged, the exact variant the others."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    vb = tl.program_id(2)
    V += vb * BV
    O += vb * BV
    b, hk = bhk // HK, bhk % HK
    dv, ic = tl.arange(0, BV), tl.arange(0, c)
    base = bhk.to(tl.int64) * NC + n
    if (tl.load(FLAGS + base) == 0) != FAST:
        return
    r = z_before_chunk(Z_END, bhk, n, NC, DK)
    S = state_before_chunk(S_END + vb * BV, bhk, n, NC, DK, DV, BV)
    vs = tl.zeros([BV], dtype=tl.float32)  # the values as they are (the backward shifts them)
    b64 = b.to(tl.int64)
    for i in range(C // c):
        t0 = n * C + i * c
        t = t0 + ic
        tm = t < T
        t64 = t.to(tl.int64)
        # Loaded here, not one sub-chunk ahead as bwd_query_kernel does: measured on an H100,
        # loading ahead made this kernel slower (0.51 -> 0.61 ms at 65,536 tokens x 16 heads).
        k_raw = load_rows(K, b64, hk, t0, t0, T, skb, skh, skt, c, DK)
        v_raw = load_rows(V, b64, hk, t0, t0, T, svb, svh, svt, c, BV)
        krow, k2, v, rd, e, z, gate, r_next, kn = load_sub_chunk(
            K, b64, hk, t0, T, skb, skh, skt, k_raw, v_raw, r, vs, c, DK, BV, PREC, FAST)
        for g in range(G):
            h = hk * G + g
            p = softmax_rows(load_rows(Q, b64, h, t0, t0, T, sqb, sqh, sqt, c, DK))
            a = diag_scores(p, rd, e, z, FAST, krow, skt, T - t0, c, DK, PREC)
            o = mm(a, v, PREC) + mm(p * gate, S, PREC)
            op = O + b64 * sob + h * soh + t64[:, None] * sot + dv[None, :]
            tl.store(op, o.to(O.dtype.element_ty), mask=tm[:, None])
        # Also after the last sub-chunk, where the scan already has the state: a product inside
        # a runtime `if` here made Triton 3.6's bf16 output wrong and nondeterministic on an
        # H100. With one sub-chunk per chunk (LaunchConfig.fill) the compiler drops it.
        if C > c:
            S = advance_state(S, r, r_next, kn, v, PREC)
            r = r_next


@triton.jit
def state_fill_kernel(
    K, V, S_END, Z_END, SF, ZF, FF,
    skb, skh, skt, svb, svh, svt,
    T, HK, NC,
    C: tl.constexpr, c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, SPAN: tl.constexpr,
):
    """The state and log2 z after every sub-chunk, from the scan's states at chunk boundaries
    (LaunchConfig.fill): the per-chunk kernels then run one program per sub-chunk, carrying
    nothing from one sub-chunk to the next.

    Grid (NC, B · HK, (DK // BK) · (DV // BV)). S_END, Z_END: the scan's (B · HK, NC, DK, DV) and
    (B · HK, NC, DK). Writes SF (B · HK, NF, DK, DV) and ZF (B · HK, NF, DK), NF = NC · C / c, in
    the scan's layout at sub-chunk granularity (a sub-chunk wholly past T repeats the last
    state and z: no keys, nothing changes), and FF (B · HK, NF, DK // BK) int32: 1 where a
    feature of the block's keys has its first key more than SPAN below its largest
    (triton_diag.sub_chunks_exact_only's test, per sub-chunk; the caller takes the max over
    the key blocks). Program (n, bhk, j) walks chunk n for key features kb · BK … and value
    features vb · BV …: every factor of the state's update is per key feature, so a key block
    is exact on its own, and its (BK, BV) fp32 state is small enough for 64-row products."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    j = tl.program_id(2)
    kb, vb = j // (DV // BV), j % (DV // BV)
    b, hk = bhk // HK, bhk % HK
    b64 = b.to(tl.int64)
    fk, fv = kb * BK + tl.arange(0, BK), vb * BV + tl.arange(0, BV)
    prev = bhk.to(tl.int64) * NC + tl.maximum(n - 1, 0)
    r = tl.load(Z_END + prev * DK + fk, mask=fk < tl.where(n > 0, DK, 0), other=float("-inf"))
    S = tl.load(S_END + prev * DK * DV + fk[:, None] * DV + fv[None, :])
    S = tl.where(n > 0, S, 0.0)
    for i in range(C // c):
        t0 = n * C + i * c
        f = (bhk.to(tl.int64) * NC + n) * (C // c) + i
        t = t0 + tl.arange(0, c)
        tm = t < T
        kp = K + b64 * skb + hk * skh + t[:, None].to(tl.int64) * skt + fk[None, :]
        vp = V + b64 * svb + hk * svh + t[:, None].to(tl.int64) * svt + fv[None, :]
        k2 = tl.load(kp, mask=tm[:, None], other=float("-inf")).to(tl.float32) * LOG2E
        v = tl.load(vp, mask=tm[:, None], other=0.0).to(tl.float32)
        top = tl.max(k2, axis=0)
        # Finite: a sequence's first sub-chunk holds a real key, and every later one starts
        # from a finite r (a sub-chunk past T has no keys and keeps r).
        m = tl.maximum(r, top)
        e = tl.exp2(k2 - m[None, :])
        d_last = tl.exp2(r - m) + tl.sum(e, axis=0)
        r_next = m + tl.log2(d_last)
        S = S * tl.exp2(r - r_next)[:, None] + mm(tl.trans(e * (1.0 / d_last)[None, :]), v, PREC)
        r = r_next
        tl.store(SF + f * DK * DV + fk[:, None] * DV + fv[None, :], S)
        if vb == 0:
            tl.store(ZF + f * DK + fk, r)
            first = tl.sum(tl.where(tl.arange(0, c)[:, None] == 0, k2, 0.0), axis=0)
            # Past T: -inf − -inf = NaN, which compares false: nothing to flag.
            tl.store(FF + f * (DK // BK) + kb, tl.max(tl.where(first - top < -SPAN, 1, 0), axis=0))
