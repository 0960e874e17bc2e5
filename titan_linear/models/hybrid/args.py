"""Model arguments of the hybrid llama3: llama3's fields plus the layer mix."""

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from torchtitan.config import JobConfig
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.tools.logging import logger

from titan_linear.config import Model as ModelConfig
from titan_linear.config_errors import bad_value, checked_bool, ConfigError, is_int, is_number
from titan_linear.models.maps import CONVERT_KEY
from titan_linear.recipe import check_recipe

from .linear_options import DECAY_RATES
from .placement import layer_map_string, place_layers, PLACEMENTS


def linear_options_from(m) -> dict:
    """The linear-layer options of a [model] config section, checked; raises ConfigError."""
    out = {}
    temp = getattr(m, "linear_attn_temperature", 1.0)
    if not is_number(temp) or not math.isfinite(temp) or temp <= 0:
        raise bad_value("model.linear_attn_temperature", temp, "a finite number > 0 (1.0 is off)")
    out["linear_attn_temperature"] = float(temp)
    for key in ("linear_attn_learned_temperature", "linear_attn_output_norm", "linear_attn_output_gate",
                "linear_attn_decay"):
        out[key] = checked_bool(f"model.{key}", getattr(m, key, False))
    conv = getattr(m, "linear_attn_short_conv", 0)
    if not is_int(conv) or not (conv == 0 or 2 <= conv <= 32):
        raise bad_value("model.linear_attn_short_conv", conv, "0 (off) or a kernel size in [2, 32]")
    out["linear_attn_short_conv"] = conv
    rates = getattr(m, "linear_attn_decay_rates", "head")
    if rates not in DECAY_RATES:
        raise bad_value("model.linear_attn_decay_rates", rates, f"one of {', '.join(DECAY_RATES)}")
    if rates != "head" and not out["linear_attn_decay"]:
        raise bad_value("model.linear_attn_decay_rates", rates,
                        "'head' (the default) unless model.linear_attn_decay = true: the rates are the decay's")
    out["linear_attn_decay_rates"] = rates
    return out


# The option keys and their defaults (off), read from the check itself: OELM's refusals, the HF
# export's config fields and `mqar --linear-options` take them from here.
LINEAR_OPTION_DEFAULTS = linear_options_from(object())


@dataclass
class HybridModelArgs(TransformerModelArgs):
    # [model] keys of other models, refused here when set (never silently ignored).
    FOREIGN_KEYS = {"oelm_freeze": "llama3_oelm", "freeze_ratio": "llama3_oelm"}

    linear_attn_ratio: float = 0.0
    linear_attn_layers: tuple[int, ...] = ()
    linear_attn_placement: str = "uniform"
    # Options of the linear layers (titan_linear/config.py, docs/attention.md); off by default.
    linear_attn_temperature: float = 1.0
    linear_attn_learned_temperature: bool = False
    linear_attn_output_norm: bool = False
    linear_attn_output_gate: bool = False
    linear_attn_short_conv: int = 0
    linear_attn_decay: bool = False
    linear_attn_decay_rates: str = "head"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def linear_layers(self) -> list[int]:
        """Sorted indices of the linear-attention layers (the placement rule lives in placement.py)."""
        return place_layers(
            self.n_layers,
            self.linear_attn_ratio,
            self.linear_attn_placement,
            list(self.linear_attn_layers),
        )

    @property
    def layer_map(self) -> str:
        return layer_map_string(self.n_layers, self.linear_layers)

    def checkpoint_maps(self) -> dict[str, torch.Tensor]:
        """The layer maps the model saves with its weights (models/maps.py checks them on load)."""
        m = torch.zeros(self.n_layers, dtype=torch.int8)
        m[self.linear_layers] = 1
        return {"linear_layer_map": m}

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Apply the [model] keys of the job config; raise ConfigError on bad values.

        Everything is validated before any field changes, so a failed call leaves
        the flavor's arguments untouched.
        """
        m = job_config.model
        defaults = {f.name: f.default for f in fields(ModelConfig)}
        for key, owner in self.FOREIGN_KEYS.items():
            value = getattr(m, key, None)
            if value is not None and value != defaults.get(key):
                raise bad_value(f"model.{key}", value,
                                f"unset for model.name = {m.name!r} (it applies to {owner} only)")
        # The recipe (optimizer groups, schedules, monitoring) is checked here for every model.
        for note in check_recipe(job_config):
            logger.warning(note)
        # Read only by an initial load (initial_load.py), checked for every run all the same.
        checked_bool(CONVERT_KEY, getattr(job_config.checkpoint, "initial_load_convert_layer_map", False))
        shape = {}
        for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(m, key, 0)
            if not is_int(value) or value < 0:
                raise bad_value(f"model.{key}", value, "a positive integer, or 0 to keep the flavor's")
            shape[key] = value or (getattr(self, key) if key != "n_kv_heads" else None)
        n_layers, dim, n_heads = shape["n_layers"], shape["dim"], shape["n_heads"]
        n_kv_heads = shape["n_kv_heads"] or self.n_kv_heads or n_heads
        where = f"(flavor {m.flavor!r})"
        if dim % n_heads:
            raise bad_value("model.n_heads", n_heads, f"a divisor of model.dim = {dim} {where}")
        if (dim // n_heads) % 2:
            raise bad_value("model.n_heads", n_heads,
                            f"a value giving an even head dim (dim {dim} / n_heads is odd; RoPE needs pairs) {where}")
        if n_heads % n_kv_heads:
            raise bad_value("model.n_kv_heads", n_kv_heads, f"a divisor of model.n_heads = {n_heads} {where}")

        ratio = getattr(m, "linear_attn_ratio", 0.0)
        if not is_number(ratio) or not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
            raise bad_value("model.linear_attn_ratio", ratio, "a number in [0, 1]")
        placement = getattr(m, "linear_attn_placement", "uniform")
        if placement not in PLACEMENTS:
            raise bad_value("model.linear_attn_placement", placement, f"one of {', '.join(PLACEMENTS)}")
        layers = list(getattr(m, "linear_attn_layers", []) or [])
        for i in layers:
            if not is_int(i) or not 0 <= i < n_layers:
                raise bad_value("model.linear_attn_layers", layers,
                                f"distinct integer layer indices in [0, {n_layers - 1}]; {i!r} is not")
        if len(set(layers)) != len(layers):
            dup = sorted({i for i in layers if layers.count(i) > 1})
            raise bad_value("model.linear_attn_layers", layers,
                            f"distinct integer layer indices in [0, {n_layers - 1}]; repeated: {dup}")

        ids = place_layers(n_layers, ratio, placement, layers)
        cp = job_config.parallelism.context_parallel_degree
        if ids and cp > 1:
            raise bad_value("parallelism.context_parallel_degree", cp,
                            "1 when the model has linear-attention layers (context parallel "
                            "for linear attention is not supported yet)")

        options = linear_options_from(m)
        if not ids and any(options[k] != defaults[k] for k in options):
            logger.warning("the model.linear_attn_* options have no effect: the model has no linear layers")

        val = job_config.validation
        if val.enable and val.seq_len > job_config.training.seq_len:
            raise bad_value("validation.seq_len", val.seq_len,
                            f"at most training.seq_len = {job_config.training.seq_len} (RoPE tables are "
                            "sized to the training length)")

        if layers and ratio:
            logger.warning(f"model.linear_attn_layers={layers} overrides model.linear_attn_ratio={ratio}")
        self.n_layers, self.dim, self.n_heads, self.vocab_size = n_layers, dim, n_heads, shape["vocab_size"]
        if shape["n_kv_heads"]:
            self.n_kv_heads = shape["n_kv_heads"]
        self.linear_attn_ratio = float(ratio)
        self.linear_attn_layers = tuple(layers)
        self.linear_attn_placement = placement
        for key, value in options.items():
            setattr(self, key, value)
        super().update_from_config(job_config, **kwargs)

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameters and training FLOPs per token, linear layers counted as they are.

        Dense part: 6 FLOPs per non-embedding parameter per token (fwd + bwd).
        Softmax layer: 6 * n_heads * (2 * head_dim) * seq_len, torchtitan's convention.
        Linear layer (recurrent form, per head and token): state update 2*dk*dv and
        read-out 2*dk*dv multiply-adds in the forward, x3 for forward + backward.
        The linear layers' options (W_g, the short convolution's kernels, norm weights,
        temperatures) are weights used once per token, so the dense term counts them.
        """
        nparams = sum(p.numel() for p in model.parameters())
        nparams_emb = sum(
            p.numel() for m in model.children() if isinstance(m, nn.Embedding) for p in m.parameters()
        )
        n_lin = len(self.linear_layers)
        n_soft = self.n_layers - n_lin
        hd = self.head_dim
        flops = (
            6 * (nparams - nparams_emb)
            + 6 * n_soft * self.n_heads * 2 * hd * seq_len
            + 12 * n_lin * self.n_heads * hd * hd
        )
        return nparams, flops
