"""The Hugging Face causal LM of an exported hybrid: Llama whose `linear_layers` use efficient attention.

This file is written into every exported hybrid folder with configuration_titan_linear.py and
the op's files (chunk.py, naive.py, linear_options.py, copied from titan_linear), so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` needs only torch and
transformers; inside the titan_linear package the same names come from titan_linear itself.

- Softmax layers are transformers' `LlamaAttention` with HF-layout RoPE (rotate_half on the two
  halves of a head; the export permutes wq/wk rows from TorchTitan's interleaved pairs).
- Linear layers (`TitanLinearAttention`) compute titan_linear's causal efficient attention with
  its plain-torch chunked op, exactly as the TorchTitan model does on the CPU: no RoPE, the
  same projections (`q_proj`, ... hold wq, ...), and the options of the training config.
- No cache: a linear layer's state is not a key/value cache, so every forward recomputes the
  whole sequence (`generate()` works; each new token costs a forward over all tokens so far).
  Padding is refused, since the causal op cannot skip padded positions.
"""

import math

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from .configuration_titan_linear import TitanLinearConfig

try:  # an exported folder: the op's files sit beside this one
    from .chunk import efficient_attention_chunked
    from .linear_options import decayed_keys, HeadRMSNorm, initial_log_decay, ShortConv
except ImportError:  # the titan_linear package
    from titan_linear.models.hybrid.linear_options import decayed_keys, HeadRMSNorm, initial_log_decay, ShortConv
    from titan_linear.ops.efficient_attn.chunk import efficient_attention_chunked


class TitanLinearAttention(nn.Module):
    """titan_linear's linear-attention layer with HF names (q_proj, k_proj, v_proj, o_proj, g_proj).

    The q and k rows are in the permuted (HF) order; the op's output does not depend on the
    order of features within a head when q and k share it, and the export permutes the short
    convolution's q/k kernels with them.

    Args:
        config: a TitanLinearConfig.
        layer_idx: the layer's index.
    """

    def __init__(self, config: TitanLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = hd = config.head_dim
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        self.n_kv_heads = n_kv
        self.q_proj = nn.Linear(config.hidden_size, n_heads * hd, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, n_kv * hd, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, n_kv * hd, bias=False)
        self.o_proj = nn.Linear(n_heads * hd, config.hidden_size, bias=False)
        self.feature_scale = 1.0 / config.linear_attn_temperature
        self.learned_temperature = config.linear_attn_learned_temperature
        if self.learned_temperature:
            self.q_log_scale = nn.Parameter(torch.full((n_heads,), math.log(self.feature_scale)))
            self.k_log_scale = nn.Parameter(torch.full((n_kv,), math.log(self.feature_scale)))
        k = config.linear_attn_short_conv
        self.short_conv = ShortConv((n_heads * hd, n_kv * hd, n_kv * hd), k) if k else None
        self.out_norm = HeadRMSNorm(n_heads, hd, config.rms_norm_eps) if config.linear_attn_output_norm else None
        self.g_proj = nn.Linear(config.hidden_size, n_heads * hd, bias=False) if config.linear_attn_output_gate else None
        self.decay_rates = getattr(config, "linear_attn_decay_rates", "head")
        self.k_log_decay = (nn.Parameter(initial_log_decay(n_kv, hd, self.decay_rates))
                            if config.linear_attn_decay else None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """hidden_states (bs, seqlen, hidden) -> (output of the same shape, None); position
        embeddings, masks and caches are not used."""
        bs, seqlen, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.short_conv is not None:
            (q, k, v), _ = self.short_conv(q, k, v)
        q, k, v = (t.view(bs, seqlen, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.learned_temperature:
            q = q * torch.exp(self.q_log_scale).to(q.dtype)[:, None, None]
            k = k * torch.exp(self.k_log_scale).to(k.dtype)[:, None, None]
        elif self.feature_scale != 1.0:
            q, k = q * self.feature_scale, k * self.feature_scale
        if self.k_log_decay is not None:
            k = decayed_keys(k, self.k_log_decay)
        out = efficient_attention_chunked(q, k, v)  # (bs, n_heads, seqlen, head_dim)
        if self.out_norm is not None:
            out = self.out_norm(out)
        if self.g_proj is not None:
            gate = self.g_proj(hidden_states).view(bs, seqlen, -1, self.head_dim).transpose(1, 2)
            out = out * torch.sigmoid(gate)
        return self.o_proj(out.transpose(1, 2).reshape(bs, seqlen, -1)), None


class TitanLinearPreTrainedModel(LlamaPreTrainedModel):
    config_class = TitanLinearConfig
    config: TitanLinearConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TitanLinearAttention):
            if module.learned_temperature:
                nn.init.constant_(module.q_log_scale, math.log(module.feature_scale))
                nn.init.constant_(module.k_log_scale, math.log(module.feature_scale))
            if module.k_log_decay is not None:
                with torch.no_grad():
                    module.k_log_decay.copy_(initial_log_decay(
                        module.n_kv_heads, module.head_dim, module.decay_rates))
        elif isinstance(module, ShortConv):
            module.init_weights(self.config.initializer_range)
        elif isinstance(module, HeadRMSNorm):
            module.init_weights()


class TitanLinearModel(TitanLinearPreTrainedModel, LlamaModel):
    """LlamaModel whose layers in `config.linear_layers` carry TitanLinearAttention."""

    def __init__(self, config: TitanLinearConfig):
        LlamaModel.__init__(self, config)
        for i in config.linear_layers:
            self.layers[i].self_attn = TitanLinearAttention(config, i)
        self.post_init()


class TitanLinearForCausalLM(TitanLinearPreTrainedModel, LlamaForCausalLM):
    """LlamaForCausalLM over TitanLinearModel; every forward runs without a cache (module docstring)."""

    def __init__(self, config: TitanLinearConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = TitanLinearModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        # A mask of ones is accepted (HF generate and lm-eval's generate_until pass one). Zeros are
        # refused: the linear layers sum over every earlier position, pads included, so a left-padded
        # row (what generate and lm-eval's `hf` model build for prompts of unequal length) would be
        # scored wrongly. lm-eval's loglikelihood passes no mask and right-pads: causal layers never
        # see pads after a row's last real token, so that needs nothing here.
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError("attention_mask with padding is not supported: the linear layers are causal "
                             "over every position; pass unpadded sequences (batch size 1 or equal lengths; "
                             "with lm-eval's hf model, batch_size=1 for generate_until tasks)")
        kwargs.pop("past_key_values", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=None, inputs_embeds=inputs_embeds, labels=labels, use_cache=False,
                               logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """The whole sequence every step: there is no cache to continue from."""
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache_position", None)
        kwargs.pop("position_ids", None)
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask"),
                "logits_to_keep": 1}


__all__ = ["TitanLinearAttention", "TitanLinearForCausalLM", "TitanLinearModel", "TitanLinearPreTrainedModel"]
