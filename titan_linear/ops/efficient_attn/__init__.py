"""Causal efficient attention (docs/attention.md): one public entry point beside its references.

`efficient_attention` is what models call. `naive.py` holds the fp32 references (quadratic and
recurrent) and the one-token decoding step; `chunk.py` holds the plain-torch chunked form;
`triton_op.py` the fast GPU path (Triton kernels behind torch custom ops, launched with the
parameters `triton_tuning.py`'s table gives per head dim and dtype).

The implementation is chosen per call (`_select_impl`): the Triton path for CUDA tensors it
supports, the chunked torch path otherwise. The environment variable TITAN_LINEAR_ATTN_IMPL
(auto | triton | torch, read at import) or `set_impl` overrides the choice.
"""

import os
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
    "efficient_attention_triton",
    "impl_name",
    "set_impl",
]

try:  # triton ships with CUDA builds of torch on Linux; elsewhere only the torch path exists
    from .triton_op import efficient_attention_triton, supports as _triton_supports
except ImportError:  # pragma: no cover
    efficient_attention_triton, _triton_supports = None, None

IMPLS = ("auto", "triton", "torch")
_impl = "auto"


def set_impl(name: str) -> None:
    """Force an implementation: "auto" (Triton on supported CUDA inputs), "triton" or "torch"."""
    global _impl
    if name not in IMPLS:
        raise ValueError(f"TITAN_LINEAR_ATTN_IMPL = {name!r} is not allowed: one of {', '.join(IMPLS)}")
    if name == "triton" and efficient_attention_triton is None:
        raise ValueError("TITAN_LINEAR_ATTN_IMPL = 'triton' is not allowed here: triton is not installed")
    _impl = name


set_impl(os.environ.get("TITAN_LINEAR_ATTN_IMPL", "auto"))


def _select_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The one dispatch point: which implementation serves a call.

    Both must agree with `efficient_attention_quadratic` (tests/ops/test_efficient_attn.py,
    tests/ops/test_triton_attn.py, tests/ops/test_gpu.py). fp64 inputs and CPU tensors take the chunked
    torch path; "triton" forced on the CPU runs the kernels only under TRITON_INTERPRET=1.
    """
    if _impl == "torch" or efficient_attention_triton is None:
        return efficient_attention_chunked
    if _impl == "triton" or (q.is_cuda and _triton_supports(q, k, v)):
        return efficient_attention_triton
    return efficient_attention_chunked


def impl_name(device: torch.device | str, dtype: torch.dtype, head_dim: int = 64) -> str:
    """Which implementation serves inputs of this device, dtype and head dim (benchmark records)."""
    x = torch.empty((1, 1, 1, head_dim), device=device, dtype=dtype)
    return "triton" if _select_impl(x, x, x) is efficient_attention_triton else "torch (chunked)"


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
    return _select_impl(q, k, v)(q, k, v)
