"""Decode steps replayed from one captured CUDA graph: the fast path beside decode.py.

An eager decode step launches hundreds of small kernels from Python, so at batch 1 it is
bound by launch overhead, not by reading the weights and caches (the 1B model on an H100:
7-12 ms a token eagerly, 2.2-3.5 ms replayed from a graph; benchmarks/results/inference_h100*).
A CUDA graph replays the same kernels in one launch. Capture needs every shape and address
fixed, so this step differs from decode_step in three ways, with the same maths:

- the position is a device tensor: the RoPE row is picked by index_select and the new k, v
  are written into the KV cache by index_copy_;
- softmax layers attend over the whole preallocated cache with a mask of the positions filled
  so far (positions past the token get weight 0), so every step has the same shapes;
- linear layers write their new recurrent state (and short-convolution inputs) into the state
  tensors in place.

`static_decode_step` runs on any device (CPU tests check it against the parallel forward);
`GraphDecoder` captures it on CUDA (GPU tests check it against decode_step).
"""

import torch
from torch import nn
from torchtitan.models.llama3.model.model import apply_rotary_emb

from titan_linear.ops.efficient_attn import efficient_attention_step, RecurrentState

from .cache import Caches, is_linear, KVCache
from .decode import check_room, decode_step, split_heads, through_blocks


def _softmax_attention(attn: nn.Module, x, cache: KVCache, pos: torch.Tensor, filled: torch.Tensor, freqs_cis):
    xq, xk, xv = (split_heads(p, x, attn.head_dim) for p in (attn.wq, attn.wk, attn.wv))
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis.index_select(0, pos))
    cache.k.index_copy_(2, pos, xk.transpose(1, 2))
    cache.v.index_copy_(2, pos, xv.transpose(1, 2))
    # One query token: the query heads sharing a kv head become that head's query rows (query
    # head h reads kv head h // group, as torchtitan repeats kv heads), so nothing expands the
    # cache for grouped-query attention.
    bs, n_heads = xq.shape[0], xq.shape[2]
    n_kv = cache.k.shape[1]
    q = xq.reshape(bs, n_kv, n_heads // n_kv, attn.head_dim)
    return _cached_attention(q, cache.k, cache.v, filled).reshape(bs, n_heads, 1, attn.head_dim)


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d over the filled positions) v, as two batched products.

    Measured on an H100 (the 1B model at ratio 0, 32K cached positions):
    SDPA with this mask took 30 ms a token, these two products 3.5 ms (SDPA's masked kernels
    do not split a long cache across the GPU as its decoding path without a mask does). The
    scores stay in fp32, as in FlashAttention; the probabilities meet v in v's dtype, as there.

    Args:
        q: (bs, n_kv, rows, d); k, v: (bs, n_kv, max_len, d); filled: (max_len,) bool.
    """
    bs, n_kv, rows, d = q.shape
    q = q.reshape(bs * n_kv, rows, d)
    kt = k.reshape(bs * n_kv, -1, d).transpose(1, 2)
    if q.dtype in (torch.bfloat16, torch.float16) and q.is_cuda:
        scores = torch.bmm(q, kt, out_dtype=torch.float32)
    else:
        scores = torch.bmm(q, kt).to(torch.promote_types(q.dtype, torch.float32))
    scores = (scores * d**-0.5).masked_fill(~filled, float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1).to(v.dtype), v.reshape(bs * n_kv, -1, d))
    return out.reshape(bs, n_kv, rows, d)


def _linear_attention(attn: nn.Module, x, state: RecurrentState, conv_state, pos: torch.Tensor):
    xq, xk, xv, new_conv = attn.project(x, conv_state, start=pos)
    out, new = efficient_attention_step(xq, xk, xv, state)
    state.S.copy_(new.S)
    state.z.copy_(new.z)
    if new_conv is not None:
        for old, new_t in zip(conv_state, new_conv):
            old.copy_(new_t)
    return attn.mix_output(out, x)


@torch.no_grad()
def static_decode_step(model: nn.Module, token: torch.Tensor, caches: Caches, pos: torch.Tensor) -> torch.Tensor:
    """decode_step with fixed shapes and addresses (module docstring).

    Args:
        model, caches: as for decode_step; every linear layer's state must exist (a prefill of
            at least one token makes it).
        token: (bs,) or (bs, 1) token ids.
        pos: (1,) int64 on the model's device, the position of `token` (= caches.length).

    Returns:
        (bs, vocab) logits. Updates the caches in place but not caches.length (the caller's).
    """
    filled = torch.arange(caches.max_len, device=pos.device) <= pos

    def attend(name, block, x):
        if is_linear(block):
            return _linear_attention(block.attention, x, caches.layers[name], caches.conv.get(name), pos)
        return _softmax_attention(block.attention, x, caches.layers[name], pos, filled, model.freqs_cis)

    return through_blocks(model, token, attend)


class GraphDecoder:
    """decode_step for one set of caches, replayed from a CUDA graph captured once.

    Usage: `step = GraphDecoder(model, caches)` after prefill, then `logits = step(token)` in
    place of `decode_step(model, token, caches)`, on the same caches only.
    """

    def __init__(self, model: nn.Module, caches: Caches):
        missing = [n for n, c in caches.layers.items() if c is None]
        if missing:
            raise ValueError(f"GraphDecoder needs prefilled caches: layers {missing} have no state yet")
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"GraphDecoder needs a CUDA model; this one is on {device}")
        self.model, self.caches = model, caches
        first = next(iter(caches.layers.values()))
        bs = (first.k if isinstance(first, KVCache) else first.S).shape[0]
        self.token = torch.zeros(bs, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        # Warm up outside the graph (cuBLAS workspaces, lazy inits) on a side stream, as capture
        # requires, then put back the recurrent states that warm-up advanced; what it wrote into
        # the KV caches sits at the next position, which the first real step overwrites.
        saved = {n: (c.S.clone(), c.z.clone()) for n, c in caches.layers.items() if isinstance(c, RecurrentState)}
        saved_conv = {n: tuple(t.clone() for t in state) for n, state in caches.conv.items()}
        self.pos.fill_(caches.length)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            static_decode_step(model, self.token, caches, self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        for n, (S, z) in saved.items():
            caches.layers[n].S.copy_(S)
            caches.layers[n].z.copy_(z)
        for n, state in saved_conv.items():
            for t, old in zip(caches.conv[n], state):
                t.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_decode_step(model, self.token, caches, self.pos)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence at position caches.length; returns (bs, vocab) logits."""
        caches = self.caches
        check_room(caches)
        self.token.copy_(token.reshape(self.token.shape))
        self.pos.fill_(caches.length)
        self.graph.replay()
        caches.length += 1
        return self.logits.clone()


def decoder(model: nn.Module, caches: Caches, cuda_graph: bool):
    """The per-token step for these caches: a GraphDecoder, or decode_step run eagerly."""
    if cuda_graph:
        return GraphDecoder(model, caches)
    return lambda token: decode_step(model, token, caches)
