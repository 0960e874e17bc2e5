"""Getting a trained model ready to generate: dtype, RoPE table length, eval mode.

`Module.to(dtype)` would turn the complex RoPE table `freqs_cis` into a real tensor (dropping
its imaginary part), so only floating-point tensors are cast. The table is a non-persistent buffer
sized to the training length; generation may run longer, so it is recomputed for the
positions needed. Rows of a longer table equal those of the shorter one, so the first
positions see exactly the rotations training used.
"""

import torch
from torch import nn


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters and buffers to `dtype`; complex and integer ones stay."""
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def ensure_rope_length(model: nn.Module, length: int) -> None:
    """Make `model.freqs_cis` cover positions 0 .. length - 1 (no change if it does already)."""
    if model.freqs_cis.shape[0] >= length:
        return
    # The model's own table builder, so a subclass that changes RoPE is followed.
    model.model_args.max_seq_len = length
    model.freqs_cis = model._precompute_freqs_cis().to(model.freqs_cis.device)


def prepare_model(model: nn.Module, dtype: torch.dtype | None = None, max_len: int | None = None) -> nn.Module:
    """Eval mode, weights in `dtype` (default: as they are), RoPE table for `max_len` positions.

    Args:
        model: a llama3 `Transformer` (HybridTransformer, OELMTransformer or stock).
        dtype: the dtype to run in; default None keeps the weights' dtype.
        max_len: the longest sequence (prompt + new tokens) to generate; default None keeps the table.
    """
    model.eval()
    if dtype is not None:
        cast_weights(model, dtype)
    if max_len is not None:
        ensure_rope_length(model, max_len)
    attn_type = getattr(model.model_args, "attn_type", "sdpa")
    if attn_type != "sdpa":
        raise ValueError(f"model.attn_type = {attn_type!r} is not supported for generation: only 'sdpa'")
    return model
