"""Chunked causal efficient attention in plain torch: exact at any key scale, memory linear in T.

The weight of key s for query t is exp(k_s − z_t) with z the logcumsumexp of the keys
(docs/attention.md, "Chunked form"). Every exponential below is of a difference that is <= 0,
so nothing overflows however large the keys are. The sequence is cut into sub-chunks of c
positions (16 by default) grouped into chunks of C positions (chunk_size); query t in
sub-chunk i of chunk n sees

1. keys of its own sub-chunk (s <= t): the exact masked form exp(k_s − z_t), a c × c × d tensor
   per sub-chunk, i.e. c · T · d in all;
2. keys of earlier sub-chunks of its chunk: through the reference r_i = z just before sub-chunk i,
   exp(k_s − z_t) = exp(k_s − r_i) · exp(r_i − z_t) with both factors <= 1 (k_s <= z_s <= r_i <= z_t);
3. keys of earlier chunks: through the state carried across chunks, normalised to the z at the
   end of the previous chunk and built by a log-depth scan over chunks (no Python loop over T).

A single factorisation reference per block is what keeps this exact: the global-max trick uses
one reference for the whole sequence and underflows (docs/attention.md, "Exact at any key
scale").
"""

import torch
import torch.nn.functional as F

from .naive import check_qkv, compute_dtype


def efficient_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    sub_chunk_size: int = 16,
) -> torch.Tensor:
    """Causal efficient attention; memory linear in T.

    The largest tensors are the sub-chunk blocks (c · T · d_k per kv head), the in-chunk attention
    (C · T per query head) and the chunk states ((T / C) · d_k · d_v per kv head).

    Args:
        q: (bs, n_heads, seqlen, d_k).
        k: (bs, n_kv_heads, seqlen, d_k); n_heads must be a multiple of n_kv_heads.
        v: (bs, n_kv_heads, seqlen, d_v).
        chunk_size: positions per chunk C, across which the state is carried; default 64.
        sub_chunk_size: positions per sub-chunk c, the size of the exact masked blocks; default 16.
            chunk_size must be a multiple of it (a smaller chunk_size is its own sub-chunk).

    Returns:
        (bs, n_heads, seqlen, d_v) in the dtype of q; gates and products are computed in fp32
        (fp64 for fp64 inputs).
    """
    group = check_qkv(q, k, v)
    if chunk_size < 1 or sub_chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} and sub_chunk_size={sub_chunk_size} must be >= 1")
    c = min(sub_chunk_size, chunk_size)
    if chunk_size % c != 0:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of sub_chunk_size={sub_chunk_size}")
    bs, n_heads, seqlen, d_k = q.shape
    n_kv_heads, d_v = k.shape[1], v.shape[-1]
    # A sequence shorter than one chunk needs only enough sub-chunks to cover it.
    C = min(chunk_size, _round_up(seqlen, c))
    padded = _round_up(seqlen, C)
    n_chunks, n_sub = padded // C, C // c
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)

    # Padding goes after every real position, so causality keeps it out of the real outputs.
    q, k, v = (F.pad(x.to(dtype), (0, 0, 0, padded - seqlen)) for x in (q, k, v))
    # torch's logcumsumexp backward, exp(logcumsumexp(log|g| − z) + k), cancels terms of size |k|:
    # in fp32 dk drifts by 4e-4 (relative RMSE) at key scale 100, in fp64 by 4e-6. The scan is
    # O(T · d), cheap beside the rest, so it always runs in fp64.
    z = torch.logcumsumexp(k.double(), dim=2).to(dtype)  # (bs, n_kv_heads, padded, d_k)
    # r[m] = z just before sub-chunk m; before the first one nothing is visible, and z_0 (<= every z)
    # stands in so that all factors stay finite.
    r = torch.cat([z[:, :, :1], z[:, :, c - 1 :: c][:, :, :-1]], dim=2)

    blocks = (bs, n_kv_heads, n_chunks, n_sub)
    p = torch.softmax(q, dim=-1).reshape(bs, n_kv_heads, group, *blocks[2:], c, d_k)
    k, z, v = k.reshape(*blocks, c, d_k), z.reshape(*blocks, c, d_k), v.reshape(*blocks, c, d_v)
    r = r.reshape(*blocks, d_k)

    o = _within_sub_chunks(p, k, z, v)
    if n_sub > 1:
        o = o + _across_sub_chunks(p, k, z, r, v)
    if n_chunks > 1:
        o = o + _across_chunks(p, k, z, r, v)
    return o.reshape(bs, n_heads, padded, d_v)[:, :, :seqlen].to(out_dtype)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _within_sub_chunks(p, k, z, v):
    """Keys s <= t of the query's own sub-chunk, exactly: exp(k_s − z_t) on a c × c × d block.

    Shapes: p (b, h, g, N, n, c, d_k); k, z (b, h, N, n, c, d_k); v (b, h, N, n, c, d_v).
    """
    c = k.shape[-2]
    visible = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()  # [t, s]: s <= t
    # Masked entries become -inf before exp, so exp never sees the positive k_s − z_t of s > t.
    log_w = (k[..., None, :, :] - z[..., :, None, :]).masked_fill(~visible[:, :, None], float("-inf"))
    attn = torch.einsum("bhgNitd,bhNitsd->bhgNits", p, torch.exp(log_w))
    return torch.einsum("bhgNits,bhNise->bhgNite", attn, v)


def _across_sub_chunks(p, k, z, r, v):
    """Keys of earlier sub-chunks j < i of the same chunk, through the reference r_i.

    Shapes as in _within_sub_chunks, with r (b, h, N, n, d_k).
    """
    n_sub = k.shape[-3]
    earlier = torch.ones(n_sub, n_sub, dtype=torch.bool, device=k.device).tril(-1)  # [i, j]: j < i
    log_kf = k[:, :, :, None] - r[:, :, :, :, None, None, :]  # (b, h, N, i, j, s, d_k)
    kf = torch.exp(log_kf.masked_fill(~earlier[:, :, None, None], float("-inf")))
    qf = p * torch.exp(r[..., None, :] - z)[:, :, None]  # (b, h, g, N, i, t, d_k)
    attn = torch.einsum("bhgNitd,bhNijsd->bhgNitjs", qf, kf)
    return torch.einsum("bhgNitjs,bhNjse->bhgNite", attn, v)


def _across_chunks(p, k, z, r, v):
    """Keys of earlier chunks, through the state carried from chunk to chunk.

    Shapes as in _across_sub_chunks.
    """
    z_end = z[:, :, :, -1, -1]  # (b, h, N, d_k)
    # Each chunk's own keys, normalised to the z at its end: Σ_s exp(k_s − z_end) ⊗ v_s.
    local = torch.einsum("bhNisd,bhNise->bhNde", torch.exp(k - z_end[:, :, :, None, None]), v)
    total = _prefix_scan(local, z_end)
    # Chunk n starts from the total up to chunk n − 1, normalised to z_end[n − 1] = r[n, 0].
    before = torch.cat([torch.zeros_like(total[:, :, :1]), total[:, :, :-1]], dim=2)
    qc = p * torch.exp(r[:, :, :, :1, None] - z)[:, :, None]  # (b, h, g, N, n, c, d_k)
    return torch.einsum("bhgNitd,bhNde->bhgNite", qc, before)


def _prefix_scan(states: torch.Tensor, z_end: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix over chunks: out[n] = Σ_{m<=n} exp(z_end[m] − z_end[n]) · states[m].

    A work-efficient scan: combine neighbouring pairs, recurse on the pairs, then fill in the
    even chunks. log2(N) levels of a few ops each, and O(N · d_k · d_v) memory kept for autograd
    (a Hillis-Steele scan would keep log2(N) copies). Every gate exp(z_end[m] − z_end[n]) has
    m <= n, so it is <= 1.

    Args:
        states: (b, h, N, d_k, d_v), chunk n normalised to z_end[n].
        z_end: (b, h, N, d_k), non-decreasing along N.
    """
    n = states.shape[2]
    if n == 1:
        return states
    if n % 2:
        # An empty chunk at the end with an unchanged z: it alters no prefix before it.
        states = torch.cat([states, torch.zeros_like(states[:, :, :1])], dim=2)
        z_end = torch.cat([z_end, z_end[:, :, -1:]], dim=2)
    s_even, s_odd = states[:, :, 0::2], states[:, :, 1::2]
    z_even, z_odd = z_end[:, :, 0::2], z_end[:, :, 1::2]
    pairs = torch.exp(z_even - z_odd)[..., None] * s_even + s_odd
    odd = _prefix_scan(pairs, z_odd)  # prefixes ending at chunks 1, 3, 5, ...
    # Chunk 2m adds its own state to the prefix ending at chunk 2m − 1 (nothing for m = 0).
    prev = torch.cat([torch.zeros_like(odd[:, :, :1]), odd[:, :, :-1]], dim=2)
    z_prev = torch.cat([z_even[:, :, :1], z_odd[:, :, :-1]], dim=2)
    even = torch.exp(z_prev - z_even)[..., None] * prev + s_even
    return torch.stack([even, odd], dim=3).flatten(2, 3)[:, :, :n]
