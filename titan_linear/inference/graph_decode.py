"""Decode steps replayed from captured CUDA graphs: the fast path beside decode.py.

An eager decode step launches hundreds of small kernels from Python, so at batch 1 it is
bound by launch overhead, not by reading the weights and caches (the 1B model on an H100:
7-12 ms a token eagerly, 2.2-3.5 ms replayed from a graph; benchmarks/results/inference_h100*).
A CUDA graph replays the same kernels in one launch, but replays each of them: the graph of
the eager step still held dozens of small elementwise kernels per layer (norms, RoPE, the
linear layers' feature softmax and state update, residuals), and took 2.2 ms on an H100,
where reading the 1B weights once takes 0.74 ms (docs/inference.md). So by default the step is first compiled with
torch.compile (inductor fuses those elementwise ops into a few kernels per layer), and the
compiled step is what the graph captures.

Capture needs every shape and address fixed, so this step differs from decode_step in three
ways, with the same maths:

- the position is a device tensor: the RoPE row is picked by index_select (and applied in
  real arithmetic when compiled, `_rotate`), and the new k, v are written into the KV cache
  by index_copy_;
- softmax layers attend over their whole KV storage, so every step has the same shapes: on a
  GPU a kernel (ops/decode_attention.py) that reads the positions up to the token's, which it
  takes from the device, and no further; on the CPU two products with the positions past the
  token masked. The storage is the current bucket of the growing cache (cache.py), so the CPU
  path reads at most about twice the text, not max_len. When the text passes the bucket, the
  storage moves: `GraphDecoder` captures a new graph then, lazily, one per bucket. The compiled step takes the storage
  length as its one dynamic size (`compiled_step`), so one compile serves every bucket;
- linear layers write their new recurrent state (and short-convolution inputs) into the state
  tensors in place.

`static_decode_step` runs on any device (CPU tests check it against the parallel forward, and
the compiled step against decode_step); `GraphDecoder` captures it on CUDA (GPU tests check it
against decode_step).
"""

import functools
import time
from typing import Callable

import torch
from torch import nn
from torchtitan.models.llama3.model.model import apply_rotary_emb

from titan_linear.ops import decode_attention
from titan_linear.ops.efficient_attn import efficient_attention_step, RecurrentState

from .cache import Caches, is_linear, KVCache
from .decode import decode_step, split_heads, through_blocks

# Compiles of one step (one per model, batch size and set of inductor options in a process)
# that dynamo keeps before failing (fullgraph); its default of 8 is what a benchmark of a few
# models and batch sizes passes.
RECOMPILE_LIMIT = 64


def _rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """torchtitan's apply_rotary_emb for one position, in real arithmetic, for torch.compile:
    inductor generates no code for complex tensors and would launch one kernel per complex op
    (eagerly, the complex product is the fewer kernels). The same numbers (bitwise on the CPU):
    each pair (x[2i], x[2i+1]) in fp32 times freqs_cis[pos, i].

    Args:
        x: (bs, 1, heads, head_dim).
        cos_sin: (1, head_dim // 2, 2), that position's row of view_as_real(freqs_cis).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[:, None, :, 0], cos_sin[:, None, :, 1]  # (1, 1, head_dim // 2)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


def _softmax_attention(attn: nn.Module, x, cache: KVCache, pos: torch.Tensor, freqs_cis, kv_splits: int = 0):
    xq, xk, xv = split_heads(attn, x)
    if torch.compiler.is_compiling():
        cos_sin = torch.view_as_real(freqs_cis).index_select(0, pos)
        xq, xk = _rotate(xq, cos_sin), _rotate(xk, cos_sin)
    else:
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis.index_select(0, pos))
    cache.k.index_copy_(2, pos, xk.transpose(1, 2))
    cache.v.index_copy_(2, pos, xv.transpose(1, 2))
    # One query token: the query heads sharing a kv head become that head's query rows (query
    # head h reads kv head h // group, as torchtitan repeats kv heads), so nothing expands the
    # cache for grouped-query attention.
    bs, n_heads = xq.shape[0], xq.shape[2]
    n_kv = cache.k.shape[1]
    q = xq.reshape(bs, n_kv, n_heads // n_kv, attn.head_dim)
    return _cached_attention(q, cache.k, cache.v, pos, kv_splits).reshape(bs, n_heads, 1, attn.head_dim)


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      kv_splits: int = 0) -> torch.Tensor:
    """softmax(q kᵀ / √d over the filled positions 0..pos) v.

    On a GPU, ops/decode_attention.py's kernel: K and V read once, split over positions into
    `kv_splits` blocks (0: enough for about two programs per SM), nothing past pos read. On
    the CPU (and as the kernel's reference in tests), two batched products over the whole
    storage with the positions past pos masked. Measured on an H100 (the 1B model at ratio 0, 32K
    cached positions): SDPA with this mask took 30 ms a token, these two products 3.5 ms (SDPA's
    masked kernels do not split a long cache across the GPU as its decoding path without a mask
    does). The scores stay in fp32, as in FlashAttention; the probabilities meet v in v's dtype,
    as there.

    Args:
        q: (bs, n_kv, rows, d); k, v: (bs, n_kv, capacity, d); pos: (1,) the last filled position;
        kv_splits: blocks of positions of the kernel (the products take all at once).
    """
    if decode_attention.supports(q, k):
        return decode_attention.decode_attention(q, k, v, pos, kv_splits)
    bs, n_kv, rows, d = q.shape
    filled = torch.arange(k.shape[2], device=pos.device) <= pos
    q = q.reshape(bs * n_kv, rows, d)
    kt = k.reshape(bs * n_kv, -1, d).transpose(1, 2)
    if q.dtype in (torch.bfloat16, torch.float16) and q.is_cuda:
        scores = torch.bmm(q, kt, out_dtype=torch.float32)
    else:
        scores = torch.bmm(q, kt).to(torch.promote_types(q.dtype, torch.float32))
    scores = (scores * d**-0.5).masked_fill(~filled, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.bmm(probs, v.reshape(bs * n_kv, -1, d))
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


def _fixed_shape_step(model: nn.Module, token: torch.Tensor, caches: Caches, pos: torch.Tensor,
                      kv_splits: int = 0) -> torch.Tensor:
    # Undecorated (the caller sets no_grad), so that torch.compile traces this function itself.
    def attend(name, block, x):
        if is_linear(block):
            return _linear_attention(block.attention, x, caches.layers[name], caches.conv.get(name), pos)
        return _softmax_attention(block.attention, x, caches.layers[name], pos, model.freqs_cis, kv_splits)

    return through_blocks(model, token, attend)


@torch.no_grad()
def static_decode_step(model: nn.Module, token: torch.Tensor, caches: Caches, pos: torch.Tensor,
                       kv_splits: int = 0) -> torch.Tensor:
    """decode_step with fixed shapes and addresses (module docstring).

    Args:
        model, caches: as for decode_step; every linear layer's state must exist (a prefill of
            at least one token makes it), and the KV storage must hold position `pos`
            (`caches.reserve(pos + 1)`).
        token: (bs,) or (bs, 1) token ids.
        pos: (1,) int64 on the model's device, the position of `token` (= caches.length).
        kv_splits: blocks of positions of the softmax layers' attention kernel on a GPU
            (`_cached_attention`); default 0, automatic.

    Returns:
        (bs, vocab) logits. Updates the caches in place but not caches.length (the caller's).
    """
    return _fixed_shape_step(model, token, caches, pos, kv_splits)


@functools.cache
def _compile(backend, options: tuple) -> Callable:
    # One wrapper per backend and options, kept for the process: dynamo's compiled entries
    # belong to it, so every decoder of the same model and batch size reuses them.
    return torch.compile(_fixed_shape_step, fullgraph=True, dynamic=False, backend=backend,
                         options=dict(options) or None)


def compiled_step(options: dict | None = None, backend="inductor"):
    """`static_decode_step` (without its no_grad: call it under one) through torch.compile:
    fullgraph, every size static except the KV storage length, so that one compile serves
    every bucket: one compile per model and batch size (and options) in a process.

    Args:
        options: inductor options (torch.compile's `options`), e.g. {"coordinate_descent_tuning":
            True}; default None.
        backend: torch.compile's backend; default "inductor" ("aot_eager" in CPU tests).
    """
    fn = _compile(backend, tuple(sorted((options or {}).items())))

    def step(model: nn.Module, token: torch.Tensor, caches: Caches, pos: torch.Tensor, kv_splits: int = 0) -> torch.Tensor:
        for c in caches.kv_caches():  # new tensors after every move of the storage
            torch._dynamo.mark_dynamic(c.k, 2)
            torch._dynamo.mark_dynamic(c.v, 2)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return fn(model, token, caches, pos, kv_splits)

    return step


class GraphDecoder:
    """decode_step for one set of caches, replayed from a CUDA graph per bucket of KV storage.

    Usage: `step = GraphDecoder(model, caches)` after prefill, then `logits = step(token)` in
    place of `decode_step(model, token, caches)`, on the same caches only. The graph for the
    next token's bucket is captured here; when the text passes it, the step grows the storage
    and captures the next one (compiling nothing new: see `compiled_step`).

    Args:
        model, caches: the model and the caches `prefill` filled with it (on CUDA).
        compile: capture the torch.compile'd step (`compiled_step`); default True. False
            captures the kernels of the eager step (no compile time, several times as many
            kernels per token).
        compile_options: inductor options for the compile; default None.
        kv_splits: blocks of positions of the softmax layers' attention kernel
            (`_cached_attention`, ops/decode_attention.py); default 0, enough blocks for about
            two programs per SM.

    Attributes:
        capture_ms: wall time spent so far compiling, warming up and capturing graphs.
    """

    def __init__(self, model: nn.Module, caches: Caches, compile: bool = True, compile_options: dict | None = None,
                 kv_splits: int = 0):
        decode_attention.check_splits(kv_splits)
        missing = [n for n, c in caches.layers.items() if c is None]
        if missing:
            raise ValueError(f"GraphDecoder needs prefilled caches: layers {missing} have no state yet")
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"GraphDecoder needs a CUDA model; this one is on {device}")
        self.model, self.caches, self.kv_splits = model, caches, kv_splits
        self.step = compiled_step(compile_options) if compile else _fixed_shape_step
        first = next(iter(caches.layers.values()))
        bs = (first.k if isinstance(first, KVCache) else first.S).shape[0]
        self.token = torch.zeros(bs, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.logits, self.capacity = None, None, None
        self.capture_ms = 0.0
        if caches.length < caches.max_len:
            self._ready(caches.length + 1)

    def _ready(self, length: int) -> None:
        """Room for `length` tokens, and a graph captured on the storage that holds them."""
        self.caches.reserve(length)
        if self.graph is not None and self.caches.capacity == self.capacity:
            return
        # The storage only changes by growing (Caches.reserve), so a graph captured at another
        # capacity reads and writes freed memory: drop it (and its memory pool) first.
        self.graph = self.logits = None
        start = time.perf_counter()
        self._capture()
        torch.cuda.synchronize(self.pos.device)  # the warm-up's kernels count as capture time
        self.capacity = self.caches.capacity
        self.capture_ms += 1000 * (time.perf_counter() - start)

    @torch.no_grad()
    def _capture(self) -> None:
        model, caches, device = self.model, self.caches, self.pos.device
        self.pos.fill_(caches.length)
        # Warm up outside the graph (the compile, Triton autotuning, cuBLAS workspaces, lazy
        # inits) on a side stream, as capture requires, then put back the recurrent states that
        # warm-up advanced; what it wrote into the KV caches sits at the next position, which
        # the first real step overwrites.
        saved = {n: (c.S.clone(), c.z.clone()) for n, c in caches.layers.items() if isinstance(c, RecurrentState)}
        saved_conv = {n: tuple(t.clone() for t in state) for n, state in caches.conv.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(model, self.token, caches, self.pos, self.kv_splits)
        torch.cuda.current_stream(device).wait_stream(side)
        for n, (S, z) in saved.items():
            caches.layers[n].S.copy_(S)
            caches.layers[n].z.copy_(z)
        for n, state in saved_conv.items():
            for t, old in zip(caches.conv[n], state):
                t.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(model, self.token, caches, self.pos, self.kv_splits)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence at position caches.length; returns (bs, vocab) logits."""
        caches = self.caches
        self._ready(caches.length + 1)
        self.token.copy_(token.reshape(self.token.shape))
        self.pos.fill_(caches.length)
        self.graph.replay()
        caches.length += 1
        return self.logits.clone()


def decoder(model: nn.Module, caches: Caches, cuda_graph: bool, compile: bool = True,
            compile_options: dict | None = None, kv_splits: int = 0):
    """The per-token step for these caches: a GraphDecoder (compiled unless compile=False, with
    these inductor options and KV splits), or decode_step run eagerly."""
    if cuda_graph:
        return GraphDecoder(model, caches, compile=compile, compile_options=compile_options, kv_splits=kv_splits)
    return lambda token: decode_step(model, token, caches)
