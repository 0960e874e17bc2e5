"""The training process of one rank: `python -m titan_linear.train [torchtitan args]`.

`run_train.sh` starts one per rank through torchrun (via `titan_linear.launch run`),
as `python -m torchtitan.train` would be: this module calls TorchTitan's own
`torchtitan.train.main` with `Trainer`, TorchTitan's Trainer plus the recipe's
run safety (recipe/monitor.py):
- a NaN/Inf loss or gradient norm stops the step before the optimizer step;
- no checkpoint of non-finite weights is written;
- the initial load of a DCP checkpoint (`checkpoint.initial_load_path`) is checked against the
  model first, and may start another layer map from it (initial_load.py);
- a failure that is the user's to fix (a bad setting, data, a damaged checkpoint, a
  non-finite value) ends the rank with one line on stderr, in torchelastic's error
  file for the launcher to show, and exit status 1, instead of a traceback; anything
  else keeps its traceback.
The rank also dies with its launcher (Linux parent-death signal), so killing the
launcher, even with SIGKILL, never leaves a rank training on.
"""

import ctypes
import json
import os
import signal
import sys
import time

from torchtitan.train import main as torchtitan_main
from torchtitan.train import Trainer as TorchTitanTrainer

from titan_linear.checkpoint import checkpoint_folder, CheckpointError, complete_steps, step_folders
from titan_linear.config_errors import first_line
from titan_linear.initial_load import install as check_initial_load
from titan_linear.recipe.monitor import (
    check_finite_loss, check_finite_weights, checked_grad_norm, nonfinite_message, NonFiniteError,
)

# Failures a user fixes by changing the config, the data or the checkpoint.
USER_ERRORS = (ValueError, NonFiniteError, CheckpointError, FileNotFoundError)


class Trainer(TorchTitanTrainer):
    """TorchTitan's Trainer that never steps or saves on non-finite values, and checks (and may
    convert the layer map of) its initial DCP load."""

    def __init__(self, job_config):
        super().__init__(job_config)
        check_initial_load(self.checkpointer, job_config, self.train_spec.model_cls, self.model_args)
        save = self.checkpointer.save

        def finite_save(curr_step: int, last_step: bool = False):
            # _should_save is the checkpointer's own rule (interval, last step, first step).
            if self.checkpointer._should_save(curr_step, last_step):
                try:
                    check_finite_weights(self.model_parts, curr_step)
                except NonFiniteError as e:
                    raise NonFiniteError(nonfinite_message(e, curr_step, self._latest_on_disk())) from None
            return save(curr_step, last_step=last_step)

        self.checkpointer.save = finite_save

    def forward_backward_step(self, *args, **kwargs):
        loss = super().forward_backward_step(*args, **kwargs)
        if self.job_config.monitor.stop_on_nonfinite:
            check_finite_loss(loss)
        return loss

    def train_step(self, data_iterator):
        try:
            with checked_grad_norm(self.job_config.monitor.stop_on_nonfinite):
                return super().train_step(data_iterator)
        except NonFiniteError as e:
            raise NonFiniteError(nonfinite_message(e, self.step, self._latest_on_disk())) from None

    def _latest_on_disk(self) -> int | None:
        """The newest checkpoint whose save finished (None: none), for the stop message."""
        if not self.job_config.checkpoint.enable:
            return None
        done = complete_steps(step_folders(checkpoint_folder(self.job_config)))
        return done[-1] if done else None


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the launcher) dies."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def one_line(e: BaseException) -> str:
    line = first_line(e)
    return line if line.startswith("titan_linear:") else f"titan_linear: error: {line}"


def report_error(line: str) -> None:
    """Print `line` and leave it in torchelastic's error file, where the launcher reads it."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)


def main() -> int:
    die_with_parent()
    try:
        torchtitan_main(Trainer)
    except USER_ERRORS as e:
        report_error(one_line(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
