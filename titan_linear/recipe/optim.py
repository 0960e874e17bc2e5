"""AdamW with no weight decay on biases and norm weights, in TorchTitan's OptimizersContainer.

TorchTitan's container builds one optimizer per model part over the parameters with
`requires_grad` (so frozen weights never get optimizer state) in a single group.
`GroupedOptimizersContainer` builds the same optimizers with two groups, decay and
no-decay, and keeps the container's checkpointing (flattened, resharding-friendly
state dicts carry each parameter's group settings).
"""

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torchtitan.components.optimizer import build_optimizers, OptimizersContainer
from torchtitan.tools.logging import logger


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm weights (every parameter of fewer than 2 dims in llama3) get no decay."""
    module = name.rpartition(".")[0].rpartition(".")[2]  # "layers.0.ffn_norm.weight" -> "ffn_norm"
    return param.ndim < 2 or name.endswith(".bias") or "norm" in module


class GroupedOptimizersContainer(OptimizersContainer):
    """OptimizersContainer whose optimizers hold a decay group and a weight_decay=0 group."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type, optimizer_kwargs: dict[str, Any]):
        all_params = []
        self.optimizers = []
        self.model_parts = model_parts
        for model in model_parts:
            decay, plain = [], []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    (plain if no_decay(name, p) else decay).append(p)
            groups = [{"params": decay}, {"params": plain, "weight_decay": 0.0}]
            self.optimizers.append(optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs))
            all_params.extend(decay + plain)
            logger.info(
                f"titan_linear optimizer groups: {sum(p.numel() for p in decay):,} params with weight decay "
                f"{optimizer_kwargs['weight_decay']}, {sum(p.numel() for p in plain):,} (biases, norms) without"
            )
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)


_CLASSES = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def check_optimizer_config(job_config) -> None:
    """Raise ValueError when `optimizer.no_decay_bias_and_norm` cannot be honoured.

    The groups need the plain container: TorchTitan's early_step_in_backward and TorchFT
    build their own, which would drop the groups silently.
    """
    cfg = job_config.optimizer
    if not cfg.no_decay_bias_and_norm:
        return
    for key, on in (("optimizer.early_step_in_backward", cfg.early_step_in_backward),
                    ("fault_tolerance.enable", job_config.fault_tolerance.enable)):
        if on:
            raise ValueError(
                f"optimizer.no_decay_bias_and_norm = True is not allowed with {key} = True "
                "(it builds its own optimizers without groups): set it to false"
            )
    if cfg.name not in _CLASSES:
        raise ValueError(
            f"optimizer.name = {cfg.name!r} is not allowed with optimizer.no_decay_bias_and_norm = True: "
            f"one of {', '.join(_CLASSES)} (or set no_decay_bias_and_norm = false)"
        )


def build_grouped_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None) -> OptimizersContainer:
    """TorchTitan's build_optimizers, with decay/no-decay groups when
    `optimizer.no_decay_bias_and_norm` (default true)."""
    # getattr: a config parsed without titan_linear.config lacks the key (its default is true)
    if not getattr(optimizer_config, "no_decay_bias_and_norm", True):
        return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    if optimizer_config.name not in _CLASSES:
        raise ValueError(
            f"optimizer.name = {optimizer_config.name!r} is not allowed with optimizer.no_decay_bias_and_norm "
            f"= True: one of {', '.join(_CLASSES)} (or set no_decay_bias_and_norm = false)"
        )
    impl = optimizer_config.implementation
    kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        "fused": impl == "fused",
        "foreach": impl == "foreach",
    }
    return GroupedOptimizersContainer(model_parts, _CLASSES[optimizer_config.name], kwargs)


def optimizer_state_params(optimizer: Optimizer) -> set[int]:
    """ids of the parameters that have optimizer state (for tests and checks)."""
    return {id(p) for p in optimizer.state}
