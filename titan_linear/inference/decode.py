"""Decode one token: every block reads its cache instead of the whole sequence.

The block is walked module by module (attention_norm, attention.wq/wk/wv/wo, ffn_norm,
feed_forward), the same arithmetic as TransformerBlock.forward for a sequence of one:

- softmax layer: RoPE at the token's position (torchtitan's apply_rotary_emb on that row of
  the table), k and v appended to the KVCache (grown first if the token would pass its
  bucket, cache.py), then SDPA over the filled positions, not
  causal (the new query sees every cached key). Plain `F.scaled_dot_product_attention`, not
  the block's wrapper: the wrapper puts cuDNN first, which builds a plan for every new key
  length, i.e. for every decoded token (~50 ms a call on an H100, against 0.05 ms for
  torch's default choice);
- linear layer: `efficient_attention_step` from the layer's RecurrentState, no RoPE (as in
  training, see models/hybrid/model.py); the state keeps its size. The layer's own
  `project` and `mix_output` (models/hybrid/model.py) apply its options around the step
  (short convolution from `caches.conv`, feature scale, output norm and gate), as in training.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.llama3.model.model import apply_rotary_emb

from titan_linear.models.fused import feed_forward, qkv
from titan_linear.ops.efficient_attn import efficient_attention_step

from .cache import Caches, is_linear, KVCache


def split_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of (bs, 1, dim): each (bs, 1, heads, head_dim); -1 heads as torchtitan's
    Attention does; one product when the projections are fused (models/fused.py)."""
    return tuple(p.view(x.shape[0], 1, -1, attn.head_dim) for p in qkv(attn, x))


def _softmax_attention_step(attn: nn.Module, x, cache: KVCache, pos: int, freqs_cis) -> torch.Tensor:
    xq, xk, xv = split_heads(attn, x)
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis[pos : pos + 1])
    cache.write(pos, xk.transpose(1, 2), xv.transpose(1, 2))
    k, v = cache.read(pos + 1)
    out = F.scaled_dot_product_attention(xq.transpose(1, 2), k, v, enable_gqa=attn.enable_gqa)
    return out  # (bs, n_heads, 1, head_dim)


def _linear_attention_step(attn: nn.Module, x, caches: Caches, name: str) -> torch.Tensor:
    xq, xk, xv, conv = attn.project(x, caches.conv.get(name), start=caches.length)
    out, caches.layers[name] = efficient_attention_step(xq, xk, xv, caches.layers[name])
    if conv is not None:
        caches.conv[name] = conv
    return attn.mix_output(out, x)  # (bs, n_heads, 1, head_dim)


def through_blocks(model: nn.Module, token: torch.Tensor, attend) -> torch.Tensor:
    """One token through every block, TransformerBlock.forward's arithmetic for a sequence of
    one, with each block's attention taken from `attend(name, block, x)` ((bs, 1, dim) normed
    input -> (bs, n_heads, 1, head_dim)); decode_step and graph_decode's step differ only there.

    Returns (bs, vocab) logits for the next token."""
    h = model.tok_embeddings(token.reshape(-1, 1))  # (bs, 1, dim)
    for name, block in model.layers.items():
        out = attend(name, block, block.attention_norm(h))
        h = h + block.attention.wo(out.transpose(1, 2).reshape(h.shape[0], 1, -1))
        h = h + feed_forward(block.feed_forward, block.ffn_norm(h))
    return model.output(model.norm(h))[:, 0]


@torch.no_grad()
def decode_step(model: nn.Module, token: torch.Tensor, caches: Caches) -> torch.Tensor:
    """Feed one token per sequence at position `caches.length`; update the caches in place.

    Args:
        model: the model that `prefill` filled `caches` from.
        token: (bs,) or (bs, 1) token ids.
        caches: from `prefill` (or an earlier decode_step); its length grows by one, and its KV
            storage to the next bucket when the token would pass the current one.

    Returns:
        (bs, vocab) logits for the next token.
    """
    caches.reserve(caches.length + 1)

    def attend(name, block, x):
        if is_linear(block):
            return _linear_attention_step(block.attention, x, caches, name)
        return _softmax_attention_step(block.attention, x, caches.layers[name], caches.length, model.freqs_cis)

    logits = through_blocks(model, token, attend)
    caches.length += 1
    return logits
