"""Small builders shared by the tests."""

import copy

import torch

from titan_linear.models.mixed import mixed_args, MixedModelArgs, MixedTransformer


def debug_args(**changes) -> MixedModelArgs:
    args = copy.deepcopy(mixed_args["debugmodel"])
    args.max_seq_len = 64
    for k, v in changes.items():
        setattr(args, k, v)
    return args


def build(args, seed: int = 0, cls=MixedTransformer):
    """Build `cls(args)` on meta, then materialise and init_weights as torchtitan's Trainer does."""
    with torch.device("meta"):
        model = cls(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model
