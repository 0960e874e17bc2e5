"""Triton backward kernels of causal efficient attention (docs/attention.md, "Gradients";
docs/kernels.md, "Backward").

With w_ts[d] = exp(k_s[d] − z_t[d]) (s <= t), p_t = softmax(q_t) and dA_ts = do_t · v_s:

    dp_t[d] = Σ_{s<=t} w_ts[d] dA_ts                    dq_t = p_t ⊙ (dp_t − p_t · dp_t)
    dv_s    = Σ_{t>=s} (Σ_d p_t[d] w_ts[d]) do_t
    dk_s[d] = Σ_{t>=s} w_ts[d] (p_t[d] dA_ts − p_t[d] dp_t[d])

(the second term of dk is the gradient through z_t, whose derivative in k_s is w_ts). No term of
size |k| is subtracted, so dk is as accurate at key scale 100 as at 1.

Values shifted by their mean. Since Σ_{s<=t} w_ts[d] = 1, replacing every v_s by v_s − m (m one
vector per sequence and kv head) lowers dp_t[d] and every dA_ts by do_t · m alike, which changes
neither dq (softmax's gradient ignores a shift common to all d) nor dk (only dA − dp enters) nor
dv (no v in it). It does change precision: the products round their operands to bf16, and a
value mean shared by all positions, common in trained layers, makes dp_t[d] nearly equal across
d, so dp − p · dp cancelled the rounding of that mean into dq (measured: 6 % error in training,
20 % with a mean of 16 standard deviations). Both kernels therefore take v − m (VSHIFT = m, a
weighted mean of the sequence's values: triton_op.py) and the state S − m (S is a weighted mean
of v, weights summing to 1).

1. `bwd_query_kernel`, forward in t per (chunk, kv head), like the output kernel: dp from the
   same-sub-chunk block plus 2^(r − z_t) ⊙ (S do_t); writes dq, c_t = p_t ⊙ dp_t (for dk), the
   references r before each sub-chunk, and the chunk's reverse summary
   LB_n = Σ_t 2^(Z_{n−1} − z_t) p_t ⊗ [do_t | dp_t] (the dp_t column elementwise).
2. `reverse_scan_kernel` (triton_common): B_n = LB_{n+1} + 2^(Z_n − Z_{n+1}) B_{n+1}, the later chunks'
   summary normalised to Z_n.
3. `bwd_key_kernel`, backward in t per (chunk, kv head): the later positions' summary B (and its
   last column b) gives dv_s = k̃_s B, dk_s = k̃_s ⊙ (B v_s − b) with k̃_s = 2^(k2_s − r'),
   r' = z at the end of the sub-chunk; the same-sub-chunk block adds the exact terms.
"""

import triton
import triton.language as tl

from .triton_common import softmax_rows
from .triton_diag import (advance_state, diag_dk, diag_dp, head_rows, load_rows, load_sub_chunk, mm, state_before_chunk,
                          z_before_chunk)


@triton.jit
def bwd_query_kernel(
    Q, K, V, DO, DQ, CDP, S_END, Z_END, R, LBX, LBL, FLAGS, VSHIFT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, sdqv, scdv,
    slv, sls, sld,
    T, HK, NC,
    G: tl.constexpr, C: tl.constexpr, c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (NC, B · HK, DV // BV). CDP: (B, H, T, DK) fp32; R: (B · HK, NC, C // c, DK) log2
    references; LBX: (B · HK, NC, DK, DV + 1), chunk n's summary stored at slot n − 1 (chunk 0's,
    which is zero since Z_{−1} = −inf, at slot NC − 1: the reverse scan's start); VSHIFT:
    (B · HK, DV) fp32, the values' shift m (module docstring).

    Program (n, bhk, j) takes value features j · BV … j · BV + BV − 1. dq, c = p ⊙ dp and the
    summary's last column lb are sums over all value features (through dA = do · v and do · S)
    and linear in them, so each block writes its part: DQ + j · sdqv, CDP + j · scdv and
    lb at LBL + j · slv + slot · sls + feature · sld (with one block these are DQ, CDP and LBX's
    last column, and the strides of j are 0); the caller sums the parts."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    vb = tl.program_id(2)
    V += vb * BV
    DO += vb * BV
    DQ += vb * sdqv
    CDP += vb * scdv
    b, hk = bhk // HK, bhk % HK
    b64 = b.to(tl.int64)
    dk, dv, ic = tl.arange(0, DK), tl.arange(0, BV), tl.arange(0, c)
    base = bhk.to(tl.int64) * NC + n
    if (tl.load(FLAGS + base) == 0) != FAST:  # the other variant takes this chunk
        return
    r = z_before_chunk(Z_END, bhk, n, NC, DK)
    r0 = r
    vs = tl.load(VSHIFT + bhk.to(tl.int64) * DV + vb * BV + dv)
    # Chunk 0's state is zero and so is its gate: the shift there is multiplied by 0.
    S = state_before_chunk(S_END + vb * BV, bhk, n, NC, DK, DV, BV) - vs[None, :]
    LB = tl.zeros([DK, BV], dtype=tl.float32)
    lb = tl.zeros([DK], dtype=tl.float32)
    H = HK * G
    lo, end = n * C, tl.minimum(T, n * C + C)
    k_raw = load_rows(K, b64, hk, lo, lo, end, skb, skh, skt, c, DK)
    v_raw = load_rows(V, b64, hk, lo, lo, end, svb, svh, svt, c, BV)
    q_raw = load_rows(Q, b64, hk * G, lo, lo, end, sqb, sqh, sqt, c, DK)
    do_raw = load_rows(DO, b64, hk * G, lo, lo, end, sdob, sdoh, sdot, c, BV)
    for i in range(C // c):
        tl.store(R + (base * (C // c) + i) * DK + dk, r)
        t0 = n * C + i * c
        t = t0 + ic
        tm = t < T
        t64 = t.to(tl.int64)
        # The next sub-chunk's rows, loaded while this one is worked on (triton_diag.load_rows).
        k_next = load_rows(K, b64, hk, t0 + c, lo, end, skb, skh, skt, c, DK)
        v_next = load_rows(V, b64, hk, t0 + c, lo, end, svb, svh, svt, c, BV)
        q_next = load_rows(Q, b64, hk * G, t0 + c, lo, end, sqb, sqh, sqt, c, DK)
        do_next = load_rows(DO, b64, hk * G, t0 + c, lo, end, sdob, sdoh, sdot, c, BV)
        krow, k2, v, rd, e, z, gate, r_next, kn = load_sub_chunk(
            K, b64, hk, t0, T, skb, skh, skt, k_raw, v_raw, r, vs, c, DK, BV, PREC, FAST)
        # 2^(r0 − z_t): r0 <= r, so no overflow; both -inf at the sequence's start, where the
        # summary is 0 (gate is), and -inf − -inf must not make it NaN.
        gate0 = gate * tl.where(r0 == r, 1.0, tl.exp2(r0 - r))[None, :]
        for g in range(G):
            h = hk * G + g
            p = softmax_rows(head_rows(Q, b64, h, t0, T, sqb, sqh, sqt, q_raw, g, c, DK))
            do = head_rows(DO, b64, h, t0, T, sdob, sdoh, sdot, do_raw, g, c, BV)
            da = mm(do, tl.trans(v), PREC)  # (t, s)
            dp = diag_dp(da, rd, e, z, FAST, krow, skt, T - t0, c, DK, PREC)
            dp += gate * mm(do, tl.trans(S), PREC)
            cdp = p * dp
            dq = cdp - p * tl.sum(cdp, axis=1)[:, None]
            dqp = DQ + b64 * sdqb + h * sdqh + t64[:, None] * sdqt + dk[None, :]
            tl.store(dqp, dq.to(DQ.dtype.element_ty), mask=tm[:, None])
            cp = CDP + ((b64 * H + h) * T + t64[:, None]) * DK + dk[None, :]
            tl.store(cp, cdp, mask=tm[:, None])
            LB += mm(tl.trans(p * gate0), do, PREC)
            lb += tl.sum(cdp * gate0, axis=0)
        if C > c:  # with one sub-chunk per chunk (LaunchConfig.fill) nothing follows
            S = advance_state(S, r, r_next, kn, v, PREC)
            r = r_next
        k_raw, v_raw, q_raw, do_raw = k_next, v_next, q_next, do_next
    slot = bhk.to(tl.int64) * NC + (n + NC - 1) % NC
    out = LBX + slot * DK * (DV + 1) + vb * BV
    tl.store(out + dk[:, None] * (DV + 1) + dv[None, :], LB)
    tl.store(LBL + vb * slv + slot * sls + dk * sld, lb)


@triton.jit
def bwd_key_kernel(
    Q, K, V, DO, CDP, Z_END, R, BX, DK_, DV_, FLAGS, VSHIFT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    sdkb, sdkh, sdkt, sdkv, sdvb, sdvh, sdvt,
    T, HK, NC,
    G: tl.constexpr, C: tl.constexpr, c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (NC, B · HK, DV // BV). Z_END: (B · HK, NC, DK) log2 z at the end of each chunk; BX:
    the reverse scan's output, (B · HK, NC, DK, DV + 1), chunk n's later-positions summary at
    slot n; CDP: the whole c = p ⊙ dp (the parts summed); VSHIFT as in bwd_query_kernel (the CDP
    it wrote was computed with the same shift).

    Program (n, bhk, j) takes value features j · BV … j · BV + BV − 1: it writes that block of dv,
    and its part of dk (a sum over the value features) at DK_ + j · sdkv; the terms of dk that
    do not involve the values (through b and c) go into block 0's part only."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    vb = tl.program_id(2)
    V += vb * BV
    DO += vb * BV
    DV_ += vb * BV
    DK_ += vb * sdkv
    b, hk = bhk // HK, bhk % HK
    b64 = b.to(tl.int64)
    dk, dv, ic = tl.arange(0, DK), tl.arange(0, BV), tl.arange(0, c)
    base = bhk.to(tl.int64) * NC + n
    if (tl.load(FLAGS + base) == 0) != FAST:  # the other variant takes this chunk
        return
    bx = BX + base * DK * (DV + 1)
    Bs = tl.load(bx + dk[:, None] * (DV + 1) + vb * BV + dv[None, :])
    bs = tl.load(bx + dk * (DV + 1) + DV)
    if BV < DV:  # value blocks: the terms without values go into block 0's part only
        first = tl.where(vb == 0, 1.0, 0.0)
    else:  # one block: a constant 1, which the compiler folds away (the kernel as it was)
        first = 1.0
    r_next = tl.load(Z_END + base * DK + dk)
    vs = tl.load(VSHIFT + bhk.to(tl.int64) * DV + vb * BV + dv)
    H = HK * G
    for jj in range(C // c):
        j = C // c - 1 - jj
        r = tl.load(R + (base * (C // c) + j) * DK + dk)
        t0 = n * C + j * c
        t = t0 + ic
        tm = t < T
        t64 = t.to(tl.int64)
        # Loaded here: loading one sub-chunk ahead, as bwd_query_kernel does, did not make this
        # kernel faster on an H100 (it spills registers already).
        k_raw = load_rows(K, b64, hk, t0, t0, T, skb, skh, skt, c, DK)
        v_raw = load_rows(V, b64, hk, t0, t0, T, svb, svh, svt, c, BV)
        krow, k2, v, rd, e, z, gate, r_end, kn = load_sub_chunk(
            K, b64, hk, t0, T, skb, skh, skt, k_raw, v_raw, r, vs, c, DK, BV, PREC, FAST)
        # The later summary is normalised to the z after this sub-chunk as the query kernel
        # carried it (r_next), so the keys are taken against that same reference.
        kt = tl.exp2(k2 - r_next[None, :])  # (s, DK), <= 1
        dvs = mm(kt, Bs, PREC)
        dks = kt * (mm(v, tl.trans(Bs), PREC) - first * bs[None, :])
        # Renormalise the summary to r now and add this sub-chunk's positions into it in place:
        # a separate (DK, DV) accumulator would cost 32 more registers per thread at 4 warps.
        if C > c:
            decay = tl.exp2(r - r_next)
            Bs = Bs * decay[:, None]
            bs = bs * decay
        for g in range(G):
            h = hk * G + g
            p = softmax_rows(load_rows(Q, b64, h, t0, t0, T, sqb, sqh, sqt, c, DK))
            do = load_rows(DO, b64, h, t0, t0, T, sdob, sdoh, sdot, c, BV)
            cdp = load_rows(CDP, b64 * H, h, t0, t0, T, T * DK, T * DK, DK, c, DK)
            da = mm(do, tl.trans(v), PREC)  # (t, s), this block's part
            a, dkd = diag_dk(p, first * cdp, da, rd, e, z, FAST, krow, skt, T - t0, c, DK, PREC)
            dvs += mm(tl.trans(a), do, PREC)
            dks += dkd
            if C > c:  # with one sub-chunk per chunk (LaunchConfig.fill) no earlier one needs it
                Bs += mm(tl.trans(p * gate), do, PREC)
                bs += tl.sum(cdp * gate, axis=0)
        r_next = r
        dkp = DK_ + b64 * sdkb + hk * sdkh + t64[:, None] * sdkt + dk[None, :]
        dvp = DV_ + b64 * sdvb + hk * sdvh + t64[:, None] * sdvt + dv[None, :]
        tl.store(dkp, dks.to(DK_.dtype.element_ty), mask=tm[:, None])
        tl.store(dvp, dvs.to(DV_.dtype.element_ty), mask=tm[:, None])
