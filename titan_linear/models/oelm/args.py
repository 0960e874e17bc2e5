"""Model arguments of the OELM llama: the hybrid's fields plus which projections are frozen."""

import math
from dataclasses import dataclass

import torch
from torchtitan.config import JobConfig

from titan_linear.config_errors import bad_value, is_number
from titan_linear.models.hybrid.args import HybridModelArgs, LINEAR_OPTION_DEFAULTS
from titan_linear.models.hybrid.placement import place_layers

# oelm_freeze -> the attention projections (torchtitan's module names) that are fixed.
FREEZE_MODES = {"qk": ("wq", "wk"), "kv": ("wk", "wv"), "none": ()}
# The attention projections, in the column order of the freeze map.
PROJECTIONS = ("wq", "wk", "wv")


@dataclass
class OELMModelArgs(HybridModelArgs):
    """llama3 (optionally hybrid) whose chosen attention projections are frozen orthogonal.

    Args:
        oelm_freeze: "qk" (W_q, W_k fixed), "kv" (W_k, W_v fixed, W_q learned) or "none"
            (the GPT baseline); docs/recipe.md, "OELM". Default "qk".
        freeze_ratio: fraction of layers whose projections are frozen; round(ratio * n_layers)
            layers spread uniformly through the depth by the same rule as the linear layers
            (see models/hybrid/placement.py). Default 1.0 (every layer).
        oelm_seed: seed of the orthogonal matrices (the job's `debug.seed`, 0 when unset);
            each (layer, projection) draws from its own generator, so the matrices do not
            depend on the parallelism or on the initialisation order.
    """

    # The options of the linear layers are the hybrid's only: OELM compares the seed's layers.
    FOREIGN_KEYS = {k: "llama3_mixed" for k in LINEAR_OPTION_DEFAULTS}

    oelm_freeze: str = "qk"
    freeze_ratio: float = 1.0
    oelm_seed: int = 0

    @property
    def frozen_projections(self) -> tuple[str, ...]:
        return FREEZE_MODES[self.oelm_freeze]

    @property
    def frozen_layers(self) -> list[int]:
        """Sorted indices of the layers whose `frozen_projections` are fixed orthogonal."""
        if not self.frozen_projections:
            return []
        return place_layers(self.n_layers, self.freeze_ratio, "uniform", [])

    @property
    def freeze_map(self) -> str:
        """One letter per layer: F = frozen projections, T = all trainable."""
        frozen = set(self.frozen_layers)
        return "".join("F" if i in frozen else "T" for i in range(self.n_layers))

    def checkpoint_maps(self) -> dict[str, torch.Tensor]:
        """The hybrid's layer map plus `oelm_freeze_map` (n_layers x 3, 1 = frozen wq/wk/wv)."""
        m = torch.zeros(self.n_layers, len(PROJECTIONS), dtype=torch.int8)
        for i in self.frozen_layers:
            for p in self.frozen_projections:
                m[i, PROJECTIONS.index(p)] = 1
        return {**super().checkpoint_maps(), "oelm_freeze_map": m}

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Apply the [model] keys (the hybrid's and the OELM ones); raise ConfigError on bad values."""
        m = job_config.model
        mode = "qk" if m.oelm_freeze is None else m.oelm_freeze
        if mode not in FREEZE_MODES:
            raise bad_value("model.oelm_freeze", mode, f"one of {', '.join(FREEZE_MODES)}")
        ratio = 1.0 if m.freeze_ratio is None else m.freeze_ratio
        if not is_number(ratio) or not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
            raise bad_value("model.freeze_ratio", ratio, "a number in [0, 1]")
        super().update_from_config(job_config, **kwargs)
        self.oelm_freeze = mode
        self.freeze_ratio = float(ratio)
        seed = job_config.debug.seed
        self.oelm_seed = 0 if seed is None else int(seed)
