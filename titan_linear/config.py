"""The TOML keys titan_linear adds to TorchTitan's JobConfig.

TorchTitan merges this dataclass into its own when a config names
`[job] custom_config_module = "titan_linear.config"`, so the keys below parse,
show up in `--help` and are overridable from the command line
(`--model.linear_attn_ratio 0.25`) like built-in ones.
"""

from dataclasses import dataclass, field


@dataclass
class Model:
    linear_attn_ratio: float = 0.0
    """Fraction of layers that use causal efficient (linear-time) attention, in [0, 1].
    round(ratio * n_layers) layers become linear, placed by `linear_attn_placement`."""

    linear_attn_layers: list[int] = field(default_factory=list)
    """Explicit 0-based indices of the linear layers; when non-empty it overrides
    `linear_attn_ratio` and `linear_attn_placement`."""

    linear_attn_placement: str = "uniform"
    """Where the linear layers go: uniform (spread through the depth), front, middle, back."""

    n_layers: int = 0
    """Override the flavor's number of layers (0 keeps the flavor's)."""

    dim: int = 0
    """Override the flavor's model width (0 keeps the flavor's)."""

    n_heads: int = 0
    """Override the flavor's number of query heads (0 keeps the flavor's)."""

    n_kv_heads: int = 0
    """Override the flavor's number of key/value heads (0 keeps the flavor's)."""

    vocab_size: int = 0
    """Override the flavor's vocabulary size (0 keeps the flavor's)."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
