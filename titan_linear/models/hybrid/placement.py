"""Which layers of a model a ratio and a placement pick: the one placement rule.

`place_layers(n_layers, ratio, placement, explicit)` is the single source of truth.
The hybrid picks its linear-attention layers with it (the model, the start-up log,
the checkpoint check and docs/placement.md use it) and OELM picks its frozen layers
with it ("uniform", no explicit list).

Count: n_picked = floor(ratio * n_layers + 0.5) (round half up, so 0.5 of 5 layers
gives 3, not Python's banker's 2).

Placement:
- "uniform" (default): the minority, picked layers or the rest (picked on a tie),
  sits at the centres of equal bins of the depth, index floor((i + 0.5) * n_layers / m)
  for i in 0..m-1, where m is the minority count; the majority fills the rest. With
  few softmax layers in a hybrid they therefore sit spaced out and away from the very
  first and last layer, as Mamba-2 (arXiv 2405.21060) found best; with few linear
  layers, those are spaced out likewise.
  Example, 16 layers: 0.25 -> picked 2, 6, 10, 14; 0.5 -> the odd layers;
  0.75 -> all but 2, 6, 10, 14.
- "front": the first n_picked layers; "back": the last n_picked layers;
  "middle": a contiguous block centred in the depth, starting at
  (n_layers - n_picked) // 2.
- An explicit list overrides the ratio and the placement.
"""

import math

PLACEMENTS = ("uniform", "front", "middle", "back")


def num_placed(n_layers: int, ratio: float) -> int:
    """How many of `n_layers` layers `ratio` picks: floor(ratio * n_layers + 0.5)."""
    return int(math.floor(ratio * n_layers + 0.5))


def _bin_centres(n_layers: int, m: int) -> list[int]:
    return [int(math.floor((i + 0.5) * n_layers / m)) for i in range(m)]


def place_layers(
    n_layers: int,
    ratio: float,
    placement: str = "uniform",
    explicit: list[int] | tuple[int, ...] | None = None,
) -> list[int]:
    """Sorted indices of the layers that `ratio` and `placement` pick (or `explicit`).

    Args:
        n_layers: depth of the model.
        ratio: fraction of the layers to pick, in [0, 1] (ignored when `explicit` is given).
        placement: one of PLACEMENTS (ignored when `explicit` is given).
        explicit: explicit layer indices; validated by the caller.
    """
    if explicit:
        return sorted(explicit)
    n_picked = num_placed(n_layers, ratio)
    if n_picked == 0:
        return []
    if n_picked == n_layers:
        return list(range(n_layers))
    if placement == "front":
        return list(range(n_picked))
    if placement == "back":
        return list(range(n_layers - n_picked, n_layers))
    if placement == "middle":
        start = (n_layers - n_picked) // 2
        return list(range(start, start + n_picked))
    assert placement == "uniform", placement
    n_rest = n_layers - n_picked
    if n_picked <= n_rest:
        return _bin_centres(n_layers, n_picked)
    rest = set(_bin_centres(n_layers, n_rest))
    return [i for i in range(n_layers) if i not in rest]


def layer_map_string(n_layers: int, linear_ids: list[int]) -> str:
    """One character per layer, 'L' linear and 'S' softmax, e.g. 'SLSLSL'."""
    lin = set(linear_ids)
    return "".join("L" if i in lin else "S" for i in range(n_layers))
