"""Layer maps that every checkpoint carries, and the one check that a checkpoint fits the model.

A model of this package keeps, as persistent buffers, small integer maps of how its
layers are built (which are linear, which projections are frozen). They are saved
with every checkpoint, so loading into a model built from other settings is refused
with both maps named instead of silently loading weights into the wrong layers. The
model's load hook, `generate`, and `launch check` (before a resume starts) all call
`check_maps`.

The one exception is a run's initial load of another run's DCP checkpoint
(`checkpoint.initial_load_path`, titan_linear/initial_load.py): there a map whose `convert`
is set (the layer map) may change when the user asks for it; the others never do.
"""

from dataclasses import dataclass
from typing import Callable

import torch

# The key that lets an initial load change a map whose `convert` is set (titan_linear/config.py).
CONVERT_KEY = "checkpoint.initial_load_convert_layer_map"


@dataclass(frozen=True)
class LayerMap:
    """How one map buffer is shown and which keys decide it.

    Args:
        what: what the map records, e.g. "layer map".
        render: the map tensor as a short string.
        legend: what the string's letters mean.
        keys: the TOML keys that decide the map.
        convert: None when no load may change the map; else what a change from the checkpoint's
            map to the model's does, in words (initial_load.py logs it).
    """

    what: str
    render: Callable[[torch.Tensor], str]
    legend: str
    keys: str
    convert: Callable[[torch.Tensor, torch.Tensor], str] | None = None


def _linear_map(m: torch.Tensor) -> str:
    return "".join("L" if int(x) else "S" for x in m.tolist())


def _layers(indices: list[int]) -> str:
    return ("layer " if len(indices) == 1 else "layers ") + ",".join(map(str, indices))


def _linear_change(theirs: torch.Tensor, mine: torch.Tensor) -> str:
    t, m = theirs.tolist(), mine.tolist()
    parts = []
    for became, was, kind, other in ((1, 0, "linear", "softmax"), (0, 1, "softmax", "linear")):
        changed = [i for i in range(len(m)) if int(m[i]) == became and int(t[i]) == was]
        if changed:
            parts.append(f"{_layers(changed)} become {kind}; their wq/wk/wv/wo come from the "
                         f"checkpoint's {other} layers")
    return "; ".join(parts)


def _freeze_map(m: torch.Tensor) -> str:
    return "|".join("".join("qkv"[j] if int(row[j]) else "-" for j in range(len(row))) for row in m.tolist())


MAPS = {
    "linear_layer_map": LayerMap(
        "layer map", _linear_map, "L = linear, S = softmax",
        "model.linear_attn_ratio / linear_attn_layers / linear_attn_placement", _linear_change,
    ),
    "oelm_freeze_map": LayerMap(
        "OELM freeze map", _freeze_map, "per layer, the frozen ones of q/k/v",
        "model.oelm_freeze and model.freeze_ratio",
    ),
}


def full(t: torch.Tensor) -> torch.Tensor:
    """`t` whole (a DTensor gathered) on the CPU."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


def same_map(theirs: torch.Tensor, mine: torch.Tensor) -> bool:
    theirs, mine = full(theirs), full(mine)
    return theirs.shape == mine.shape and torch.equal(theirs.to(mine.dtype), mine)


def mismatch(key: str, theirs: torch.Tensor, mine: torch.Tensor) -> str:
    """The words for map `key` differing: checkpoint <map> X does not match this model's <map> Y."""
    spec = MAPS[key]
    return (f"checkpoint {spec.what} {spec.render(full(theirs))} does not match this model's "
            f"{spec.what} {spec.render(full(mine))} ({spec.legend})")


def check_maps(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when a map in `saved` (a checkpoint's) differs from the model's `own`."""
    for key, mine in own.items():
        if key in saved and not same_map(saved[key], mine):
            spec = MAPS[key]
            other = (f" (to start another {spec.what} from it: make it the checkpoint.initial_load_path of a new "
                     f"job.dump_folder, with {CONVERT_KEY} = true)" if spec.convert else "")
            raise ValueError(f"{mismatch(key, saved[key], mine)}: resume with the same {spec.keys}{other}")
