"""Readable references for causal efficient attention (docs/attention.md, "Definition" and
"Recurrent form").

For each head, with q_t, k_t, v_t the rows of q, k, v:

    p_t    = softmax(q_t)                      (over the feature dim d)
    z_t[d] = log Σ_{s≤t} exp(k_s[d])           (logcumsumexp over positions)
    o_t    = Σ_d p_t[d] · Σ_{s≤t} exp(k_s[d] − z_t[d]) · v_s

Layout follows torchtitan's attention: q is (bs, n_heads, seqlen, head_dim), k and v are
(bs, n_kv_heads, seqlen, head_dim) and query head h reads kv head h // (n_heads // n_kv_heads),
as SDPA's enable_gqa does. Both references compute in at least fp32 (fp64 inputs stay fp64, so
tests can check the fast paths to 1e-10) and return the dtype of q.
"""

from typing import NamedTuple, Optional

import torch


class RecurrentState(NamedTuple):
    """What a decoder carries from one token to the next, per kv head.

    Args:
        S: (bs, n_kv_heads, d_k, d_v) Σ_s exp(k_s − z) ⊗ v_s, i.e. the state normalised by exp(−z).
        z: (bs, n_kv_heads, d_k) running logcumsumexp of the keys; −inf before the first token.
    """

    S: torch.Tensor
    z: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the gates and exponentials use: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Checks the shapes of q, k, v and returns the number of query heads per kv head.

    Args:
        q: (bs, n_heads, seqlen, d_k).
        k: (bs, n_kv_heads, seqlen, d_k).
        v: (bs, n_kv_heads, seqlen, d_v).
    """
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d (bs, heads, seqlen, head_dim); got {shapes}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (bs, n_kv_heads, seqlen); got {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must agree in bs, seqlen and head_dim; got {shapes}")
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} (grouped-query attention)"
        )
    return n_heads // n_kv_heads


def efficient_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The explicit T × T × d form: O(T² d) memory, for tests on short sequences.

    The weight of key s for query t and feature d is a softmax of k[:, d] over the visible
    positions s ≤ t; it is written as exactly that (a masked softmax), so it shares no code
    with the logcumsumexp used by the fast paths.

    Args:
        q: (bs, n_heads, seqlen, d_k).
        k: (bs, n_kv_heads, seqlen, d_k).
        v: (bs, n_kv_heads, seqlen, d_v).

    Returns:
        (bs, n_heads, seqlen, d_v) in the dtype of q.
    """
    group = check_qkv(q, k, v)
    bs, n_heads, seqlen, d_k = q.shape
    n_kv_heads, d_v = k.shape[1], v.shape[-1]
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    p = torch.softmax(q, dim=-1).reshape(bs, n_kv_heads, group, seqlen, d_k)
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()  # [t, s]: s <= t
    logits = k[:, :, None, :, :].expand(bs, n_kv_heads, seqlen, seqlen, d_k)  # (bs, kv, t, s, d)
    weights = torch.softmax(logits.masked_fill(~visible[:, :, None], float("-inf")), dim=3)
    attn = torch.einsum("bhgtd,bhtsd->bhgts", p, weights)  # rows sum to 1
    o = attn @ v[:, :, None]  # (bs, n_kv_heads, group, seqlen, d_v)
    return o.reshape(bs, n_heads, seqlen, d_v).to(out_dtype)


def _step(p_t, k_t, v_t, S, z):
    """One step of the recurrence in the compute dtype; every exponent is <= 0.

    Args:
        p_t: (bs, n_kv_heads, group, d_k) softmax of the query.
        k_t: (bs, n_kv_heads, d_k).
        v_t: (bs, n_kv_heads, d_v).
        S, z: the state before this token (see RecurrentState).
    """
    z_new = torch.logaddexp(z, k_t)
    S = torch.exp(z - z_new)[..., None] * S + torch.exp(k_t - z_new)[..., None] * v_t[..., None, :]
    if torch.compiler.is_compiling():
        # The same readout as a broadcast product and a sum, so that inductor generates it as
        # a reduction of its own: the einsum becomes a batched fp32 product of a few query rows,
        # which it hands to cuBLAS, one extra kernel per layer (16 of a 1B decode step's 215,
        # 0.06 ms a token on an H200). Eagerly the einsum is one kernel, the sum two.
        o_t = (p_t[..., None] * S[:, :, None]).sum(-2)
    else:
        o_t = torch.einsum("bhgd,bhde->bhge", p_t, S)
    return o_t, S, z_new


def _initial_state(k: torch.Tensor, d_v: int, dtype: torch.dtype, state: Optional[RecurrentState]):
    if state is not None:
        return state.S.to(dtype), state.z.to(dtype)
    bs, n_kv_heads, _, d_k = k.shape
    S = torch.zeros(bs, n_kv_heads, d_k, d_v, dtype=dtype, device=k.device)
    z = torch.full((bs, n_kv_heads, d_k), float("-inf"), dtype=dtype, device=k.device)
    return S, z


def efficient_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[RecurrentState] = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, Optional[RecurrentState]]:
    """A loop over positions of S_t = diag(exp(z_{t−1} − z_t)) S_{t−1} + exp(k_t − z_t) ⊗ v_t.

    Args:
        q: (bs, n_heads, seqlen, d_k).
        k: (bs, n_kv_heads, seqlen, d_k).
        v: (bs, n_kv_heads, seqlen, d_v).
        initial_state: the state after the tokens before this sequence; default None (empty).
        output_final_state: also return the state after the last token; default False.

    Returns:
        (o, final_state): o is (bs, n_heads, seqlen, d_v) in the dtype of q; final_state is a
        RecurrentState (compute dtype) or None when output_final_state is False.
    """
    group = check_qkv(q, k, v)
    bs, n_heads, seqlen, d_k = q.shape
    n_kv_heads, d_v = k.shape[1], v.shape[-1]
    dtype = compute_dtype(q.dtype)
    p = torch.softmax(q.to(dtype), dim=-1).reshape(bs, n_kv_heads, group, seqlen, d_k)
    k, v = k.to(dtype), v.to(dtype)
    S, z = _initial_state(k, d_v, dtype, initial_state)

    outputs = []
    for t in range(seqlen):
        o_t, S, z = _step(p[:, :, :, t], k[:, :, t], v[:, :, t], S, z)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=3).reshape(bs, n_heads, seqlen, d_v).to(q.dtype)
    return o, (RecurrentState(S, z) if output_final_state else None)


def efficient_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: Optional[RecurrentState] = None,
) -> tuple[torch.Tensor, RecurrentState]:
    """One decoding step in O(d_k · d_v) memory per head, whatever the length so far.

    Args:
        q_t: (bs, n_heads, 1, d_k).
        k_t: (bs, n_kv_heads, 1, d_k).
        v_t: (bs, n_kv_heads, 1, d_v).
        state: the state after the previous tokens; default None (this is the first token).

    Returns:
        (o_t, new_state): o_t is (bs, n_heads, 1, d_v) in the dtype of q_t.
    """
    group = check_qkv(q_t, k_t, v_t)
    if q_t.shape[2] != 1:
        raise ValueError(f"efficient_attention_step takes one token (seqlen 1); got q_t {tuple(q_t.shape)}")
    bs, n_heads, _, d_k = q_t.shape
    n_kv_heads, d_v = k_t.shape[1], v_t.shape[-1]
    dtype = compute_dtype(q_t.dtype)
    p_t = torch.softmax(q_t.to(dtype), dim=-1).reshape(bs, n_kv_heads, group, d_k)
    S, z = _initial_state(k_t, d_v, dtype, state)
    o_t, S, z = _step(p_t, k_t[:, :, 0].to(dtype), v_t[:, :, 0].to(dtype), S, z)
    return o_t.reshape(bs, n_heads, 1, d_v).to(q_t.dtype), RecurrentState(S, z)
