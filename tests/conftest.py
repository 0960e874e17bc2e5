"""Shared test set-up. Tests are grouped by concept: ops/, models/, data/, inference/, recipe/,
launch/ (configs and the checks before a run), benchmarks/, integration/ (real runs through
torchrun on the CPU). Builders and paths that tests import live in tests/helpers.py."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly (with the reason) on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
