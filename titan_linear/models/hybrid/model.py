"""HybridTransformer: llama3 where some layers use causal efficient attention.

The linear layers are drop-ins for torchtitan's: `LinearAttention` subclasses
`Attention` (same `wq/wk/wv/wo`, grouped-query heads, same `init_weights`) and
`LinearTransformerBlock` subclasses `TransformerBlock`, so tensor-parallel plans,
activation checkpointing, FSDP wrapping and checkpoints see the same module names.

RoPE: linear layers do NOT apply rotary embeddings. The causal normalisation
z_t = logcumsumexp(k_{<=t}) already makes the layer order-aware, and RoPE's
property (q_t . k_s depends on t - s only) does not survive the per-feature
softmaxes: rotating feature pairs before exponentiating them turns a relative
phase into position-dependent feature weights. The softmax layers of the hybrid
keep RoPE, as in hybrid models whose recurrent/linear layers carry no positional
encoding (Jamba, Samba).
"""

import math

import torch
from torch import nn
from torchtitan.models.llama3.model.model import Attention, Transformer, TransformerBlock
from torchtitan.tools.logging import logger

from titan_linear.ops.efficient_attn import efficient_attention

from titan_linear.models.fused import qkv
from titan_linear.models.maps import check_maps

from .args import HybridModelArgs
from .linear_options import ConvState, decayed_keys, fill, HeadRMSNorm, initial_log_decay, local, ShortConv


def component_of(name: str) -> str:
    """The component of a llama3-family parameter, from its name.

    One of "embeddings", "attention.wq" / "attention.wk" / "attention.wv" / "attention.wo",
    "feed_forward", "norms" or "output". Wrapper prefixes in the name (activation
    checkpointing, compile) do not change the answer. Used by `parameter_counts` below
    and by OELM's parameter report (models/oelm/report.py).
    """
    if name.startswith("tok_embeddings"):
        return "embeddings"
    if name.startswith("output"):
        return "output"
    if ".attention." in name:
        return "attention." + name.split(".attention.", 1)[1].split(".", 1)[0]
    if ".feed_forward." in name:
        return "feed_forward"
    return "norms"


class EfficientAttentionCore(nn.Module):
    """Parameter-free module around the attention op, in the place of torchtitan's
    `inner_attention`, so hooks that look for it (CP, AC) find a module there."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return efficient_attention(q, k, v)


class LinearAttention(Attention):
    """Causal efficient attention with llama3's projections (no RoPE, see module docstring).

    The options of the layer (`linear_attn_temperature`, `_learned_temperature`, `_output_norm`,
    `_output_gate`, `_short_conv`, `_decay`, `_decay_rates`; linear_options.py, docs/attention.md)
    wrap the op: `project` makes the op's q, k, v from the block input, `mix_output` treats its output before `wo`.
    Decoding (titan_linear/inference/decode.py) calls the same two methods, so it cannot drift
    from the parallel forward. With every option off neither adds a parameter or an op.

    Args:
        model_args: the hybrid model's arguments (heads, kv heads, dim, options).
    """

    def __init__(self, model_args: HybridModelArgs):
        super().__init__(model_args)
        self.inner_attention = EfficientAttentionCore()
        hd = self.head_dim
        self.feature_scale = 1.0 / model_args.linear_attn_temperature
        self.learned_temperature = model_args.linear_attn_learned_temperature
        if self.learned_temperature:
            # log of the scale 1 / temperature: positive whatever the optimizer does
            self.q_log_scale = nn.Parameter(torch.empty(self.n_heads))
            self.k_log_scale = nn.Parameter(torch.empty(self.n_kv_heads))
        k = model_args.linear_attn_short_conv
        self.short_conv = ShortConv((self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd), k) if k else None
        self.out_norm = HeadRMSNorm(self.n_heads, hd, model_args.norm_eps) if model_args.linear_attn_output_norm else None
        self.wg = nn.Linear(model_args.dim, self.n_heads * hd, bias=False) if model_args.linear_attn_output_gate else None
        # log of the decay rate a per kv head (or per feature): positive whatever the optimizer does
        self.decay_rates = model_args.linear_attn_decay_rates
        n_rates = self.n_kv_heads * (hd if self.decay_rates == "feature" else 1)
        self.k_log_decay = nn.Parameter(torch.empty(n_rates)) if model_args.linear_attn_decay else None

    def init_weights(self, init_std: float):
        super().init_weights(init_std)
        if self.learned_temperature:
            nn.init.constant_(self.q_log_scale, math.log(self.feature_scale))
            nn.init.constant_(self.k_log_scale, math.log(self.feature_scale))
        if self.short_conv is not None:
            self.short_conv.init_weights(0.02)
        if self.out_norm is not None:
            self.out_norm.init_weights()
        if self.wg is not None:
            nn.init.trunc_normal_(self.wg.weight, mean=0.0, std=0.02)
        if self.k_log_decay is not None:
            fill(self.k_log_decay, initial_log_decay(self.n_kv_heads, self.head_dim, self.decay_rates))

    def project(self, x: torch.Tensor, conv_state: ConvState | None = None, start: int | torch.Tensor = 0):
        """q, k, v as the op takes them, (bs, heads, seqlen, head_dim), from the block input x
        (bs, seqlen, dim), after the short convolution, the feature scale and the decay's bias on
        the keys (then fp32); and the convolution's state after x (None without it).
        conv_state: that state before x; start: the position of x's first row (decoding)."""
        bs, seqlen, _ = x.shape
        xq, xk, xv = qkv(self, x)  # one product when fused for decoding (models/fused.py)
        new_state = None
        if self.short_conv is not None:
            (xq, xk, xv), new_state = self.short_conv(xq, xk, xv, conv_state)
        # -1 heads: tensor parallel may have sharded the projections (local heads).
        xq = xq.view(bs, seqlen, -1, self.head_dim).transpose(1, 2)
        xk = xk.view(bs, seqlen, -1, self.head_dim).transpose(1, 2)
        xv = xv.view(bs, seqlen, -1, self.head_dim).transpose(1, 2)
        if self.learned_temperature:
            xq = xq * torch.exp(local(self.q_log_scale)).to(xq.dtype)[:, None, None]
            xk = xk * torch.exp(local(self.k_log_scale)).to(xk.dtype)[:, None, None]
        elif self.feature_scale != 1.0:
            xq, xk = xq * self.feature_scale, xk * self.feature_scale
        if self.k_log_decay is not None:
            xk = decayed_keys(xk, self.k_log_decay, start)
        return xq, xk, xv, new_state

    def mix_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The op's output (bs, heads, seqlen, head_dim) after the output norm and gate (same shape)."""
        if self.out_norm is not None:
            out = self.out_norm(out)
        if self.wg is not None:
            bs, seqlen, _ = x.shape
            gate = self.wg(x).view(bs, seqlen, -1, self.head_dim).transpose(1, 2)
            out = out * torch.sigmoid(gate)
        return out

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        bs, seqlen, _ = x.shape
        xq, xk, xv, _ = self.project(x)
        out = self.mix_output(self.inner_attention(xq, xk, xv), x)  # (bs, n_local_heads, seqlen, head_dim)
        out = out.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(out)


class LinearTransformerBlock(TransformerBlock):
    """llama3's block with `LinearAttention` in place of `Attention`."""

    def __init__(self, layer_id: int, model_args: HybridModelArgs):
        super().__init__(layer_id, model_args)
        self.attention = LinearAttention(model_args)


class HybridTransformer(Transformer):
    """llama3 `Transformer` whose layers in `model_args.linear_layers` are linear.

    With no linear layers it is stock llama3: same parameters, same initialisation
    order, same outputs. The maps of `model_args.checkpoint_maps()` (here the layer
    map `linear_layer_map`, 1 = linear) are persistent buffers, saved with every
    checkpoint; loading a checkpoint whose maps differ raises an error naming both.
    """

    def __init__(self, model_args: HybridModelArgs):
        super().__init__(model_args)
        self.linear_layers = model_args.linear_layers
        for i in self.linear_layers:
            self.layers[str(i)] = LinearTransformerBlock(i, model_args)
        # Saved with every checkpoint; a checkpoint with other maps is refused on load.
        for key, value in model_args.checkpoint_maps().items():
            self.register_buffer(key, value, persistent=True)
        self._register_load_state_dict_pre_hook(self._check_maps)
        logger.info(self.describe())

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component: embeddings, softmax attention, linear attention, ffn, norms, output."""
        counts = dict.fromkeys(
            ("embeddings", "softmax_attention", "linear_attention", "feed_forward", "norms", "output"), 0
        )
        for name, p in self.named_parameters():
            key = component_of(name)
            if key.startswith("attention."):
                layer = int(name.split(".")[1])
                key = "linear_attention" if layer in self.linear_layers else "softmax_attention"
            counts[key] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def describe(self) -> str:
        """The start-up summary: layer map and parameter counts."""
        n = self.model_args.n_layers
        counts = self.parameter_counts()
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
        return (
            f"titan_linear layer map {self.model_args.layer_map} (L = linear, S = softmax): "
            f"{len(self.linear_layers)}/{n} linear, layers {self.linear_layers}; parameters: {parts}"
        )

    def init_weights(self, buffer_device: torch.device | None = None):
        super().init_weights(buffer_device=buffer_device)
        device = buffer_device or self.freqs_cis.device
        for key, value in self.model_args.checkpoint_maps().items():
            setattr(self, key, value.to(device))

    def _check_maps(self, state_dict, prefix, *args, **kwargs):
        own = self.model_args.checkpoint_maps()
        check_maps({k: state_dict[prefix + k] for k in own if prefix + k in state_dict}, own)
