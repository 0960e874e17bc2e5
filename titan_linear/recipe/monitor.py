"""Run monitoring of seed 000 §7.1 through TorchTitan's TrainSpec hooks.

- NaN/Inf loss: the loss function from the TrainSpec is wrapped; a non-finite loss
  raises FloatingPointError in the forward of the step, before backward and the
  optimizer step, so the weights stay as they were and no checkpoint of a broken
  state is written: the last saved checkpoint is the last good one. torchrun then
  stops the other ranks. (One host sync per micro-batch; `monitor.stop_on_nonfinite_loss
  = false` turns it off.)
- Gradient-norm spikes: the metrics processor's `log` gets the pre-clip gradient norm
  of every logged step (`metrics.log_freq`; 1 checks every step); one above
  `monitor.grad_norm_warn` is logged as a warning.
"""

import math

import torch
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops before the optimizer step."""


def build_checked_loss_fn(build_loss_fn):
    """Wrap a TrainSpec `build_loss_fn` so that its loss function refuses a non-finite loss."""

    def build(job_config, **kwargs):
        loss_fn = build_loss_fn(job_config, **kwargs)
        if not getattr(job_config.monitor, "stop_on_nonfinite_loss", True):
            return loss_fn
        calls = {"n": 0}

        def checked(pred, labels):
            loss = loss_fn(pred, labels)
            calls["n"] += 1
            if not bool(torch.isfinite(loss.detach()).all()):
                value = loss.detach().float().sum().item()
                raise NonFiniteLossError(
                    f"titan_linear: non-finite loss ({value}) in loss call {calls['n']}: stopping the run "
                    "before the optimizer step; the last saved checkpoint is the last good state "
                    "(lower optimizer.lr, raise lr_scheduler.warmup_steps or check the data)"
                )
            return loss

        return checked

    return build


class MonitoredMetricsProcessor(MetricsProcessor):
    """TorchTitan's metrics processor plus a warning on gradient-norm spikes."""

    grad_norm_warn: float = 100.0

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        if not math.isfinite(grad_norm) or grad_norm > self.grad_norm_warn:
            logger.warning(
                f"titan_linear: gradient norm spike at step {step}: grad_norm {grad_norm:.4g} > "
                f"monitor.grad_norm_warn = {self.grad_norm_warn:g} (loss {global_avg_loss:.4f})"
            )
        return super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)


def build_monitored_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    # torchtitan's build_metrics_processor is this constructor call, with our class
    proc = MonitoredMetricsProcessor(job_config, parallel_dims, tag)
    proc.grad_norm_warn = float(getattr(job_config.monitor, "grad_norm_warn", 100.0))
    return proc
