"""What a decoder keeps per layer between tokens.

Softmax layers keep a `KVCache`: the RoPE-rotated keys and the values of every token so far.
Its storage grows with the text in **buckets** of positions: powers of two from `min_bucket`
(256 by default) up to max_len, the last one max_len itself. When a token would pass the
bucket, `Caches.reserve` moves every KV cache to the next bucket (new zeroed tensors, the old
positions copied), so memory follows the text (at most twice what it holds, never past
max_len) at the cost of one copy per doubling. The fixed-shape decode step (graph_decode.py)
reads the whole storage, i.e. the current bucket, not max_len; a CUDA graph captured on the old
storage must be captured again after a move (GraphDecoder does), since it replays addresses.

Linear layers keep the `RecurrentState` of the efficient-attention op: (S, z), d_k x d_v + d_k
numbers per kv head whatever the number of tokens, so their memory per generated token is
zero. A linear layer with a short convolution (`linear_attn_short_conv` = K) also keeps its
last K - 1 inputs (q, k, v before the convolution) in `Caches.conv`, again of a fixed size.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from titan_linear.models.hybrid.linear_options import ConvState
from titan_linear.models.hybrid.model import LinearAttention
from titan_linear.ops.efficient_attn import RecurrentState

MIN_BUCKET = 256


def is_linear(block: nn.Module) -> bool:
    """Whether a transformer block's attention is causal efficient attention."""
    return isinstance(block.attention, LinearAttention)


def bucket_length(length: int, max_len: int, min_bucket: int = MIN_BUCKET) -> int:
    """KV positions stored (and read by the fixed-shape step) while the text holds `length`
    tokens: the smallest power of two >= length and >= min_bucket, at most max_len."""
    return min(max(min_bucket, 1 << max(length - 1, 0).bit_length()), max_len)


@dataclass
class KVCache:
    """Keys (after RoPE) and values of one softmax layer, in storage of `capacity` positions.

    Args:
        k: (bs, n_kv_heads, capacity, head_dim).
        v: (bs, n_kv_heads, capacity, head_dim).
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, bs: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, device) -> "KVCache":
        shape = (bs, n_kv_heads, capacity, head_dim)
        # Zeros, not uninitialised memory: the fixed-shape decode step (graph_decode.py) reads
        # the positions not yet written, with weight 0, and 0 x NaN would still be NaN.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def grow(self, capacity: int) -> None:
        """Move to zeroed storage of `capacity` positions, keeping every position held now."""
        assert capacity >= self.capacity, (capacity, self.capacity)
        bs, n_kv_heads, _, head_dim = self.k.shape
        new = KVCache.empty(bs, n_kv_heads, capacity, head_dim, self.k.dtype, self.k.device)
        new.write(0, self.k, self.v)
        self.k, self.v = new.k, new.v

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v, each (bs, n_kv_heads, n, head_dim), at positions start .. start + n - 1."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `length` positions."""
        return self.k[:, :, :length], self.v[:, :, :length]

    def nbytes(self, length: int) -> int:
        """Bytes that hold the first `length` positions (what attention reads at that length)."""
        per_position = self.k[:, :, :1].nbytes + self.v[:, :, :1].nbytes
        return per_position * length


LayerCache = KVCache | RecurrentState | None


@dataclass
class Caches:
    """The per-layer caches of one model and the number of tokens they hold.

    Args:
        layers: layer name (as in `model.layers`) -> KVCache (softmax) or RecurrentState
            (linear; None until the first token).
        max_len: the most tokens the caches may hold (prompt + generated).
        length: tokens processed so far; the next token sits at this position.
        conv: layer name -> the short convolution's last inputs (q, k, v), each (bs, K - 1,
            channels), for linear layers with one, once a token has gone through.
        min_bucket: the smallest KV storage, in positions (see `bucket_length`).
    """

    layers: dict[str, LayerCache]
    max_len: int
    length: int = 0
    conv: dict[str, ConvState] = field(default_factory=dict)
    min_bucket: int = MIN_BUCKET

    @classmethod
    def allocate(cls, model: nn.Module, bs: int, max_len: int, min_bucket: int = MIN_BUCKET) -> "Caches":
        """Empty caches for `model`: KV storage of the first bucket, in the dtype and on the device
        of its weights; `reserve` grows it."""
        if min_bucket < 1:
            raise ValueError(f"min_bucket = {min_bucket!r} is not allowed: an integer >= 1")
        weight = model.tok_embeddings.weight
        capacity = bucket_length(0, max_len, min_bucket)
        layers: dict[str, LayerCache] = {}
        for name, block in model.layers.items():
            if is_linear(block):
                layers[name] = None
            else:
                attn = block.attention
                layers[name] = KVCache.empty(
                    bs, attn.n_kv_heads, capacity, attn.head_dim, weight.dtype, weight.device
                )
        return cls(layers, max_len, min_bucket=min_bucket)

    def kv_caches(self) -> list[KVCache]:
        return [c for c in self.layers.values() if isinstance(c, KVCache)]

    @property
    def capacity(self) -> int:
        """Positions the KV storage holds now: the current bucket (max_len without softmax
        layers, which have nothing to grow)."""
        kv = self.kv_caches()
        return kv[0].capacity if kv else self.max_len

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens: grow the KV storage to the bucket of `length` when it
        is smaller (which moves it). Raises ValueError past max_len."""
        if length > self.max_len:
            raise ValueError(f"the caches are full: max_len = {self.max_len} positions")
        capacity = bucket_length(length, self.max_len, self.min_bucket)
        for c in self.kv_caches():
            if c.capacity < capacity:
                c.grow(capacity)

    def nbytes(self) -> dict[str, int]:
        """Bytes in use per layer: the filled part of each KV cache, the whole recurrent state."""
        out = {}
        for name, c in self.layers.items():
            if isinstance(c, KVCache):
                out[name] = c.nbytes(self.length)
            elif isinstance(c, RecurrentState):
                out[name] = c.S.nbytes + c.z.nbytes
            else:
                out[name] = 0
            out[name] += sum(t.nbytes for t in self.conv.get(name, ()))
        return out

    def allocated_nbytes(self) -> int:
        """Bytes held by all caches now: the KV storage as grown so far (the current bucket,
        not max_len), the recurrent states and the convolution states."""
        total = 0
        for c in self.layers.values():
            if isinstance(c, KVCache):
                total += c.k.nbytes + c.v.nbytes
            elif isinstance(c, RecurrentState):
                total += c.S.nbytes + c.z.nbytes
        return total + sum(t.nbytes for state in self.conv.values() for t in state)
