"""Prefill: the model's parallel forward over the prompt, filling the caches on the way.

Each block runs its normal training-time forward (SDPA for softmax layers, the chunked
efficient-attention path for linear layers), so the prompt's logits are those of
`model(tokens)`. A forward pre-hook on every block's `attention.inner_attention` sees the
q, k, v that the block attends with, (bs, heads, seqlen, head_dim), RoPE already applied
in softmax layers, and stores:

- softmax layer: k and v into its KVCache (storage of the prompt's bucket, cache.py);
- linear layer: the recurrent state after the last prompt token, computed directly instead
  of by running the recurrence over the prompt (a Python loop of T steps):

      z_T = logsumexp_s k_s        S_T = Σ_s exp(k_s − z_T) ⊗ v_s

  one exp and one matmul per kv head; every exponent is ≤ 0, so nothing overflows. This is
  the state the recurrence ends in (docs/attention.md, "Recurrent form"), in the op's
  compute dtype (fp32, fp64 for fp64 inputs).

A forward hook on a linear layer's `attention.short_conv` (when the layer has one) stores the
state the convolution returns: its last K - 1 inputs, zeros before the first token.
"""

import torch
from torch import nn

from titan_linear.ops.efficient_attn import RecurrentState
from titan_linear.ops.efficient_attn.naive import compute_dtype

from .cache import Caches, is_linear, KVCache, MIN_BUCKET


def recurrent_state_from_prompt(k: torch.Tensor, v: torch.Tensor) -> RecurrentState:
    """The efficient-attention state after all positions of k, v.

    Args:
        k: (bs, n_kv_heads, seqlen, d_k).
        v: (bs, n_kv_heads, seqlen, d_v).

    Returns:
        RecurrentState with S (bs, n_kv_heads, d_k, d_v) and z (bs, n_kv_heads, d_k).
    """
    dtype = compute_dtype(k.dtype)
    k, v = k.to(dtype), v.to(dtype)
    z = torch.logsumexp(k, dim=2)  # (bs, n_kv_heads, d_k)
    weights = torch.exp(k - z[:, :, None])  # (bs, n_kv_heads, seqlen, d_k)
    S = weights.transpose(-1, -2) @ v  # (bs, n_kv_heads, d_k, d_v)
    return RecurrentState(S, z)


def _store_hook(caches: Caches, name: str, linear: bool):
    def hook(module, args):
        _, k, v = args[:3]
        if linear:
            caches.layers[name] = recurrent_state_from_prompt(k, v)
        else:
            cache = caches.layers[name]
            assert isinstance(cache, KVCache)
            cache.write(0, k, v)

    return hook


def _conv_hook(caches: Caches, name: str):
    def hook(module, args, output):
        # clone: the state is a view into the whole padded prompt, which it must not keep alive
        caches.conv[name] = tuple(t.clone() for t in output[1])

    return hook


@torch.no_grad()
def prefill(
    model: nn.Module,
    tokens: torch.Tensor,
    max_len: int | None = None,
    all_logits: bool = False,
    min_bucket: int = MIN_BUCKET,
) -> tuple[torch.Tensor, Caches]:
    """Run the prompt through the model and return its logits and the filled caches.

    Args:
        model: a llama3 `Transformer` (HybridTransformer, OELMTransformer or stock), prepared by
            `prepare_model` so that its RoPE table covers max_len.
        tokens: (bs, seqlen) prompt ids.
        max_len: the most tokens the caches may hold (prompt + tokens to decode); default: the
            length of the model's RoPE table. The KV storage grows up to it as the text does.
        all_logits: return the logits of every prompt position; default False returns the last
            position's only, which skips the (seqlen x vocab) output projection of long prompts.
        min_bucket: the smallest KV storage in positions (cache.py); default 256.

    Returns:
        (logits, caches): logits (bs, seqlen or 1, vocab); caches with length = seqlen.
    """
    bs, seqlen = tokens.shape
    max_len = model.freqs_cis.shape[0] if max_len is None else max_len
    if seqlen > max_len:
        raise ValueError(f"prompt of {seqlen} tokens does not fit max_len = {max_len}")
    if model.freqs_cis.shape[0] < max_len:
        raise ValueError(
            f"max_len = {max_len} exceeds the model's RoPE table ({model.freqs_cis.shape[0]} "
            "positions): call prepare_model(model, max_len=...) first"
        )
    caches = Caches.allocate(model, bs, max_len, min_bucket)
    caches.reserve(seqlen)
    handles = [
        block.attention.inner_attention.register_forward_pre_hook(_store_hook(caches, name, is_linear(block)))
        for name, block in model.layers.items()
    ]
    handles += [
        block.attention.short_conv.register_forward_hook(_conv_hook(caches, name))
        for name, block in model.layers.items()
        if is_linear(block) and block.attention.short_conv is not None
    ]
    try:
        # Transformer.forward, with the output projection cut to the positions asked for.
        h = model.tok_embeddings(tokens)
        for block in model.layers.values():
            h = block(h, model.freqs_cis, attention_masks=None)
        if not all_logits:
            h = h[:, -1:]
        logits = model.output(model.norm(h))
    finally:
        for handle in handles:
            handle.remove()
    caches.length = seqlen
    return logits, caches
