"""Fused projections for decoding: q, k, v (and the feed-forward's w1, w3) read as one matrix.

At batch 1 a decode step is a chain of matrix-vector products, one kernel each, and the step's
time is more than the time to read its weights (docs/inference.md). `fuse_projections(model)`
puts each block's `wq`, `wk`, `wv` weights into one contiguous (n_q + n_k + n_v, dim) tensor and
`w1`, `w3` into one (2 · hidden, dim) tensor, and makes the modules' own weights views of it, so
no weight is stored twice and a checkpoint loaded afterwards still fills both. `qkv` and
`feed_forward` then take one product where the model takes three or two; without fusion they
are the model's own calls. The values are the same products' (a wider product may sum in
another order, so equal to rounding).

Fuse after any dtype or device change: `Module.to` / `_apply` give the views new storage of their
own, and the fused tensor, a non-persistent buffer, is moved separately (still equal, twice the
memory). For inference only: nothing here is for training.

`use_gemv(model)` is the other switch on these products: every block's projections and the
output head become `GemvLinear`s (ops/gemv.py), which take the Triton matrix-vector kernel for a
decode step's few rows and F.linear for a prefill's many; a fused product is taken the way its
modules take theirs. The two switches are independent and either may come first.
"""

import torch
import torch.nn.functional as F
from torch import nn

from titan_linear.ops.gemv import GemvLinear, linear

QKV, W13 = "fused_qkv", "fused_w13"


def _fuse(module: nn.Module, names: tuple[str, ...], attr: str) -> None:
    linears = [getattr(module, n, None) for n in names]
    if not all(isinstance(lin, nn.Linear) and lin.bias is None for lin in linears):
        return  # not the llama3 layout: this module keeps its separate products
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=lin.weight.requires_grad)
        start += rows
    module.register_buffer(attr, fused, persistent=False)


def fuse_projections(model: nn.Module, on: bool = True) -> nn.Module:
    """Fuse every block's q, k, v and w1, w3 weights (module docstring); on=False goes back to
    separate products (the weights stay views, which changes nothing)."""
    for block in model.layers.values():
        for module, names, attr in ((block.attention, ("wq", "wk", "wv"), QKV),
                                    (block.feed_forward, ("w1", "w3"), W13)):
            if not on:
                module._buffers.pop(attr, None)
            elif getattr(module, attr, None) is None:
                _fuse(module, names, attr)
    return model


def use_gemv(model: nn.Module, on: bool = True) -> nn.Module:
    """Take every block's attention and feed-forward projections and the output head through the
    Triton matrix-vector kernel when they see at most 16 rows (module docstring); on=False gives
    them back plain nn.Linear products. Weights, names and hooks stay the modules' own; modules
    of other nn.Linear subclasses keep their class (and their forward)."""
    old, new = (nn.Linear, GemvLinear) if on else (GemvLinear, nn.Linear)
    parts = [m for block in model.layers.values() for m in (block.attention, block.feed_forward)]
    for module in [m for part in parts for m in part.modules()] + [model.output]:
        if type(module) is old:
            module.__class__ = new
    return model


def _product(lin: nn.Module):
    """The product a fused weight is taken with: that of the module it starts with."""
    return linear if isinstance(lin, GemvLinear) else F.linear


def qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn.wq(x), attn.wk(x), attn.wv(x): one product when fused."""
    fused = getattr(attn, QKV, None)
    if fused is None:
        return attn.wq(x), attn.wk(x), attn.wv(x)
    sizes = [attn.wq.weight.shape[0], attn.wk.weight.shape[0], attn.wv.weight.shape[0]]
    return _product(attn.wq)(x, fused).split(sizes, -1)


def feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ff(x), llama3's w2(silu(w1 x) · w3 x): w1 and w3 as one product when fused."""
    fused = getattr(ff, W13, None)
    if fused is None:
        return ff(x)
    gate, up = _product(ff.w1)(x, fused).chunk(2, -1)
    return ff.w2(F.silu(gate) * up)
