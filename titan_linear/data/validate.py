"""torchtitan's Validator, reading `[validation]` through titan_linear's dataloader.

torchtitan 0.2.2's `Validator.__init__` calls its own
`build_text_validation_dataloader`, which cannot be swapped for another
builder. That loader reads every text dataset registered by
`titan_linear.data.sources`, but not `tokens`, and it goes on from where the
previous validation stopped, so two validations score different batches.
This subclass keeps torchtitan's `validate()` and builds its dataloader with
`build_validation_dataloader`: every dataset name works and every validation
reads the same batches. Give `build_validator` to the TrainSpec.
"""

from contextlib import AbstractContextManager

from torch.distributed.pipelining.schedules import _PipelineSchedule
from torchtitan.components import validate
from torchtitan.components.loss import LossFunction
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from titan_linear.data.dataloader import build_validation_dataloader


class Validator(validate.Validator):
    """torchtitan's Validator whose dataloader comes from `build_validation_dataloader`.

    Args: those of `torchtitan.components.validate.Validator`.
    """

    def __init__(
        self,
        job_config: JobConfig,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        parallel_dims: ParallelDims,
        loss_fn: LossFunction,
        validation_context: validate.ValidationContext,
        maybe_enable_amp: AbstractContextManager[None],
        metrics_processor: MetricsProcessor,
        pp_schedule: _PipelineSchedule | None = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
    ):
        # The fields torchtitan's __init__ sets, without building its own dataloader.
        validate.BaseValidator.__init__(self, job_config)
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size=dp_world_size,
            dp_rank=dp_rank,
            tokenizer=tokenizer,
            job_config=job_config,
            infinite=job_config.validation.steps != -1,
        )
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        if job_config.validation.steps == -1:
            logger.warning(
                "validation.steps = -1 reads the whole validation set; ranks that "
                "hold different numbers of batches can hang"
            )


def build_validator(
    job_config: JobConfig,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    parallel_dims: ParallelDims,
    loss_fn: LossFunction,
    validation_context: validate.ValidationContext,
    maybe_enable_amp: AbstractContextManager[None],
    metrics_processor: MetricsProcessor | None = None,
    pp_schedule: _PipelineSchedule | None = None,
    pp_has_first_stage: bool | None = None,
    pp_has_last_stage: bool | None = None,
) -> Validator:
    """A Validator on titan_linear's validation dataloader.

    Same signature as torchtitan's `build_validator`, for `TrainSpec.build_validator_fn`.
    """
    assert metrics_processor is not None, "the Trainer passes its metrics processor"
    return Validator(
        job_config=job_config,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        tokenizer=tokenizer,
        parallel_dims=parallel_dims,
        loss_fn=loss_fn,
        validation_context=validation_context,
        maybe_enable_amp=maybe_enable_amp,
        metrics_processor=metrics_processor,
        pp_schedule=pp_schedule,
        pp_has_first_stage=pp_has_first_stage,
        pp_has_last_stage=pp_has_last_stage,
    )
