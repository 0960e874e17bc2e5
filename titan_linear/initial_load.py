"""A run's initial load of a DCP checkpoint of a model built with other settings (linearizing).

TorchTitan's `CheckpointManager.load` reads `checkpoint.initial_load_path` only when the run's
checkpoint folder (`<dump_folder>/<checkpoint.folder>`) does not exist: a first start. Later the
run resumes from its own checkpoints, where the layer maps must match (models/maps.py). The
initial load is where a model may change, e.g. a softmax-only run's checkpoint starting a hybrid
("linearize a model pretrained here"). Every layer keeps llama3's wq/wk/wv/wo names and shapes,
so each takes the checkpoint's same-numbered weights, softmax and linear layers alike, as in the
Hugging Face import (models/hybrid/state_dict_adapter.py, docs/hf.md).

Before anything is read (`plan`), the checkpoint's model tensors and maps are compared with the
whole model's (built on the meta device, so every pipeline stage sees the same answer):

- a layer map that differs converts only with `checkpoint.initial_load_convert_layer_map = true`
  (else one line names that key); the model keeps its own map and a log line says which layers
  changed kind. Any other map (OELM's freeze map) must match. A map missing on one side counts as
  all zeros (a stock llama3 checkpoint has no linear layers, a non-OELM model freezes nothing);
- a linear-layer option tensor (OPTION_NAMES: wg, short_conv, q/k_log_scale, k_log_decay, out_norm) that the
  model has and the checkpoint lacks keeps its initial value, and a log line names them;
- any other tensor the model needs that the checkpoint lacks, a tensor of another shape, or a
  model tensor of the checkpoint the model has no place for (an option this model is built
  without, more layers) stops the run with one line naming it;
- a converted map or a fresh tensor needs `checkpoint.initial_load_model_only = true`: the
  optimizer state and step of another model do not carry over.

`launch check` (preflight) runs `plan_for` before any rank starts; the trainer (train.py) runs it
again inside the CheckpointManager's `dcp_load` (`install`), logs its lines on rank 0 and loads
everything but the converted maps and the fresh tensors through TorchTitan's own code.
"""

import os
from dataclasses import dataclass, field

import torch

from titan_linear.checkpoint import check_intact, checkpoint_folder, read_tensors
from titan_linear.models.hybrid.state_dict_adapter import OPTION_NAMES
from titan_linear.models.maps import CONVERT_KEY, full, MAPS, mismatch, same_map

SHAPE_KEYS = "check model.n_layers / dim / n_heads / n_kv_heads / vocab_size and the flavor"


@dataclass
class InitialLoad:
    """What an initial load does besides loading every tensor.

    Args:
        skip: model keys not read from the checkpoint (converted maps, fresh option tensors).
        notes: the lines to log, each starting "titan_linear: initial load from <path>".
    """

    skip: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def initial_dcp_path(job_config) -> str | None:
    """The DCP checkpoint TorchTitan's CheckpointManager.load would read as this run's initial load
    (its rule: checkpoint.enable, initial_load_path set, no checkpoint folder yet), else None."""
    ckpt = job_config.checkpoint
    if not ckpt.enable or not ckpt.initial_load_path or ckpt.initial_load_in_hf:
        return None
    if os.path.exists(checkpoint_folder(job_config)):
        return None
    return ckpt.initial_load_path


def model_tensors(model_cls, model_args) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """(name -> shape of every tensor of the whole model's state dict, its maps), from a model
    built on the meta device (no memory, no init)."""
    import logging

    logging.disable(logging.INFO)  # the build's own summary lines: the real model logged them
    try:
        with torch.device("meta"):
            model = model_cls(model_args)
    finally:
        logging.disable(logging.NOTSET)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    maps = model_args.checkpoint_maps() if hasattr(model_args, "checkpoint_maps") else {}
    return shapes, maps


def _is_option(key: str) -> bool:
    parts = key.split(".", 2)
    return len(parts) == 3 and parts[0] == "layers" and parts[2] in OPTION_NAMES


def _by_suffix(keys: list[str]) -> str:
    """Keys "layers.N.<suffix>" grouped as: attention.wg.weight (layers 1,3,5), ..."""
    layers: dict[str, list[str]] = {}
    for key in keys:
        _, n, suffix = key.split(".", 2)
        layers.setdefault(suffix, []).append(n)
    return ", ".join(f"{s} (layer{'s' if len(n) > 1 else ''} {','.join(n)})" for s, n in layers.items())


def plan(path: str, own: dict[str, tuple[int, ...]], own_maps: dict[str, torch.Tensor], *,
         convert: bool, model_only: bool) -> InitialLoad:
    """Compare the DCP checkpoint at `path` with a model of tensors `own` (name -> shape) and maps
    `own_maps`; return what the load skips and logs. Raises ValueError (CheckpointError for a
    damaged checkpoint) in one line naming the tensor, the map or the key to set."""
    import torch.distributed.checkpoint as dcp

    where = f"checkpoint.initial_load_path = {path!r}"
    check_intact(path, "checkpoint.initial_load_path")
    # The checkpoint's model tensors: those under the model's top-level names (not optimizer.*, ...).
    roots = {k.split(".", 1)[0] for k in own} | set(MAPS)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {k: tuple(m.size) for k, m in metadata.items() if hasattr(m, "size") and k.split(".", 1)[0] in roots}
    out = InitialLoad()
    source = f"titan_linear: initial load from {path}"

    theirs_maps = read_tensors(path, [k for k in MAPS if k in saved])
    changed = False  # a converted map or a fresh tensor: the checkpoint's model was another one
    for key, spec in MAPS.items():
        if key not in theirs_maps and key not in own_maps:
            continue
        if key not in theirs_maps:
            out.skip.add(key)  # nothing to read: the model keeps its own
        mine = full(own_maps[key]) if key in own_maps else torch.zeros_like(theirs_maps[key])
        theirs = theirs_maps[key] if key in theirs_maps else torch.zeros_like(mine)
        if same_map(theirs, mine):
            continue
        if spec.convert is None or theirs.shape != mine.shape:
            fix = ("model.n_layers and the flavor" if theirs.shape != mine.shape else spec.keys if key in own_maps
                   else f"model.name (this model has no {spec.what})")
            raise ValueError(f"{where} is not allowed: {mismatch(key, theirs, mine)}; use the same {fix}")
        if not convert:
            raise ValueError(f"{where} is not allowed: {mismatch(key, theirs, mine)}; set {CONVERT_KEY} = true "
                             f"to start this model from it, or use the same {spec.keys}")
        out.skip.add(key)
        changed = True
        out.notes.append(f"{source}: {spec.what} {spec.render(theirs)} -> {spec.render(mine)} "
                         f"({spec.convert(theirs, mine)})")

    fresh, missing = [], []
    for key, shape in own.items():
        if key in MAPS:
            continue
        if key not in saved:
            (fresh if _is_option(key) else missing).append(key)
        elif saved[key] != shape:
            raise ValueError(f"{where} is not allowed: {key} is {saved[key]} there and {shape} in this model "
                             f"({SHAPE_KEYS})")
    if missing:
        raise ValueError(f"{where} is not allowed: it has no tensor {missing[0]!r} {own[missing[0]]} "
                         f"({len(missing)} such; {SHAPE_KEYS})")
    extra = sorted(k for k in saved if k not in own and k not in MAPS)
    if extra:
        why = (f"{len(extra)} such: {_by_suffix(extra)}; build this model with the same model.linear_attn_* "
               "options, linear on those layers" if all(map(_is_option, extra)) else f"{len(extra)} such; {SHAPE_KEYS}")
        raise ValueError(f"{where} is not allowed: this model has no place for its tensor {extra[0]!r} "
                         f"{saved[extra[0]]} ({why})")
    if fresh:
        out.skip.update(fresh)
        changed = True
        out.notes.append(f"{source}: it has no {_by_suffix(fresh)}: these linear-layer option tensors keep "
                         "their initial values")
    if changed and not model_only:
        raise ValueError(f"checkpoint.initial_load_model_only = false is not allowed with {where}: this model "
                         "differs from the checkpoint's (layer map or option tensors) and another model's "
                         "optimizer state and step do not carry over; set it true")
    return out


def plan_for(path: str, job_config, model_cls, model_args) -> InitialLoad:
    """`plan` for this run's model (built on meta from `model_cls`, `model_args`) and its
    checkpoint keys: what `launch check` and the trainer both run."""
    own, own_maps = model_tensors(model_cls, model_args)
    ckpt = job_config.checkpoint
    return plan(path, own, own_maps, convert=getattr(ckpt, "initial_load_convert_layer_map", False),
                model_only=ckpt.initial_load_model_only)


def install(manager, job_config, model_cls, model_args) -> None:
    """Make TorchTitan's `manager` (a CheckpointManager) check its initial DCP load with `plan`,
    log the plan's notes on rank 0 and load everything but the plan's `skip`; resumes, HF loads
    and the rest go through unchanged."""
    import torch.distributed as dist
    from torchtitan.tools.logging import logger

    load = manager.dcp_load

    def dcp_load(state_dict, checkpoint_id, from_hf, from_quantized):
        if not from_hf and checkpoint_id == initial_dcp_path(job_config):
            todo = plan_for(checkpoint_id, job_config, model_cls, model_args)
            if not dist.is_initialized() or dist.get_rank() == 0:
                for note in todo.notes:
                    logger.info(note)
            state_dict = {k: v for k, v in state_dict.items() if k not in todo.skip}
        return load(state_dict, checkpoint_id=checkpoint_id, from_hf=from_hf, from_quantized=from_quantized)

    manager.dcp_load = dcp_load
