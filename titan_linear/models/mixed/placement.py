"""Which layers of a hybrid model use linear attention: the one placement rule.

`linear_layer_ids(n_layers, ratio, placement, explicit)` is the single source of
truth; the model, the start-up log, the checkpoint check and the README all use it.

Count: n_linear = floor(ratio * n_layers + 0.5) (round half up, so 0.5 of 5 layers
gives 3, not Python's banker's 2).

Placement:
- "uniform" (default): the kind of layer that is in the minority (linear on a
  tie) sits at the centres of equal bins of the depth, index
  floor((i + 0.5) * n_layers / m) for i in 0..m-1, where m is the minority count;
  the majority kind fills the rest. With few softmax layers they therefore sit
  spaced out and away from the very first and last layer, as Mamba-2 (arXiv
  2405.21060) found best; with few linear layers, those are spaced out likewise.
  Example, 16 layers: 0.25 -> linear at 2, 6, 10, 14; 0.5 -> linear at the odd
  layers; 0.75 -> softmax at 2, 6, 10, 14.
- "front": the first n_linear layers; "back": the last n_linear layers;
  "middle": a contiguous block centred in the depth, starting at
  (n_layers - n_linear) // 2.
- An explicit list overrides the ratio and the placement.
"""

import math

PLACEMENTS = ("uniform", "front", "middle", "back")


def num_linear_layers(n_layers: int, ratio: float) -> int:
    return int(math.floor(ratio * n_layers + 0.5))


def _bin_centres(n_layers: int, m: int) -> list[int]:
    return [int(math.floor((i + 0.5) * n_layers / m)) for i in range(m)]


def linear_layer_ids(
    n_layers: int,
    ratio: float,
    placement: str = "uniform",
    explicit: list[int] | tuple[int, ...] | None = None,
) -> list[int]:
    """Sorted indices of the linear-attention layers.

    Args:
        n_layers: depth of the model.
        ratio: fraction of linear layers in [0, 1] (ignored when `explicit` is given).
        placement: one of PLACEMENTS (ignored when `explicit` is given).
        explicit: explicit layer indices; validated by the caller.
    """
    if explicit:
        return sorted(explicit)
    n_lin = num_linear_layers(n_layers, ratio)
    if n_lin == 0:
        return []
    if n_lin == n_layers:
        return list(range(n_layers))
    if placement == "front":
        return list(range(n_lin))
    if placement == "back":
        return list(range(n_layers - n_lin, n_layers))
    if placement == "middle":
        start = (n_layers - n_lin) // 2
        return list(range(start, start + n_lin))
    assert placement == "uniform", placement
    n_soft = n_layers - n_lin
    if n_lin <= n_soft:
        return _bin_centres(n_layers, n_lin)
    soft = set(_bin_centres(n_layers, n_soft))
    return [i for i in range(n_layers) if i not in soft]


def layer_map_string(n_layers: int, linear_ids: list[int]) -> str:
    """One character per layer, 'L' linear and 'S' softmax, e.g. 'SLSLSL'."""
    lin = set(linear_ids)
    return "".join("L" if i in lin else "S" for i in range(n_layers))
