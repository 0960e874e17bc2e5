"""The training recipe of seeds 000/004 on TorchTitan's builders: AdamW parameter groups,
LR schedules with floors and restarts, and run monitoring (grad-norm spikes, NaN/Inf loss)."""

from .monitor import build_checked_loss_fn, build_monitored_metrics_processor
from .optim import build_grouped_optimizers, GroupedOptimizersContainer, no_decay
from .schedules import build_recipe_lr_schedulers, SCHEDULES, schedule_factor

__all__ = [
    "build_checked_loss_fn", "build_monitored_metrics_processor", "build_grouped_optimizers",
    "GroupedOptimizersContainer", "no_decay", "build_recipe_lr_schedulers", "SCHEDULES", "schedule_factor",
]
