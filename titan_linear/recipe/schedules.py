"""LR schedules that TorchTitan lacks, as multiplicative factors of optimizer.lr on its container.

`[lr_scheduler] schedule` picks the curve; every schedule uses TorchTitan's own
`warmup_steps`, `total_steps` (else training.steps) and floor `min_lr_factor`:
- `torchtitan` (default): TorchTitan's warmup-stable-decay, whose `decay_type`
  (linear, sqrt, cosine) and `decay_ratio` give the plain cosine and WSD curves;
- `cosine_restarts`: warmup, then cosine cycles of `restart_interval` steps;
- `polynomial`: warmup, then (1 - progress) ** `power` down to the floor.

Step s counts scheduler steps from 0 (the first training step uses s = 0), W is the
warmup, T the total, m the floor:
- warmup (s < W): (s + 1) / W, as TorchTitan's;
- cosine_restarts:  m + (1 - m) * 0.5 * (1 + cos(pi * c)),  c = ((s - W) mod R) / R,
                    R = `restart_interval` (0: T - W, one cycle);
- polynomial:       m + (1 - m) * (1 - p) ** power,  p = min(1, (s - W) / (T - W)).

Deprecated spellings still read, each with one warning line at start-up:
`schedule = "cosine"` is TorchTitan's `decay_type = "cosine"` (the same curve, its
progress counted one step later), and `min_lr_ratio` is `min_lr_factor`.
"""

import functools
import math

from torchtitan.components.lr_scheduler import build_lr_schedulers, LRSchedulersContainer
from torchtitan.tools.logging import logger

from titan_linear.config_errors import bad_value, is_int, is_number

SCHEDULES = ("torchtitan", "cosine_restarts", "polynomial")
DEPRECATED_SCHEDULES = ("cosine",)


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
    if schedule == "polynomial":
        p = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * (1 - p) ** power
    raise bad_value("lr_scheduler.schedule", schedule, f"one of {', '.join(SCHEDULES)}")


def check_schedule_config(cfg) -> list[str]:
    """Check the [lr_scheduler] keys; apply the deprecated spellings; return deprecation lines.

    Raises ValueError naming the key for a bad value, or for a key that the chosen
    schedule would not use (never silently ignored).
    """
    notes = []
    for key, default in (("schedule", "torchtitan"), ("min_lr_ratio", None), ("restart_interval", None),
                         ("power", None)):
        if not hasattr(cfg, key):  # a config parsed without titan_linear.config
            setattr(cfg, key, default)
    schedule = cfg.schedule
    if schedule not in SCHEDULES + DEPRECATED_SCHEDULES:
        raise bad_value("lr_scheduler.schedule", schedule, f"one of {', '.join(SCHEDULES)}")
    if cfg.min_lr_ratio is not None:
        notes.append(
            f"titan_linear: lr_scheduler.min_lr_ratio is deprecated: use TorchTitan's "
            f"lr_scheduler.min_lr_factor (set to {cfg.min_lr_ratio!r} for this run)"
        )
        cfg.min_lr_factor, cfg.min_lr_ratio = cfg.min_lr_ratio, None
    if schedule == "cosine":
        if cfg.decay_type not in ("linear", "cosine"):
            raise bad_value("lr_scheduler.decay_type", cfg.decay_type,
                            "unset with the deprecated lr_scheduler.schedule = 'cosine', which sets it to 'cosine'")
        notes.append(
            "titan_linear: lr_scheduler.schedule = 'cosine' is deprecated: use TorchTitan's "
            "lr_scheduler.decay_type = 'cosine' with min_lr_factor (used for this run)"
        )
        cfg.schedule, cfg.decay_type = "torchtitan", "cosine"
        schedule = "torchtitan"
    m = cfg.min_lr_factor
    if not is_number(m) or not 0.0 <= m <= 1.0:
        raise bad_value("lr_scheduler.min_lr_factor", m, "a number in [0, 1]")
    if not is_int(cfg.warmup_steps) or cfg.warmup_steps < 0:
        raise bad_value("lr_scheduler.warmup_steps", cfg.warmup_steps, "an integer >= 0")
    # Keys of one schedule each: refused unless that schedule is chosen.
    for key, owner, valid, allowed in (
        ("restart_interval", "cosine_restarts", lambda v: is_int(v) and v >= 0, "steps >= 0 (0: one cycle)"),
        ("power", "polynomial", lambda v: is_number(v) and v > 0, "a number > 0"),
    ):
        value = getattr(cfg, key)
        if value is None:
            continue
        if schedule != owner:
            raise bad_value(f"lr_scheduler.{key}", value,
                            f"unset unless lr_scheduler.schedule = {owner!r} (it is {schedule!r})")
        if not valid(value):
            raise bad_value(f"lr_scheduler.{key}", value, allowed)
    if schedule != "torchtitan":
        # TorchTitan's own decay keys shape only its own schedule.
        if cfg.decay_ratio is not None:
            raise bad_value("lr_scheduler.decay_ratio", cfg.decay_ratio,
                            f"unset with lr_scheduler.schedule = {schedule!r} (it shapes only 'torchtitan')")
        if cfg.decay_type != "linear":
            raise bad_value("lr_scheduler.decay_type", cfg.decay_type,
                            f"unset with lr_scheduler.schedule = {schedule!r} (it shapes only 'torchtitan')")
    return notes


def build_recipe_lr_schedulers(optimizers, lr_scheduler_config, training_steps: int) -> LRSchedulersContainer:
    """TorchTitan's build_lr_schedulers, or one of the schedules above (LambdaLR in the same container)."""
    for note in check_schedule_config(lr_scheduler_config):
        logger.warning(note)
    cfg = lr_scheduler_config
    total = cfg.total_steps or training_steps
    if cfg.warmup_steps > total:
        # TorchTitan would warn and clamp; a short run clamps without the noise.
        logger.info(f"titan_linear: lr_scheduler.warmup_steps {cfg.warmup_steps} > {total} steps: warmup over all {total}")
        cfg.warmup_steps = total
    if cfg.schedule == "torchtitan":
        return build_lr_schedulers(optimizers, cfg, training_steps)
    factor = functools.partial(
        schedule_factor, schedule=cfg.schedule, warmup=int(cfg.warmup_steps), total=total,
        min_ratio=cfg.min_lr_factor, restart_interval=cfg.restart_interval or 0,
        power=1.0 if cfg.power is None else cfg.power,
    )
    return LRSchedulersContainer(optimizers, factor)
