"""The placement rule of linear and OELM frozen layers (titan_linear/models/hybrid/placement.py)."""

import pytest

from titan_linear.models.hybrid.placement import (
    layer_map_string,
    place_layers,
    num_placed,
    PLACEMENTS,
)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 16, 28, 32, 80])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_count_and_range(n, ratio, placement):
    ids = place_layers(n, ratio, placement)
    assert len(ids) == num_placed(n, ratio) == int(ratio * n + 0.5)
    assert ids == sorted(set(ids))
    assert all(0 <= i < n for i in ids)


def test_round_half_up():
    assert num_placed(5, 0.5) == 3
    assert num_placed(6, 0.25) == 2  # 1.5 -> 2


def test_uniform_16_layers():
    assert place_layers(16, 0.25) == [2, 6, 10, 14]
    assert place_layers(16, 0.5) == list(range(1, 16, 2))
    soft = [i for i in range(16) if i not in place_layers(16, 0.75)]
    assert soft == [2, 6, 10, 14]
    assert place_layers(16, 1.0) == list(range(16))
    assert place_layers(16, 0.0) == []


@pytest.mark.parametrize("n", [6, 16, 32])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_uniform_is_spread(n, ratio):
    """Uniform placement: gaps between the minority kind's layers differ by at most 1."""
    ids = place_layers(n, ratio)
    minority = ids if len(ids) <= n - len(ids) else [i for i in range(n) if i not in ids]
    gaps = [b - a for a, b in zip(minority, minority[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1
    # the minority never sits on both ends at once: the depth is not lopsided
    assert not (0 in minority and n - 1 in minority)


def test_front_middle_back():
    assert place_layers(16, 0.25, "front") == [0, 1, 2, 3]
    assert place_layers(16, 0.25, "back") == [12, 13, 14, 15]
    assert place_layers(16, 0.25, "middle") == [6, 7, 8, 9]


def test_explicit_overrides_ratio_and_placement():
    assert place_layers(16, 0.75, "front", [9, 3]) == [3, 9]


def test_layer_map_string():
    assert layer_map_string(6, [1, 3, 5]) == "SLSLSL"
