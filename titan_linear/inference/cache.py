"""What a decoder keeps per layer between tokens.

Softmax layers keep a `KVCache`: the RoPE-rotated keys and the values of every token so far,
in tensors allocated once for `max_len` positions, so decoding never reallocates. Linear layers
keep the `RecurrentState` of the efficient-attention op: (S, z), d_k x d_v + d_k numbers per
kv head whatever the number of tokens, so their memory per generated token is zero. A linear
layer with a short convolution (`linear_attn_short_conv` = K) also keeps its last K - 1 inputs
(q, k, v before the convolution) in `Caches.conv`, again of a fixed size.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from titan_linear.models.hybrid.linear_options import ConvState
from titan_linear.models.hybrid.model import LinearAttention
from titan_linear.ops.efficient_attn import RecurrentState


def is_linear(block: nn.Module) -> bool:
    """Whether a transformer block's attention is causal efficient attention."""
    return isinstance(block.attention, LinearAttention)


@dataclass
class KVCache:
    """Keys (after RoPE) and values of one softmax layer, preallocated to max_len positions.

    Args:
        k: (bs, n_kv_heads, max_len, head_dim).
        v: (bs, n_kv_heads, max_len, head_dim).
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, bs: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device) -> "KVCache":
        shape = (bs, n_kv_heads, max_len, head_dim)
        # Zeros, not uninitialised memory: the fixed-shape decode step (graph_decode.py) reads
        # the positions not yet written, with weight 0, and 0 x NaN would still be NaN.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

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
        max_len: positions the KV caches can hold.
        length: tokens processed so far; the next token sits at this position.
        conv: layer name -> the short convolution's last inputs (q, k, v), each (bs, K - 1,
            channels), for linear layers with one, once a token has gone through.
    """

    layers: dict[str, LayerCache]
    max_len: int
    length: int = 0
    conv: dict[str, ConvState] = field(default_factory=dict)

    @classmethod
    def allocate(cls, model: nn.Module, bs: int, max_len: int) -> "Caches":
        """Empty caches for `model`: KV caches in the dtype and on the device of its weights."""
        weight = model.tok_embeddings.weight
        layers: dict[str, LayerCache] = {}
        for name, block in model.layers.items():
            if is_linear(block):
                layers[name] = None
            else:
                attn = block.attention
                layers[name] = KVCache.empty(
                    bs, attn.n_kv_heads, max_len, attn.head_dim, weight.dtype, weight.device
                )
        return cls(layers, max_len)

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
        """Bytes held by all caches: the preallocated KV tensors plus the recurrent states."""
        total = 0
        for c in self.layers.values():
            if isinstance(c, KVCache):
                total += c.k.nbytes + c.v.nbytes
            elif isinstance(c, RecurrentState):
                total += c.S.nbytes + c.z.nbytes
        return total + sum(t.nbytes for state in self.conv.values() for t in state)
