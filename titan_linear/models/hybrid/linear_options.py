"""The optional pieces of a linear-attention layer (docs/attention.md, "Options of the linear layer").

Each is a `[model]` key, off by default; off, it creates no parameter and runs no op, so the
default layer is the seed's formula bit for bit. All of them sit outside the efficient-attention
op (the Triton kernels are unchanged):

    x ─ wq/wk/wv ─ ShortConv ─ feature scale ─ key decay ─ efficient_attention ─ HeadRMSNorm ─ · sigmoid(wg x) ─ wo

Tensor parallel shards the heads: inside the layer every tensor holds this rank's heads only.
The per-head parameters here are sharded with them (dim 0, `shard_linear_options` in
parallelize.py), so `local` gives the rows of this rank's heads; without TP (or under FSDP
alone, whose unsharded parameters are plain tensors) it is the parameter itself.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import distribute_tensor, DTensor

# TP shards these parameters along dim 0 with the heads (see shard_linear_options).
HEAD_SHARDED = ("q_log_scale", "k_log_scale", "k_log_decay", "out_norm.weight",
                "short_conv.q_weight", "short_conv.k_weight", "short_conv.v_weight")

ConvState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter sharded with the heads (the parameter itself without TP)."""
    return p.to_local() if isinstance(p, DTensor) else p


def fill(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full tensor `value` into the parameter p, plain or sharded (TP, FSDP): a DTensor
    takes the part its placements give this rank. Every rank computes the same value."""
    with torch.no_grad():
        value = value.to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(value)


DECAY_RATES = ("head", "feature")


def initial_log_decay(n_kv_heads: int, head_dim: int = 1, rates: str = "head") -> torch.Tensor:
    """log a of the decay's rates, the parameter `k_log_decay` at its start (docs/attention.md, "Decay").

    rates "head": one rate per kv head, RetNet's multi-scale decays γ_h = 1 − 2^(−5−h) (half-lives
    of 22 tokens for head 0, doubling per head); shape (n_kv_heads,).
    rates "feature": one rate per key feature of each kv head, γ = 1 − 2^(−e) with e spread evenly
    from 2 to 12 over a head's features (half-lives from 2.4 to 2,800 tokens), the same range in
    every head, so each head holds both recent and distant tokens; shape (n_kv_heads · head_dim,),
    flat so that it is a 1-D parameter like the others (no weight decay; TP shards it with the
    heads along dim 0)."""
    if rates == "head":
        e = 5.0 + torch.arange(n_kv_heads, dtype=torch.float64)
    else:
        e = torch.linspace(2.0, 12.0, head_dim, dtype=torch.float64).repeat(n_kv_heads)
    gamma = 1.0 - 2.0 ** (-e)
    return torch.log(-torch.log(gamma)).float()


def decayed_keys(k: torch.Tensor, log_decay: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
    """The keys with the decay's bias a · s added, in fp32 (fp64 stays fp64; docs/attention.md, "Decay").

    The causal softmax over positions turns the bias into a decay of the state: the weight of key s
    at position t, exp(k_s + a s) / Σ_{s'≤t} exp(k_s' + a s'), equals exp(k_s) γ^(t−s) /
    Σ_{s'≤t} exp(k_s') γ^(t−s') with γ = exp(−a), since the factor exp(a t) cancels. The softmax is
    taken per feature, so a rate per feature (rates "feature") decays each feature's column of the
    state at its own pace by the same argument. So the op itself is unchanged (the Triton kernels
    take fp32 keys); fp32 because a · s grows with the position, and bf16 would round it to a step
    of 2 beyond s · a = 256.

    Args:
        k: (bs, kv_heads, seqlen, head_dim), this rank's kv heads.
        log_decay: log a, (kv_heads,) or (kv_heads · head_dim,) (sharded with the heads under TP: `local`).
        start: the position of the first row (decoding passes the cache length; a tensor is allowed).
    """
    dtype = torch.promote_types(k.dtype, torch.float32)
    pos = torch.arange(k.shape[2], device=k.device, dtype=dtype) + start
    rate = torch.exp(local(log_decay).to(dtype)).view(k.shape[1], 1, -1)  # (heads, 1, 1 or head_dim)
    return k.to(dtype) + rate * pos[:, None]


class ShortConv(nn.Module):
    """Causal depthwise convolution of q, k and v over positions, one kernel per channel.

        y_t = x_t + Σ_{j=0}^{K−1} w[j] ⊙ x_{t−K+1+j}        (x_s = 0 before the first token)

    The identity term makes the layer start as the layer without it (w is drawn small), so the
    option perturbs the baseline instead of replacing it with a random mix of K tokens. No SiLU:
    q and k go straight into softmaxes, which already are the nonlinearity and make the features
    positive; a SiLU would floor every logit at −0.28 and remove the sign symmetry of the keys'
    logits. The sum is written as K shifted products (the same arithmetic for one token and for
    a sequence), which torch.compile fuses; the state of decoding is the last K − 1 inputs.

    Args:
        channels: widths of q, k, v (heads * head_dim each).
        kernel: K, the number of positions each output sees (itself and K − 1 before it).
    """

    def __init__(self, channels: tuple[int, int, int], kernel: int):
        super().__init__()
        self.kernel = kernel
        self.q_weight = nn.Parameter(torch.empty(channels[0], kernel))
        self.k_weight = nn.Parameter(torch.empty(channels[1], kernel))
        self.v_weight = nn.Parameter(torch.empty(channels[2], kernel))

    def init_weights(self, std: float) -> None:
        for w in (self.q_weight, self.k_weight, self.v_weight):
            nn.init.trunc_normal_(w, mean=0.0, std=std)

    def forward(self, q, k, v, state: ConvState | None = None) -> tuple[ConvState, ConvState]:
        """q, k, v: (bs, seqlen, channels) projections; state: the last K − 1 inputs before them
        ((bs, K − 1, channels) each), None for zeros. Returns ((q, k, v) convolved, new state)."""
        outs, states = [], []
        for i, (x, w) in enumerate(zip((q, k, v), (self.q_weight, self.k_weight, self.v_weight))):
            bs, seqlen, ch = x.shape
            prev = x.new_zeros(bs, self.kernel - 1, ch) if state is None else state[i].to(x.dtype)
            xp = torch.cat([prev, x], dim=1)  # (bs, K - 1 + seqlen, ch)
            w = local(w).to(x.dtype)
            y = x
            for j in range(self.kernel):
                y = y + xp[:, j : j + seqlen] * w[:, j]
            outs.append(y)
            states.append(xp[:, seqlen:])
        return tuple(outs), tuple(states)


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's output over its head_dim features, a learned weight per head and
    feature (weight (n_heads, head_dim), so TP shards it with the heads). Normalised in fp32."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (bs, heads, seqlen, head_dim) -> the same shape."""
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * local(self.weight)[:, None, :].to(x.dtype)
