"""Layer maps that every checkpoint carries, and the one check that a checkpoint fits the model.

A model of this package keeps, as persistent buffers, small integer maps of how its
layers are built (which are linear, which projections are frozen). They are saved
with every checkpoint, so loading into a model built from other settings is refused
with both maps named instead of silently loading weights into the wrong layers. The
model's load hook, `generate`, and `launch check` (before a resume starts) all call
`check_maps`.
"""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LayerMap:
    """How one map buffer is shown and which keys decide it.

    Args:
        what: what the map records, e.g. "layer map".
        render: the map tensor as a short string.
        legend: what the string's letters mean.
        keys: the TOML keys that decide the map.
    """

    what: str
    render: Callable[[torch.Tensor], str]
    legend: str
    keys: str


def _linear_map(m: torch.Tensor) -> str:
    return "".join("L" if int(x) else "S" for x in m.tolist())


def _freeze_map(m: torch.Tensor) -> str:
    return "|".join("".join("qkv"[j] if int(row[j]) else "-" for j in range(len(row))) for row in m.tolist())


MAPS = {
    "linear_layer_map": LayerMap(
        "layer map", _linear_map, "L = linear, S = softmax",
        "model.linear_attn_ratio / linear_attn_layers / linear_attn_placement",
    ),
    "oelm_freeze_map": LayerMap(
        "OELM freeze map", _freeze_map, "per layer, the frozen ones of q/k/v",
        "model.oelm_freeze and model.freeze_ratio",
    ),
}


def check_maps(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when a map in `saved` (a checkpoint's) differs from the model's `own`."""
    for key, mine in own.items():
        if key not in saved:
            continue
        theirs = saved[key]
        theirs = (theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs).cpu()
        mine = mine.cpu()
        if theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine):
            spec = MAPS[key]
            raise ValueError(
                f"checkpoint {spec.what} {spec.render(theirs)} does not match this model's "
                f"{spec.what} {spec.render(mine)} ({spec.legend}): resume with the same {spec.keys}"
            )
