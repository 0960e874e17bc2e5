"""The sub-chunk step of causal efficient attention, shared by the Triton kernels.

Inside one sub-chunk of c positions the weight exp(k_s − z_t) depends on both indices. With r
the z just before the sub-chunk (-inf before the first) and M = max(r, max_s k2_s) per feature,

    2^(k2_s − z2_t) = e_s / D_t,   e_s = 2^(k2_s − M) <= 1,   D_t = 2^(r − M) + Σ_{s'<=t} e_s',

so z needs no log-add-exp scan (the cumulative sum is a product with a triangular matrix) and
the block is tensor-core products of p / D and e. D is non-decreasing in t, so while its first
row is at least 2^-SPAN (SPAN log2 units, 100 by default: triton_tuning.py) every factor stays in
fp32's range (2^±126); an e that underflows belongs to a weight below 2^-26 of its row's total.

Each kernel is compiled twice (FAST a constexpr). The summary kernel flags every chunk with a
sub-chunk whose keys spread more than SPAN (keys at scale ~100 do that); the FAST kernels skip
flagged chunks and carry no fallback code (it would cost them registers), and the exact ones
take only flagged chunks, one key at a time with z from a log-add-exp scan. Results are exact
at any key scale and fast at ordinary ones.
"""

import triton
import triton.language as tl

from .triton_common import LOG2E, lae2


@triton.jit
def _bf16_round(x):
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC "ieee" / "tf32": fp32 operands at that precision;
    "bf16": operands rounded to bf16 (same exponent range as fp32, so nothing overflows), the
    rounding FlashAttention also applies to its probabilities; exact for bf16 inputs.
    "bf16sim": the same rounding, then fp32 products: Triton's interpreter multiplies bf16
    operands wrongly (as their integer bit patterns), so CPU tests check the bf16 path this way."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "bf16sim":
        return tl.dot(_bf16_round(a), _bf16_round(b), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def operand(x, PREC: tl.constexpr):
    """x as mm rounds it for a product: converted once where a tile feeds several products, so
    the fp32 copy need not stay live (bf16: half the registers)."""
    if PREC == "bf16":
        return x.to(tl.bfloat16)
    elif PREC == "bf16sim":
        return _bf16_round(x)
    else:
        return x


@triton.jit
def cumsum_rows(x, REVERSE: tl.constexpr, PREC: tl.constexpr):
    """Inclusive cumulative sum of a (c, D) fp32 tile down its rows (up them if REVERSE), as a
    product with a 0/1 triangular matrix. Below fp32 the operand is split into two bf16 parts
    (the 0/1 matrix is exact in bf16), so the sum keeps ~16 bits, not bf16's 8 or tf32's 11."""
    ic = tl.arange(0, x.shape[0])
    if REVERSE:
        tri = tl.where(ic[:, None] <= ic[None, :], 1.0, 0.0)
    else:
        tri = tl.where(ic[:, None] >= ic[None, :], 1.0, 0.0)
    if PREC == "ieee":
        return tl.dot(tri, x, input_precision="ieee")
    else:
        hi = _bf16_round(x)
        lo = x - hi
        return mm(tri, hi, "bf16sim" if PREC == "bf16sim" else "bf16") + mm(tri, lo, "bf16sim" if PREC == "bf16sim" else "bf16")


@triton.jit
def sub_chunk_z(k2, r):
    """Exact z2 (c, D) at each position of a sub-chunk from its keys k2 and z2 = r (D) before it."""
    return lae2(r[None, :], tl.associative_scan(k2, 0, lae2))


@triton.jit
def sub_chunks_exact_only(K, b64, hk, t0, T, skb, skh, skt, k2, SPAN: tl.constexpr,
                          C: tl.constexpr, c: tl.constexpr, DK: tl.constexpr):
    """1 if some sub-chunk of the chunk at t0 (keys k2, (C, DK) log2 units) may not take the
    factorised form, else 0. Sufficient for it, whatever z came before: every feature's first
    key is within SPAN of the sub-chunk's max key, since then D_0 >= 2^(k2_0 − M) >= 2^-SPAN.
    A negative SPAN flags every chunk (tests force the exact kernels that way)."""
    first_t = t0 + tl.arange(0, C // c) * c
    kp = K + b64 * skb + hk * skh + first_t[:, None].to(tl.int64) * skt + tl.arange(0, DK)[None, :]
    first = tl.load(kp, mask=(first_t < T)[:, None], other=float("-inf")).to(tl.float32) * LOG2E
    top = tl.max(tl.reshape(k2, (C // c, c, DK)), axis=1)
    # A sub-chunk wholly past T gives -inf − -inf = NaN, which compares false: nothing to flag.
    return tl.max(tl.max(tl.where(first - top < -SPAN, 1, 0), axis=1), axis=0)


@triton.jit
def load_rows(X, b64, h, t0, lo, end, sxb, sxh, sxt, c: tl.constexpr, D: tl.constexpr):
    """Rows t0 … t0 + c − 1 of head h of X as stored, 0 outside lo <= t < end. bwd_query_kernel
    loads the next sub-chunk's rows before working on this one's (they are used an iteration
    later, so the loads are in flight during that work: each program is a chain of small
    products that would otherwise wait on every load)."""
    t = t0 + tl.arange(0, c)
    xp = X + b64 * sxb + h.to(tl.int64) * sxh + t[:, None].to(tl.int64) * sxt + tl.arange(0, D)[None, :]
    return tl.load(xp, mask=((t >= lo) & (t < end))[:, None], other=0.0)


@triton.jit
def head_rows(X, b64, h, t0, end, sxb, sxh, sxt, first, g, c: tl.constexpr, D: tl.constexpr):
    """Rows of query head g of a group: `first` (loaded ahead) for g = 0, else loaded now (for
    g = 0 the load's range is empty, so it reads nothing)."""
    x = load_rows(X, b64, h, t0, t0, tl.where(g > 0, end, t0), sxb, sxh, sxt, c, D)
    return tl.where(g == 0, first, x)


@triton.jit
def fast_factors(k2, r, PREC: tl.constexpr):
    """The factorised form of a sub-chunk (module docstring) for keys k2 (c, D) in log2 units
    (-inf past the sequence) and z2 = r (D) before it: (e, 1 / D, gate = 2^(r − z2_t),
    D's last row, z2 after the sub-chunk). D may be any set of key features: every factor is
    per feature, so a block of them is exact on its own (triton_blocks.py relies on it)."""
    m = tl.maximum(r, tl.max(k2, axis=0))  # finite: a real position is here or came before
    e = tl.exp2(k2 - m[None, :])
    w = tl.exp2(r - m)
    d = w[None, :] + cumsum_rows(e, False, PREC)
    rd = 1.0 / d
    # D is non-decreasing in t (padding adds e = 0), so its max row is the last; that row
    # holds the max key's e = 1, so its log is exact even where D's first row is tiny.
    d_last = tl.max(d, axis=0)
    return e, rd, w[None, :] * rd, d_last, m + tl.log2(d_last)


@triton.jit
def load_sub_chunk(K, b64, hk, t0, T, skb, skh, skt, k_raw, v_raw, r, vs,
                   c: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr,
                   FAST: tl.constexpr):
    """Keys (log2 units, -inf past T) and values less vs (DV; 0 past T) of positions
    t0 … t0 + c − 1 of one kv head, from their rows as loaded (k_raw, v_raw: load_rows), and
    the sub-chunk's factors: FAST, the factorised form (the caller knows it is exact here:
    sub_chunks_exact_only); else z from an exact log-add-exp scan.

    Returns (krow, k2, v, rd, e, z, gate, r_next, kn):
      krow   pointer to the first key row (for the exact loop);
      rd, e  1 / D and e of the module docstring (FAST only: rd · e is the block's weight);
      z      z2 at each position (c, DK) (exact variant only: its loop weighs one key at a time);
      gate   2^(r − z2_t) (c, DK), <= 1: how the state before the sub-chunk reaches position t;
      r_next z2 after the sub-chunk (DK); kn = 2^(k2 − r_next) (c, DK), the keys as they enter
             the state normalised to r_next."""
    tm = (t0 + tl.arange(0, c) < T)[:, None]
    krow = K + b64 * skb + hk * skh + t0.to(tl.int64) * skt
    k2 = tl.where(tm, k_raw.to(tl.float32) * LOG2E, float("-inf"))
    v = tl.where(tm, v_raw.to(tl.float32) - vs[None, :], 0.0)
    if FAST:
        e, rd, gate, d_last, r_next = fast_factors(k2, r, PREC)
        kn = e * (1.0 / d_last)[None, :]
        z = gate  # unused by the fast products
    else:
        z = sub_chunk_z(k2, r)
        r_next = tl.max(z, axis=0)
        gate = tl.exp2(r[None, :] - z)
        kn = tl.exp2(k2 - r_next[None, :])
        rd, e = gate, kn  # unused by the exact loop
    return krow, k2, v, rd, e, z, gate, r_next, kn


@triton.jit
def state_before_chunk(S_END, bhk, n, NC, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """The (DK, BV) columns from S_END on (a pointer to a column of the state) of the (DK, DV)
    state after chunk n − 1, from the scan's output; zero for chunk 0."""
    prev = bhk.to(tl.int64) * NC + tl.maximum(n - 1, 0)
    S = tl.load(S_END + prev * DK * DV + tl.arange(0, DK)[:, None] * DV + tl.arange(0, BV)[None, :])
    return tl.where(n > 0, S, 0.0)


@triton.jit
def z_before_chunk(Z_END, bhk, n, NC, DK: tl.constexpr):
    """Log2 z (DK) just before chunk n: Z_END's row n − 1; -inf before the first chunk."""
    prev = bhk.to(tl.int64) * NC + n - 1
    return tl.load(Z_END + prev * DK + tl.arange(0, DK), mask=tl.arange(0, DK) < tl.where(n > 0, DK, 0),
                   other=float("-inf"))


@triton.jit
def advance_state(S, r, r_next, kn, v, PREC: tl.constexpr):
    """The state S (normalised to r) after the sub-chunk (keys kn = 2^(k2 − r_next), values v),
    normalised to r_next."""
    return S * tl.exp2(r - r_next)[:, None] + mm(tl.trans(kn), v, PREC)


@triton.jit
def _key_weights(krow, skt, s, n_valid, z, c: tl.constexpr, D: tl.constexpr):
    """The exact loop's column s: 2^(k2_s − z2_t) (c, D) for t >= s, 0 for t < s, from row s of
    the sub-chunk's keys (krow: first row, stride skt; -inf past the sequence)."""
    # A row past the sequence reads nothing: the bound is D for a real row, 0 otherwise.
    ks = tl.load(krow + s * skt + tl.arange(0, D), mask=tl.arange(0, D) < tl.where(s < n_valid, D, 0),
                 other=float("-inf")).to(tl.float32) * LOG2E
    return tl.exp2(tl.where(tl.arange(0, c)[:, None] >= s, ks[None, :] - z, float("-inf")))


@triton.jit
def diag_scores(p, rd, e, z, FAST: tl.constexpr, krow, skt, n_valid, c: tl.constexpr, D: tl.constexpr,
                PREC: tl.constexpr):
    """A[t, s] = Σ_d p[t, d] · 2^(k2_s[d] − z2_t[d]) for s <= t (0 above the diagonal).

    p (c, D) query softmax; rd, e, z from load_sub_chunk; z and krow (first key row, stride skt,
    n_valid rows real) for the exact loop."""
    ic = tl.arange(0, c)
    causal = ic[:, None] >= ic[None, :]
    if FAST:
        a = mm(p * rd, tl.trans(e), PREC)
    else:
        a = tl.zeros([c, c], dtype=tl.float32)
        for s in range(c):
            w = _key_weights(krow, skt, s, n_valid, z, c, D)
            a = tl.where(ic[None, :] == s, tl.sum(p * w, axis=1)[:, None], a)
    return tl.where(causal, a, 0.0)


@triton.jit
def diag_dp(da, rd, e, z, FAST: tl.constexpr, krow, skt, n_valid, c: tl.constexpr, D: tl.constexpr,
            PREC: tl.constexpr):
    """dp[t, d] = Σ_{s<=t} 2^(k2_s[d] − z2_t[d]) · da[t, s] over the sub-chunk."""
    ic = tl.arange(0, c)
    da = tl.where(ic[:, None] >= ic[None, :], da, 0.0)
    if FAST:
        dp = rd * mm(da, e, PREC)
    else:
        dp = tl.zeros([c, D], dtype=tl.float32)
        for s in range(c):
            w = _key_weights(krow, skt, s, n_valid, z, c, D)
            dp += w * tl.sum(tl.where(ic[None, :] == s, da, 0.0), axis=1)[:, None]
    return dp


@triton.jit
def diag_dk(p, cdp, da, rd, e, z, FAST: tl.constexpr, krow, skt, n_valid, c: tl.constexpr, D: tl.constexpr,
            PREC: tl.constexpr):
    """(A, dk) of the sub-chunk: A as diag_scores, and
    dk[s, d] = Σ_{t>=s} 2^(k2_s[d] − z2_t[d]) · (p[t, d] · da[t, s] − cdp[t, d])."""
    ic = tl.arange(0, c)
    causal = ic[:, None] >= ic[None, :]
    da = tl.where(causal, da, 0.0)
    if FAST:
        pg = p * rd
        a = mm(pg, tl.trans(e), PREC)
        dk = e * (mm(tl.trans(da), pg, PREC) - cumsum_rows(cdp * rd, True, PREC))
    else:
        a = tl.zeros([c, c], dtype=tl.float32)
        dk = tl.zeros([c, D], dtype=tl.float32)
        for s in range(c):
            w = _key_weights(krow, skt, s, n_valid, z, c, D)
            a = tl.where(ic[None, :] == s, tl.sum(p * w, axis=1)[:, None], a)
            da_s = tl.sum(tl.where(ic[None, :] == s, da, 0.0), axis=1)
            dk_s = tl.sum(w * (p * da_s[:, None] - cdp), axis=0)
            dk = tl.where(ic[:, None] == s, dk_s[None, :], dk)
    return tl.where(causal, a, 0.0), dk
