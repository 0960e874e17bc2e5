"""LR schedules of seed 000 §3 as multiplicative factors of optimizer.lr, on TorchTitan's container.

Step s counts scheduler steps from 0 (the first training step uses s = 0), W is
`lr_scheduler.warmup_steps`, T is `lr_scheduler.total_steps` (else training.steps),
m is `lr_scheduler.min_lr_ratio`:
- warmup (s < W), every schedule: (s + 1) / W, as TorchTitan's;
- cosine:           m + (1 - m) * 0.5 * (1 + cos(pi * p)),  p = min(1, (s - W) / (T - W));
- cosine_restarts:  m + (1 - m) * 0.5 * (1 + cos(pi * c)),  c = ((s - W) mod R) / R,
                    R = `restart_interval` (0: T - W, one cycle);
- polynomial:       m + (1 - m) * (1 - p) ** power.
`schedule = "torchtitan"` (the default) keeps TorchTitan's own warmup-stable-decay.
"""

import functools
import math

from torchtitan.components.lr_scheduler import build_lr_schedulers, LRSchedulersContainer

SCHEDULES = ("torchtitan", "cosine", "cosine_restarts", "polynomial")


def schedule_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float,
                    restart_interval: int = 0, power: float = 1.0) -> float:
    """The factor of optimizer.lr at scheduler step `step` (see the module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    if schedule == "cosine_restarts":
        period = restart_interval or span
        c = ((step - warmup) % period) / period
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * c))
    p = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "polynomial":
        return min_ratio + (1 - min_ratio) * (1 - p) ** power
    raise ValueError(f"lr_scheduler.schedule = {schedule!r} is not allowed: one of {', '.join(SCHEDULES)}")


def check_schedule_config(cfg, training_steps: int) -> None:
    """Raise ValueError naming the key on a bad [lr_scheduler] extension value."""
    schedule = getattr(cfg, "schedule", "torchtitan")
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_scheduler.schedule = {schedule!r} is not allowed: one of {', '.join(SCHEDULES)}")
    m = getattr(cfg, "min_lr_ratio", 0.0)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"lr_scheduler.min_lr_ratio = {m!r} is not allowed: a number in [0, 1]")
    r = getattr(cfg, "restart_interval", 0)
    if r < 0:
        raise ValueError(f"lr_scheduler.restart_interval = {r!r} is not allowed: steps >= 0 (0: one cycle)")
    pw = getattr(cfg, "power", 1.0)
    if not pw > 0:
        raise ValueError(f"lr_scheduler.power = {pw!r} is not allowed: a number > 0")


def build_recipe_lr_schedulers(optimizers, lr_scheduler_config, training_steps: int) -> LRSchedulersContainer:
    """TorchTitan's build_lr_schedulers, or one of the recipe schedules (LambdaLR in the same container)."""
    check_schedule_config(lr_scheduler_config, training_steps)
    schedule = getattr(lr_scheduler_config, "schedule", "torchtitan")
    if schedule == "torchtitan":
        return build_lr_schedulers(optimizers, lr_scheduler_config, training_steps)
    total = lr_scheduler_config.total_steps or training_steps
    warmup = min(int(lr_scheduler_config.warmup_steps), total)
    factor = functools.partial(
        schedule_factor, schedule=schedule, warmup=warmup, total=total,
        min_ratio=lr_scheduler_config.min_lr_ratio,
        restart_interval=lr_scheduler_config.restart_interval, power=lr_scheduler_config.power,
    )
    return LRSchedulersContainer(optimizers, factor)
