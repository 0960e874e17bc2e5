"""Causal efficient attention (MATH.md §1): one public entry point beside its references.

`efficient_attention` is what models call. `naive.py` holds the fp32 references (quadratic and
recurrent) and the one-token decoding step; `chunk.py` holds the plain-torch chunked form.
"""

from typing import Callable

import torch

from .chunk import efficient_attention_chunked
from .naive import (
    RecurrentState,
    efficient_attention_quadratic,
    efficient_attention_recurrent,
    efficient_attention_step,
)

__all__ = [
    "RecurrentState",
    "efficient_attention",
    "efficient_attention_chunked",
    "efficient_attention_quadratic",
    "efficient_attention_recurrent",
    "efficient_attention_step",
]


def _select_impl(q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The one dispatch point: which implementation serves a call.

    A fast GPU kernel plugs in here (a later issue), e.g. `if q.is_cuda: return <kernel>`;
    it must agree with `efficient_attention_quadratic` like the chunked path does. Until then
    every device gets the chunked torch path, which runs on CPU and CUDA alike.
    """
    return efficient_attention_chunked


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal efficient attention, o_t = Σ_d softmax(q_t)[d] · Σ_{s≤t} exp(k_s[d] − z_t[d]) · v_s.

    Args:
        q: (bs, n_heads, seqlen, d_k).
        k: (bs, n_kv_heads, seqlen, d_k); n_heads must be a multiple of n_kv_heads, and query
            head h reads kv head h // (n_heads // n_kv_heads), as SDPA's enable_gqa does.
        v: (bs, n_kv_heads, seqlen, d_v).

    Returns:
        (bs, n_heads, seqlen, d_v) in the dtype of q.
    """
    return _select_impl(q)(q, k, v)
