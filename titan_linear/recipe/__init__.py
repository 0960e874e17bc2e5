"""The training recipe, on TorchTitan's builders, for every train spec this package registers.

- AdamW / Adam with no weight decay on biases and norm weights (`optim.py`);
- LR schedules TorchTitan lacks, with its warmup and floor (`schedules.py`);
- run monitoring: a NaN/Inf loss or gradient norm stops the run before the optimizer
  step, no non-finite checkpoint is written (both in titan_linear/train.py's Trainer),
  gradient-norm spikes are logged, a progress line gives step N/total and the ETA
  (`monitor.py`).

`train_spec_builders` gives the TrainSpec fields that carry the recipe, so each model's
`get_train_spec()` takes them all; `check_recipe` checks every recipe key for every model,
so no key is silently ignored. docs/recipe.md describes the recipe.
"""

from .monitor import (
    build_monitored_metrics_processor, check_finite_loss, check_finite_weights, check_monitor_config,
    checked_grad_norm, NonFiniteError, NonFiniteLossError,
)
from .optim import build_grouped_optimizers, check_optimizer_config, GroupedOptimizersContainer, no_decay
from .schedules import build_recipe_lr_schedulers, check_schedule_config, SCHEDULES, schedule_factor


def train_spec_builders() -> dict:
    """The TrainSpec builder fields of the recipe (optimizers, schedules, metrics)."""
    return dict(
        build_optimizers_fn=build_grouped_optimizers,
        build_lr_schedulers_fn=build_recipe_lr_schedulers,
        build_metrics_processor_fn=build_monitored_metrics_processor,
    )


def check_recipe(job_config) -> list[str]:
    """Check every recipe key of `job_config` (any model); return deprecation lines to log.

    Raises ValueError naming the key, the value and what is allowed.
    """
    notes = check_schedule_config(job_config.lr_scheduler)
    notes += check_monitor_config(job_config.monitor)
    check_optimizer_config(job_config)
    return notes


__all__ = [
    "build_monitored_metrics_processor", "check_finite_loss", "build_grouped_optimizers",
    "check_finite_weights", "check_recipe", "checked_grad_norm", "GroupedOptimizersContainer",
    "no_decay", "NonFiniteError", "NonFiniteLossError", "build_recipe_lr_schedulers", "SCHEDULES",
    "schedule_factor", "train_spec_builders",
]
