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

    linear_attn_temperature: float = 1.0
    """Temperature of the linear layers' two softmaxes (> 0): q and k are divided by it before
    softmax(q) over features and the causal softmax of k over positions. 1.0 (the default) is the
    seed's formula; below 1 sharpens both, above 1 flattens them. docs/attention.md, "Options"."""

    linear_attn_learned_temperature: bool = False
    """Learn the temperature of the linear layers per head (separately for q's heads and k's
    heads), starting at `linear_attn_temperature`. Off by default."""

    linear_attn_output_norm: bool = False
    """Per-head RMSNorm of the linear layers' attention output before `wo`, with a learned
    weight per head and feature (as TransNormer and GLA). Off by default."""

    linear_attn_output_gate: bool = False
    """Multiply the linear layers' attention output by sigmoid(x W_g) before `wo` (W_g: a
    dim -> n_heads * head_dim projection of the block input). Off by default."""

    linear_attn_short_conv: int = 0
    """Kernel size of a causal depthwise convolution on the linear layers' q, k, v after their
    projections (0, the default, is off; fla's layers use 4; allowed 2..32). Decoding carries its
    last kernel - 1 inputs."""

    linear_attn_decay: bool = False
    """A learned decay of the linear layers' state per kv head (γ = exp(−a), started at RetNet's
    1 − 2^(−5−h)): the bias a·s on the keys before their causal softmax over positions, which
    weighs key s at position t by γ^(t−s). Gives the layers a sense of recency. Off by default.
    docs/attention.md, "Decay"."""

    linear_attn_decay_rates: str = "head"
    """How many rates the decay learns: "head" (the default), one per kv head; "feature", one per
    key feature of each kv head, started spread from half-lives of 2 to 2,800 tokens within every
    head. Only with linear_attn_decay = true. docs/attention.md, "Decay"."""

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

    oelm_freeze: str | None = None
    """llama3_oelm only (other models refuse it). Which attention projections are fixed random
    orthogonal matrices: qk (W_q, W_k frozen; the default), kv (W_k, W_v frozen, W_q learned), none."""

    freeze_ratio: float | None = None
    """llama3_oelm only (other models refuse it). Fraction of layers, in [0, 1], whose `oelm_freeze`
    projections are frozen: round(ratio * n_layers) layers, spread uniformly (the placement rule of
    docs/placement.md). Default 1.0."""


@dataclass
class Optimizer:
    no_decay_bias_and_norm: bool = True
    """Put biases and norm weights in a parameter group with weight decay 0 (every model)."""


@dataclass
class LRScheduler:
    schedule: str = "torchtitan"
    """torchtitan (TorchTitan's warmup-stable-decay: decay_type, decay_ratio, min_lr_factor),
    cosine_restarts (warmup then cosine cycles of restart_interval steps down to min_lr_factor),
    polynomial (warmup then (1 - progress)^power down to min_lr_factor). 'cosine' is a
    deprecated spelling of decay_type = 'cosine'."""

    min_lr_ratio: float | None = None
    """Deprecated: TorchTitan's lr_scheduler.min_lr_factor, the floor of every schedule."""

    restart_interval: int | None = None
    """cosine_restarts only: steps per cosine cycle after warmup (0: one cycle over the whole run)."""

    power: float | None = None
    """polynomial only: the exponent of (1 - progress). Default 1."""


@dataclass
class Monitor:
    grad_norm_warn: float = 100.0
    """Log a warning when the (pre-clip) gradient norm of a logged step exceeds this (every model)."""

    stop_on_nonfinite: bool = True
    """Stop the run, before the optimizer step, as soon as the loss or the gradient norm is NaN or
    Inf; no checkpoint of non-finite weights is ever written (every model)."""

    stop_on_nonfinite_loss: bool | None = None
    """Deprecated spelling of stop_on_nonfinite."""


@dataclass
class Checkpoint:
    initial_load_convert_layer_map: bool = False
    """Let `checkpoint.initial_load_path` (a DCP checkpoint of a model trained here, e.g. a softmax-only
    run) start a model of another layer map: every layer takes the checkpoint's same-numbered weights,
    so a layer that becomes linear starts from softmax attention's wq/wk/wv/wo (linearizing). Needs
    initial_load_model_only = true; logs the change. Off (the default), a different layer map is
    refused. A resume (the dump folder's own checkpoints) always needs the same layer map, and the
    OELM freeze map never changes. docs/hf.md, "Linearize a checkpoint trained here"."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    monitor: Monitor = field(default_factory=Monitor)
