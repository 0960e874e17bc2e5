"""Run monitoring through TorchTitan's hooks: non-finite stops, gradient-norm spikes, progress.

- A NaN/Inf loss: `check_finite_loss` on each micro-batch's loss, after its backward
  and before the optimizer step. (Not inside the loss function: pipeline parallel
  calls that on uninitialised tensors to infer shapes.)
- A NaN/Inf gradient norm (the loss can be finite while a gradient overflows):
  `checked_grad_norm` wraps TorchTitan's `clip_grad_norm_` for the duration of one
  train step and raises after the norm is computed and before the optimizer steps.
  The norm is the global one (all ranks agree), so every rank stops at the same step.
- Before a checkpoint is written, `check_finite_weights` refuses to save weights with a
  NaN/Inf (all ranks agree through one all-reduce), so no checkpoint on disk is ever
  non-finite and the last one is the last good state.
- Gradient-norm spikes: the metrics processor warns when the pre-clip norm of a logged
  step exceeds `monitor.grad_norm_warn`, and adds a progress line (step N/total, ETA).

`monitor.stop_on_nonfinite = false` turns the stops off (the checkpoint check stays).
Each check costs one host sync per step (per micro-batch for the loss). The stops live
in titan_linear's Trainer (titan_linear/train.py), which `run_train.sh` runs.
"""

import contextlib
import math
import time

import torch
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from titan_linear.config_errors import bad_value, checked_bool, is_number

_HINT = "lower optimizer.lr, raise lr_scheduler.warmup_steps or training.max_norm, or check the data"


class NonFiniteError(FloatingPointError):
    """The loss, the gradient norm or the weights became NaN or Inf; the run stops."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or Inf; the run stops before backward and the optimizer step."""


def check_monitor_config(cfg) -> list[str]:
    """Check the [monitor] keys; apply the deprecated spelling; return deprecation lines."""
    notes = []
    checked_bool("monitor.stop_on_nonfinite", cfg.stop_on_nonfinite)
    if cfg.stop_on_nonfinite_loss is not None:
        checked_bool("monitor.stop_on_nonfinite_loss", cfg.stop_on_nonfinite_loss)
        notes.append("titan_linear: monitor.stop_on_nonfinite_loss is deprecated: use monitor.stop_on_nonfinite "
                     f"(set to {cfg.stop_on_nonfinite_loss} for this run)")
        cfg.stop_on_nonfinite, cfg.stop_on_nonfinite_loss = cfg.stop_on_nonfinite_loss, None
    warn = cfg.grad_norm_warn
    if not is_number(warn) or not warn > 0:
        raise bad_value("monitor.grad_norm_warn", warn, "a number > 0")
    return notes


def check_finite_loss(loss: torch.Tensor) -> None:
    """Raise NonFiniteLossError when a micro-batch's loss is NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(f"non-finite loss ({loss.detach().float().sum().item()})")


@contextlib.contextmanager
def checked_grad_norm(enabled: bool = True):
    """Within the block, TorchTitan's train step raises NonFiniteError on a NaN/Inf gradient
    norm right after computing it, before the optimizer step."""
    import torchtitan.train as tt_train

    if not enabled:
        yield
        return
    dist_utils = tt_train.dist_utils
    clip = dist_utils.clip_grad_norm_

    def checked(*args, **kwargs):
        norm = clip(*args, **kwargs)
        value = float(norm.detach().float().full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(value):
            raise NonFiniteError(f"non-finite gradient norm ({value})")
        return norm

    dist_utils.clip_grad_norm_ = checked
    try:
        yield
    finally:
        dist_utils.clip_grad_norm_ = clip


def check_finite_weights(model_parts, step: int) -> None:
    """Raise NonFiniteError naming a tensor when any parameter or buffer holds NaN/Inf.

    Every rank checks its own shards; one all-reduce makes all ranks agree.
    """
    names, finite = [], []
    for part in model_parts:
        for name, t in [*part.named_parameters(), *part.named_buffers()]:
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.is_floating_point() and local.numel():
                names.append(name)
                finite.append(torch.isfinite(local.detach()).all())
    # One host sync for all tensors (on a GPU each bool() would be one).
    ok = torch.stack(finite).tolist() if finite else []
    bad = next((n for n, good in zip(names, ok) if not good), None)
    if bad:
        bad = bad.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    flag = torch.tensor([1.0 if bad else 0.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        where = f" ({bad})" if bad else " (on another rank)"
        raise NonFiniteError(f"non-finite weights{where} after step {step}: checkpoint not written")


def nonfinite_message(e: NonFiniteError, step: int, last_ckpt: int | None) -> str:
    """The one line a user sees when a run stops on a non-finite value."""
    saved = (f"the last checkpoint on disk (step-{last_ckpt}) is finite" if last_ckpt is not None
             else "no checkpoint was written")
    return (f"titan_linear: {e} at step {step}: the run stopped before the optimizer step; "
            f"{saved} ({_HINT})")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MonitoredMetricsProcessor(MetricsProcessor):
    """TorchTitan's metrics processor plus a gradient-norm spike warning and a progress line."""

    grad_norm_warn: float = 100.0
    total_steps: int = 0
    _start: tuple[int, float] | None = None

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        if not math.isfinite(grad_norm) or grad_norm > self.grad_norm_warn:
            logger.warning(
                f"titan_linear: gradient norm spike at step {step}: grad_norm {grad_norm:.4g} > "
                f"monitor.grad_norm_warn = {self.grad_norm_warn:g} (loss {global_avg_loss:.4f})"
            )
        out = super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)
        now = time.perf_counter()
        if self._start is None:
            # Measured from the first logged step on, so start-up and compilation are left out.
            self._start = (step, now)
        total = self.total_steps
        done, began = self._start
        if total and step > done:
            eta = (now - began) / (step - done) * (total - step)
            logger.info(f"titan_linear progress: step {step}/{total} ({100 * step / total:.0f} %), ETA {_clock(eta)}")
        elif total:
            logger.info(f"titan_linear progress: step {step}/{total} ({100 * step / total:.0f} %)")
        return out


def build_monitored_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    # torchtitan's build_metrics_processor is this constructor call, with our class
    proc = MonitoredMetricsProcessor(job_config, parallel_dims, tag)
    proc.grad_norm_warn = float(job_config.monitor.grad_norm_warn)
    proc.total_steps = int(job_config.training.steps)
    return proc
