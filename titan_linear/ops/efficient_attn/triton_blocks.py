"""Fast kernels of the filled-state layout (LaunchConfig.fill; docs/kernels.md, "Head dim 128").

With `fill = F` the state and log2 z are stored after every block of F positions
(`state_fill_kernel`), so each block's output and gradients need only the block's own rows and
the state just before it. The kernels here take one block per program and carry nothing from
block to block. What bounds the carried-state kernels at head dim 128 is register pressure:
the (d_k, d_v) fp32 state and the full-width (rows, d_k) fp32 per-feature tiles (e, 1 / D,
p, dp, c) at once. These kernels instead walk the **key features in blocks of BK** (64): every
factor of a block's weights 2^(k2_s − z2_t) is per key feature (triton_diag.fast_factors), so a
block of key features is exact on its own, and what couples the blocks is a sum over features:

- the output's A_ts = Σ_j p_tj 2^(k2_sj − z2_tj) and (p ⊙ gate) S, summed over key blocks;
- the query softmax's normaliser, a sum over all features: its log2-sum-exp2 per row is taken
  first (a pass over the key blocks), so each block's p is exact;
- dq = c − p (Σ_j c_j) with c = p ⊙ dp: the backward writes c per key block (the key side needs
  it anyway), then dq from c read back once its row sums are known.

Only unflagged blocks come here (the factorised form is exact on them, triton_diag.py); the
flagged ones take the exact carried-state kernels of triton_fwd.py / triton_bwd.py, walking the
block in sub-chunks. The value shift VSHIFT is triton_bwd.py's.
"""

import triton
import triton.language as tl

from .triton_common import LOG2E, softmax_rows
from .triton_diag import cumsum_rows, fast_factors, mm, operand


@triton.jit
def _rows(X, row0, t, tm, f0, stride_t, W: tl.constexpr, other):
    """X[row0 + t, f0 : f0 + W] (rows past the sequence give `other`), as stored."""
    xp = X + row0 + t[:, None].to(tl.int64) * stride_t + f0 + tl.arange(0, W)[None, :]
    return tl.load(xp, mask=tm[:, None], other=other)


@triton.jit
def _query_lse(Q, row0, t, tm, sqt, DK: tl.constexpr, BK: tl.constexpr):
    """log2-sum-exp2 over the features of each query row, taken BK features at a time."""
    m = tl.full([t.shape[0]], float("-inf"), dtype=tl.float32)
    s = tl.zeros([t.shape[0]], dtype=tl.float32)
    for kb in range(DK // BK):
        q2 = _rows(Q, row0, t, tm, kb * BK, sqt, BK, 0.0).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, tl.max(q2, axis=1))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(q2 - m_new[:, None]), axis=1)
        m = m_new
    return m + tl.log2(s)


@triton.jit
def _query_block(Q, qrow0, t, tm, sqt, kb, lse, BK: tl.constexpr):
    """The query softmax p at key features kb · BK … of each row, from the row's log2-sum-exp2."""
    return tl.exp2(_rows(Q, qrow0, t, tm, kb * BK, sqt, BK, 0.0).to(tl.float32) * LOG2E - lse[:, None])


@triton.jit
def _block_keys(K, krow0, ZF, bhk, n, NF, t, tm, skt, kb, DK: tl.constexpr, BK: tl.constexpr):
    """Keys (log2 units, -inf past T) of key features kb · BK … of block n, and their z2 (BK)
    just before the block (-inf before the first)."""
    fk = kb * BK + tl.arange(0, BK)
    k2 = _rows(K, krow0, t, tm, kb * BK, skt, BK, float("-inf")).to(tl.float32) * LOG2E
    prev = bhk.to(tl.int64) * NF + tl.maximum(n - 1, 0)
    return k2, tl.load(ZF + prev * DK + fk, mask=fk < tl.where(n > 0, DK, 0), other=float("-inf"))


@triton.jit
def _state_rows(SF, bhk, n, NF, kb, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr):
    """Rows kb · BK … (BK, DV) of the state just before block n (0 before the first)."""
    prev = bhk.to(tl.int64) * NF + tl.maximum(n - 1, 0)
    fk = kb * BK + tl.arange(0, BK)
    S = tl.load(SF + prev * DK * DV + fk[:, None] * DV + tl.arange(0, DV)[None, :])
    return tl.where(n > 0, S, 0.0)


@triton.jit
def _shifted_values(V, vrow0, t, tm, svt, vs, DV: tl.constexpr, PREC: tl.constexpr):
    """The block's values less the shift vs (0 past T), as the products take them."""
    v = _rows(V, vrow0, t, tm, 0, svt, DV, 0.0).to(tl.float32) - vs[None, :]
    return operand(tl.where(tm[:, None], v, 0.0), PREC)


@triton.jit
def block_output_kernel(
    Q, K, V, O, SF, ZF, FLAGS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, HK, NF,
    G: tl.constexpr, F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (NF, B · H): block n of query head h. SF (B · HK, NF, DK, DV), ZF (B · HK, NF, DK):
    the state and log2 z after each block; FLAGS (B · HK, NF): blocks taken elsewhere.

    o_t = (Σ_{s<=t} A_ts v_s + Σ_j p_tj gate_tj S_j) with A, p, gate summed over key blocks;
    p is kept unnormalised (2^(q2 − max)) until the end, where the row's sum divides it out."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    H = HK * G
    b, h = bh // H, bh % H
    hk = h // G
    bhk = b * HK + hk
    if tl.load(FLAGS + bhk.to(tl.int64) * NF + n) != 0:
        return
    b64 = b.to(tl.int64)
    t = n * F + tl.arange(0, F)
    tm = t < T
    qrow0 = b64 * sqb + h.to(tl.int64) * sqh
    krow0 = b64 * skb + hk.to(tl.int64) * skh
    lse = _query_lse(Q, qrow0, t, tm, sqt, DK, BK)
    a = tl.zeros([F, F], dtype=tl.float32)
    o = tl.zeros([F, DV], dtype=tl.float32)
    for kb in range(DK // BK):
        k2, r = _block_keys(K, krow0, ZF, bhk, n, NF, t, tm, skt, kb, DK, BK)
        S = operand(_state_rows(SF, bhk, n, NF, kb, DK, DV, BK), PREC)
        e, rd, gate, _, _ = fast_factors(k2, r, PREC)
        p = _query_block(Q, qrow0, t, tm, sqt, kb, lse, BK)
        a += mm(p * rd, tl.trans(e), PREC)
        o += mm(p * gate, S, PREC)
    ic = tl.arange(0, F)
    a = tl.where(ic[:, None] >= ic[None, :], a, 0.0)
    v = _rows(V, b64 * svb + hk.to(tl.int64) * svh, t, tm, 0, svt, DV, 0.0)
    o += mm(a, v, PREC)
    op = O + b64 * sob + h.to(tl.int64) * soh + t[:, None].to(tl.int64) * sot + tl.arange(0, DV)[None, :]
    tl.store(op, o.to(O.dtype.element_ty), mask=tm[:, None])


@triton.jit
def _key_block_setup(K, V, ZF, VSHIFT, skb, skh, skt, svb, svh, svt, T, HK, NF, kb, n, bhk,
                     G: tl.constexpr, F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                     PREC: tl.constexpr):
    """What a (key block kb, block n, kv head) program of the backward starts from: indices, the
    causal mask, the value shift and shifted values, the key block's keys and z2 before it."""
    hk = bhk % HK
    b64 = (bhk // HK).to(tl.int64)
    t = n * F + tl.arange(0, F)
    tm = t < T
    fk, dvr, ic = kb * BK + tl.arange(0, BK), tl.arange(0, DV), tl.arange(0, F)
    vs = tl.load(VSHIFT + bhk.to(tl.int64) * DV + dvr)
    v = _shifted_values(V, b64 * svb + hk.to(tl.int64) * svh, t, tm, svt, vs, DV, PREC)
    k2, r = _block_keys(K, b64 * skb + hk.to(tl.int64) * skh, ZF, bhk, n, NF, t, tm, skt, kb, DK, BK)
    return b64, hk, HK * G, t, tm, fk, dvr, ic[:, None] >= ic[None, :], vs, v, k2, r


@triton.jit
def block_bwd_query_kernel(
    Q, K, V, DO, CDP, SF, ZF, LBX, FLAGS, VSHIFT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    T, HK, NF,
    G: tl.constexpr, F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (DK // BK, NF, B · HK): key features kb · BK … of block n of kv head hk and its G
    query heads. Writes c = p ⊙ dp (CDP, (B, H, T, DK) fp32; block_dq_kernel makes dq of it, the
    key side reads it) and those rows of the block's reverse summary [Σ_t (p ⊙ gate)_t ⊗ do_t |
    Σ_t c_t ⊙ gate_t] at LBX slot n − 1 (block 0's at NF − 1), (B · HK, NF, DK, DV + 1), as
    bwd_query_kernel does per chunk (one block is one sub-chunk: its reference is its start).
    Nothing here is summed over key blocks, so each is a program of its own."""
    kb = tl.program_id(0)
    n = tl.program_id(1)
    bhk = tl.program_id(2)
    if tl.load(FLAGS + bhk.to(tl.int64) * NF + n) != 0:
        return
    b64, hk, H, t, tm, fk, dvr, causal, vs, v, k2, r = _key_block_setup(
        K, V, ZF, VSHIFT, skb, skh, skt, svb, svh, svt, T, HK, NF, kb, n, bhk, G, F, DK, DV, BK, PREC)
    # Before the first block the gate is 0, so the shift there is multiplied by 0.
    S = operand(_state_rows(SF, bhk, n, NF, kb, DK, DV, BK) - vs[None, :], PREC)
    e, rd, gate, _, _ = fast_factors(k2, r, PREC)
    lb_v = tl.zeros([BK, DV], dtype=tl.float32)
    lb = tl.zeros([BK], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        qrow0 = b64 * sqb + h.to(tl.int64) * sqh
        p = _query_block(Q, qrow0, t, tm, sqt, kb, _query_lse(Q, qrow0, t, tm, sqt, DK, BK), BK)
        do = _rows(DO, b64 * sdob + h.to(tl.int64) * sdoh, t, tm, 0, sdot, DV, 0.0)
        da = tl.where(causal, mm(do, tl.trans(v), PREC), 0.0)
        cdp = p * (rd * mm(da, e, PREC) + gate * mm(do, tl.trans(S), PREC))
        cp = CDP + ((b64 * H + h) * T + t[:, None].to(tl.int64)) * DK + fk[None, :]
        tl.store(cp, cdp, mask=tm[:, None])
        lb_v += mm(tl.trans(p * gate), do, PREC)
        lb += tl.sum(cdp * gate, axis=0)
    out = LBX + (bhk.to(tl.int64) * NF + (n + NF - 1) % NF) * DK * (DV + 1) + fk * (DV + 1)
    tl.store(out[:, None] + dvr[None, :], lb_v)
    tl.store(out + DV, lb)


@triton.jit
def block_dq_kernel(
    Q, CDP, DQ, FLAGS,
    sqb, sqh, sqt, sdqb, sdqh, sdqt,
    T, HK, NF,
    G: tl.constexpr, F: tl.constexpr, DK: tl.constexpr,
):
    """Grid (NF, B · H): dq = c − p (Σ_j c_j) for block n of query head h, once every key
    block's c is written (the softmax's gradient needs the sum over all features)."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    H = HK * G
    b, h = bh // H, bh % H
    if tl.load(FLAGS + (b * HK + h // G).to(tl.int64) * NF + n) != 0:
        return
    b64 = b.to(tl.int64)
    t = n * F + tl.arange(0, F)
    tm = t < T
    p = softmax_rows(_rows(Q, b64 * sqb + h.to(tl.int64) * sqh, t, tm, 0, sqt, DK, 0.0))
    cdp = _rows(CDP, (b64 * H + h) * T * DK, t, tm, 0, DK, DK, 0.0)
    dq = cdp - p * tl.sum(cdp, axis=1)[:, None]
    dqp = DQ + b64 * sdqb + h.to(tl.int64) * sdqh + t[:, None].to(tl.int64) * sdqt + tl.arange(0, DK)[None, :]
    tl.store(dqp, dq.to(DQ.dtype.element_ty), mask=tm[:, None])


@triton.jit
def block_bwd_dk_kernel(
    Q, K, V, DO, CDP, ZF, BX, DK_, FLAGS, VSHIFT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt,
    T, HK, NF,
    G: tl.constexpr, F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (DK // BK, NF, B · HK): dk of key features kb · BK … of block n of kv head hk. BX:
    the reverse scan's output, block n's later-positions summary at slot n (normalised to z2
    after the block); CDP from block_bwd_query_kernel.

    dk_s = k̃_s ⊙ (B v_s − b) + e_s ⊙ (Σ_t (p ⊙ rd)_t dA_ts − Σ_{t>=s} (c ⊙ rd)_t), with
    k̃_s = 2^(k2_s − z2 after the block): every factor is of this key block alone."""
    kb = tl.program_id(0)
    n = tl.program_id(1)
    bhk = tl.program_id(2)
    if tl.load(FLAGS + bhk.to(tl.int64) * NF + n) != 0:
        return
    b64, hk, H, t, tm, fk, dvr, causal, vs, v, k2, r = _key_block_setup(
        K, V, ZF, VSHIFT, skb, skh, skt, svb, svh, svt, T, HK, NF, kb, n, bhk, G, F, DK, DV, BK, PREC)
    e, rd, gate, _, _ = fast_factors(k2, r, PREC)
    r_end = tl.load(ZF + (bhk.to(tl.int64) * NF + n) * DK + fk)
    bx = BX + (bhk.to(tl.int64) * NF + n) * DK * (DV + 1) + fk * (DV + 1)
    Bs = tl.load(bx[:, None] + dvr[None, :])
    dk = tl.exp2(k2 - r_end[None, :]) * (mm(v, tl.trans(Bs), PREC) - tl.load(bx + DV)[None, :])
    for g in range(G):
        h = hk * G + g
        qrow0 = b64 * sqb + h.to(tl.int64) * sqh
        pr = rd * _query_block(Q, qrow0, t, tm, sqt, kb, _query_lse(Q, qrow0, t, tm, sqt, DK, BK), BK)
        do = _rows(DO, b64 * sdob + h.to(tl.int64) * sdoh, t, tm, 0, sdot, DV, 0.0)
        cdp = _rows(CDP, (b64 * H + h) * T * DK, t, tm, kb * BK, DK, BK, 0.0)
        da = tl.where(causal, mm(do, tl.trans(v), PREC), 0.0)  # (t, s)
        dk += e * (mm(tl.trans(da), pr, PREC) - cumsum_rows(cdp * rd, True, PREC))
    dkp = DK_ + b64 * sdkb + hk.to(tl.int64) * sdkh + t[:, None].to(tl.int64) * sdkt + fk[None, :]
    tl.store(dkp, dk.to(DK_.dtype.element_ty), mask=tm[:, None])


@triton.jit
def block_bwd_dv_kernel(
    Q, K, DO, ZF, BX, DV_, FLAGS,
    sqb, sqh, sqt, skb, skh, skt, sdob, sdoh, sdot, sdvb, sdvh, sdvt,
    T, HK, NF,
    G: tl.constexpr, F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid (NF, B · HK): dv_s = k̃_s B + Σ_t A_ts do_t for block n of kv head hk (BX as in
    block_bwd_dk_kernel), summed over key blocks: A's part from each key block, times do."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    if tl.load(FLAGS + bhk.to(tl.int64) * NF + n) != 0:
        return
    b, hk = bhk // HK, bhk % HK
    b64 = b.to(tl.int64)
    t = n * F + tl.arange(0, F)
    tm = t < T
    dvr, ic = tl.arange(0, DV), tl.arange(0, F)
    causal = ic[:, None] >= ic[None, :]
    dv = tl.zeros([F, DV], dtype=tl.float32)
    for kb in range(DK // BK):
        fk = kb * BK + tl.arange(0, BK)
        k2, r = _block_keys(K, b64 * skb + hk.to(tl.int64) * skh, ZF, bhk, n, NF, t, tm, skt, kb, DK, BK)
        e, rd, gate, _, _ = fast_factors(k2, r, PREC)
        r_end = tl.load(ZF + (bhk.to(tl.int64) * NF + n) * DK + fk)
        bx = BX + (bhk.to(tl.int64) * NF + n) * DK * (DV + 1) + fk * (DV + 1)
        dv += mm(tl.exp2(k2 - r_end[None, :]), tl.load(bx[:, None] + dvr[None, :]), PREC)
        for g in range(G):
            h = hk * G + g
            qrow0 = b64 * sqb + h.to(tl.int64) * sqh
            pr = rd * _query_block(Q, qrow0, t, tm, sqt, kb, _query_lse(Q, qrow0, t, tm, sqt, DK, BK), BK)
            a = tl.where(causal, mm(pr, tl.trans(e), PREC), 0.0)
            do = _rows(DO, b64 * sdob + h.to(tl.int64) * sdoh, t, tm, 0, sdot, DV, 0.0)
            dv += mm(tl.trans(a), do, PREC)
    dvp = DV_ + b64 * sdvb + hk.to(tl.int64) * sdvh + t[:, None].to(tl.int64) * sdvt + dvr[None, :]
    tl.store(dvp, dv.to(DV_.dtype.element_ty), mask=tm[:, None])
