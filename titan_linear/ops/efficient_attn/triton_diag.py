"""The same-sub-chunk block of causal efficient attention, shared by the Triton kernels.

Inside one sub-chunk of c positions the weight exp(k_s − z_t) depends on both indices. With r
the z just before the sub-chunk (or its first z for the very first one) it factorises as

    2^(k2_s − r) · 2^(r − z2_t),    k2_s − r <= z2_end − r,   r − z2_t <= 0,

so while z grows by at most SPAN (log2 units, 100 by default: triton_op.py) inside the
sub-chunk, neither factor leaves fp32's range (2^±126) and the block is tensor-core products.
A factor that underflows belongs to a weight below 2^-SPAN of its row's total, which is
negligible. When z grows
more (keys at scale ~100 can do that), the block falls back to the exact elementwise form,
one key at a time. Which path runs is decided per sub-chunk, so results are exact at any key
scale and fast at ordinary ones.
"""

import triton
import triton.language as tl

from .triton_common import LOG2E, lae2

@triton.jit
def sub_chunk_z(k2, r, SPAN: tl.constexpr):
    """z2 (c, D) at each position of a sub-chunk from the keys k2 (c, D) and z2 = r (D) before it.

    Returns (z2, ref, safe): the factorisation reference and whether the factorised form is
    exact here (z2 grows by at most SPAN from ref; SPAN < 0 forces the exact loop)."""
    z = lae2(r[None, :], tl.associative_scan(k2, 0, lae2))
    # z is non-decreasing in t, so its first row is its min and its last row its max.
    ref = tl.where(r == float("-inf"), tl.min(z, axis=0), r)
    safe = tl.max(tl.max(z, axis=0) - ref, axis=0) <= SPAN
    return z, ref, safe


@triton.jit
def load_sub_chunk(K, V, b64, hk, t0, T, skb, skh, skt, svb, svh, svt, r, SPAN: tl.constexpr,
                   c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """Keys (log2 units, -inf past T) and values (0 past T) of positions t0 … t0 + c − 1 of one kv
    head, with sub_chunk_z's (z2, ref, safe) and the block factors gr = 2^(ref − z2) and
    kr = 2^(k2 − ref). Returns (krow, k2, v, z2, ref, safe, gr, kr); krow is the first key row."""
    ic = tl.arange(0, c)
    tm = (t0 + ic < T)[:, None]
    krow = K + b64 * skb + hk * skh + t0.to(tl.int64) * skt
    vrow = V + b64 * svb + hk * svh + t0.to(tl.int64) * svt
    k2 = tl.load(krow + ic[:, None].to(tl.int64) * skt + tl.arange(0, DK)[None, :], mask=tm,
                 other=float("-inf")).to(tl.float32) * LOG2E
    v = tl.load(vrow + ic[:, None].to(tl.int64) * svt + tl.arange(0, DV)[None, :], mask=tm,
                other=0.0).to(tl.float32)
    z, ref, safe = sub_chunk_z(k2, r, SPAN)
    return krow, k2, v, z, ref, safe, tl.exp2(ref[None, :] - z), tl.exp2(k2 - ref[None, :])


@triton.jit
def state_before_chunk(S_END, bhk, n, NC, DK: tl.constexpr, DV: tl.constexpr):
    """The (DK, DV) state after chunk n − 1 from the scan's output; zero for chunk 0."""
    prev = bhk.to(tl.int64) * NC + tl.maximum(n - 1, 0)
    S = tl.load(S_END + prev * DK * DV + tl.arange(0, DK)[:, None] * DV + tl.arange(0, DV)[None, :])
    return tl.where(n > 0, S, 0.0)


@triton.jit
def advance_state(S, r, z, k2, v, PREC: tl.constexpr):
    """The state S (normalised to r) after the sub-chunk's keys k2 and values v, normalised to its
    last z; returns (S, that z). z is non-decreasing in t, so its last row is its max."""
    r_next = tl.max(z, axis=0)
    S = S * tl.exp2(r - r_next)[:, None] + tl.dot(tl.trans(tl.exp2(k2 - r_next[None, :])), v,
                                                  input_precision=PREC)
    return S, r_next


@triton.jit
def _key_row(krow, s, n_valid, D: tl.constexpr):
    """Row s of the sub-chunk's keys in log2 units (-inf past the sequence)."""
    # A row past the sequence reads nothing: the bound is D for a real row, 0 otherwise.
    ks = tl.load(krow + tl.arange(0, D), mask=tl.arange(0, D) < tl.where(s < n_valid, D, 0), other=float("-inf"))
    return ks.to(tl.float32) * LOG2E


@triton.jit
def diag_scores(p, gr, kr, z, safe, krow, skt, n_valid, c: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """A[t, s] = Σ_d p[t, d] · 2^(k2_s[d] − z2_t[d]) for s <= t (0 above the diagonal).

    p (c, D) query softmax; gr = 2^(ref − z2), kr = 2^(k2 − ref) (c, D); krow points at the
    sub-chunk's first key row (stride skt), n_valid rows of which are real."""
    ic = tl.arange(0, c)
    causal = ic[:, None] >= ic[None, :]
    if safe:
        a = tl.dot(p * gr, tl.trans(kr), input_precision=PREC)
    else:
        a = tl.zeros([c, c], dtype=tl.float32)
        for s in range(c):
            ks = _key_row(krow + s * skt, s, n_valid, D)
            e = tl.exp2(tl.where(ic[:, None] >= s, ks[None, :] - z, float("-inf")))
            a = tl.where(ic[None, :] == s, tl.sum(p * e, axis=1)[:, None], a)
    return tl.where(causal, a, 0.0)


@triton.jit
def diag_dp(da, gr, kr, z, safe, krow, skt, n_valid, c: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """dp[t, d] = Σ_{s<=t} 2^(k2_s[d] − z2_t[d]) · da[t, s] over the sub-chunk (da masked or not)."""
    ic = tl.arange(0, c)
    da = tl.where(ic[:, None] >= ic[None, :], da, 0.0)
    if safe:
        dp = gr * tl.dot(da, kr, input_precision=PREC)
    else:
        dp = tl.zeros([c, D], dtype=tl.float32)
        for s in range(c):
            ks = _key_row(krow + s * skt, s, n_valid, D)
            e = tl.exp2(tl.where(ic[:, None] >= s, ks[None, :] - z, float("-inf")))
            dp += e * tl.sum(tl.where(ic[None, :] == s, da, 0.0), axis=1)[:, None]
    return dp


@triton.jit
def diag_dk(p, cdp, da, gr, kr, z, safe, krow, skt, n_valid, c: tl.constexpr, D: tl.constexpr,
            PREC: tl.constexpr):
    """(A, dk) of the sub-chunk: A as diag_scores, and
    dk[s, d] = Σ_{t>=s} 2^(k2_s[d] − z2_t[d]) · (p[t, d] · da[t, s] − cdp[t, d])."""
    ic = tl.arange(0, c)
    causal = ic[:, None] >= ic[None, :]
    da = tl.where(causal, da, 0.0)
    if safe:
        pg = p * gr
        a = tl.dot(pg, tl.trans(kr), input_precision=PREC)
        below = tl.where(causal, 1.0, 0.0)  # [t, s]: t >= s
        dk = kr * (tl.dot(tl.trans(da), pg, input_precision=PREC)
                   - tl.dot(tl.trans(below), cdp * gr, input_precision=PREC))
    else:
        a = tl.zeros([c, c], dtype=tl.float32)
        dk = tl.zeros([c, D], dtype=tl.float32)
        for s in range(c):
            ks = _key_row(krow + s * skt, s, n_valid, D)
            e = tl.exp2(tl.where(ic[:, None] >= s, ks[None, :] - z, float("-inf")))
            a = tl.where(ic[None, :] == s, tl.sum(p * e, axis=1)[:, None], a)
            da_s = tl.sum(tl.where(ic[None, :] == s, da, 0.0), axis=1)
            dk_s = tl.sum(e * (p * da_s[:, None] - cdp), axis=0)
            dk = tl.where(ic[:, None] == s, dk_s[None, :], dk)
    return tl.where(causal, a, 0.0), dk
