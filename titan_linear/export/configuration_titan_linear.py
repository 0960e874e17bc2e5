"""The Hugging Face config of an exported hybrid: Llama's fields plus the layer map and options.

This file is written into every exported hybrid folder (`trust_remote_code`), so it imports
nothing from titan_linear. The llama fields mean what they mean for `LlamaConfig`; the rest:

- `linear_layers`: indices of the layers that use causal efficient attention (no RoPE); the
  others are Llama's softmax attention with RoPE.
- `linear_attn_temperature`, `linear_attn_learned_temperature`, `linear_attn_output_norm`,
  `linear_attn_output_gate`, `linear_attn_short_conv`, `linear_attn_decay`, `linear_attn_decay_rates`: the
  linear layers' options, as the `[model]` keys of the training TOML (titan_linear docs/attention.md).
- `titan_linear`: where the export came from (layer map string, model name, flavor, the OELM
  freeze map where there is one); a record, not read by the model.
"""

from transformers import LlamaConfig


class TitanLinearConfig(LlamaConfig):
    model_type = "titan_linear_llama"

    linear_layers: list[int] | None = None
    linear_attn_temperature: float = 1.0
    linear_attn_learned_temperature: bool = False
    linear_attn_output_norm: bool = False
    linear_attn_output_gate: bool = False
    linear_attn_short_conv: int = 0
    linear_attn_decay: bool = False
    linear_attn_decay_rates: str = "head"
    titan_linear: dict | None = None

    def __post_init__(self, **kwargs):
        self.linear_layers = sorted(int(i) for i in (self.linear_layers or []))
        bad = [i for i in self.linear_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"linear_layers = {self.linear_layers} is not allowed: indices in "
                             f"[0, {self.num_hidden_layers - 1}]; {bad[0]} is not")
        super().__post_init__(**kwargs)
