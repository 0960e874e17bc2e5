"""A model to generate with, built the way training builds it, and its tokenizer.

The TOML is parsed and validated by `titan_linear.launch.check` (the same path as
`run_train.sh`), so a config that trains also builds here, with the same model args and
layer map. The model is built on the meta device and materialised like TorchTitan's
Trainer does, then filled either by `init_weights` (random init) or from a DCP checkpoint.

Checkpoints: TorchTitan 0.2.2's CheckpointManager flattens the model's state dict into the
top level of the DCP checkpoint (keys such as `layers.0.attention.wq.weight`, beside
`optimizer`, `dataloader`, ... entries); a `model.` prefix is accepted too. Only the model's
tensors are read.
"""

import copy
import os
import re

import torch
from torch import nn


def parse_job_config(config_file: str, overrides: list[str] | None = None):
    """(job_config, model_args) from a training TOML plus TorchTitan CLI overrides.

    Raises ValueError naming the key for a missing file, a bad TOML or a bad setting.
    """
    from titan_linear.launch import with_config_module, check

    return check(with_config_module(["--job.config_file", config_file, *(overrides or [])]))


def train_spec(job_config):
    import titan_linear  # noqa: F401 (registers the train specs)
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec(job_config.model.name)


def build_model(job_config, model_args, device: torch.device, seed: int = 0) -> nn.Module:
    """The job's train-spec model for `model_args` on `device`, randomly initialised from `seed`."""
    return materialize(train_spec(job_config).model_cls, model_args, device, seed)


def materialize(model_cls, model_args, device: torch.device, seed: int = 0) -> nn.Module:
    """`model_cls(model_args)` on `device`, randomly initialised from `seed`.

    Built on meta and materialised with `init_weights`, as TorchTitan's Trainer does, so the
    random weights are those a run from the same seed starts with (on one process).
    """
    with torch.device("meta"):
        model = model_cls(copy.deepcopy(model_args))
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    return model


def build_tokenizer(job_config):
    """The tokenizer the train spec builds from `model.hf_assets_path`."""
    return train_spec(job_config).build_tokenizer_fn(job_config)


def find_checkpoint(path: str) -> str:
    """The DCP checkpoint directory that `path` names: itself, or its newest `step-N` child.

    Raises ValueError naming `--checkpoint` when there is none.
    """
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint = {path!r} is not allowed: no such directory")
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    steps = [
        (int(m.group(1)), d)
        for d in os.listdir(path)
        if (m := re.fullmatch(r"step-(\d+)", d)) and os.path.isfile(os.path.join(path, d, ".metadata"))
    ]
    if not steps:
        raise ValueError(
            f"--checkpoint = {path!r} is not allowed: it holds no DCP checkpoint (no .metadata, "
            "no step-N folder); pass <dump_folder>/checkpoint/step-N"
        )
    return os.path.join(path, max(steps)[1])


def load_model_weights(model: nn.Module, path: str) -> str:
    """Load the model's tensors from the DCP checkpoint at `path` (or its newest step); return that path.

    Raises ValueError naming `--checkpoint` when a tensor is missing or has another shape,
    and the model's own error when its layer map (or OELM freeze map) differs.
    """
    import torch.distributed.checkpoint as dcp

    from titan_linear.checkpoint import check_intact

    path = find_checkpoint(path)
    # A truncated file would otherwise surface as a bare EOFError naming no file.
    check_intact(path)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = model.state_dict()
    prefix = "model." if any(k.startswith("model.") for k in saved) and not any(k in saved for k in state) else ""
    to_load = {}
    for name, tensor in state.items():
        entry = saved.get(prefix + name)
        if entry is None or not hasattr(entry, "size"):
            raise ValueError(
                f"--checkpoint = {path!r} is not allowed: it has no tensor {prefix + name!r} "
                "(a checkpoint of another model? check --config)"
            )
        if tuple(entry.size) != tuple(tensor.shape):
            raise ValueError(
                f"--checkpoint = {path!r} is not allowed: {name} is {tuple(entry.size)} there and "
                f"{tuple(tensor.shape)} in the model of --config"
            )
        to_load[prefix + name] = tensor
    # Loads in place into the model's own tensors.
    dcp.load(to_load, checkpoint_id=path)
    # Runs the model's load hooks, which compare the saved layer map with the model's.
    model.load_state_dict({name: to_load[prefix + name] for name in state})
    return path
