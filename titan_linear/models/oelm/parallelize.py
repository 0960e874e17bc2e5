"""Parallelize hook of the OELM model: the hybrid's, then the start-up parameter report.

Training calls this hook once, after the model is built and before its weights are
materialised (and `launch check` never does), so the report is logged and written
to `<dump_folder>/param_report.md|json` by rank 0 exactly when a run starts.
The freeze is checked to have survived parallelization (FSDP2 keeps `requires_grad`
on its sharded parameters, and keeps no gradient for the frozen ones).
"""

import torch.distributed as dist
import torch.nn as nn
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from titan_linear.models.hybrid.parallelize import parallelize_hybrid

from .report import parameter_report, report_markdown, write_parameter_report


def parallelize_oelm(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    frozen = set(model.frozen_param_names())
    model = parallelize_hybrid(model, parallel_dims, job_config)
    for name, p in model.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        assert p.requires_grad == (clean not in frozen), f"{name}: requires_grad {p.requires_grad} after parallelize"
    report = parameter_report(model)
    title = f"Parameters of {job_config.model.name} {job_config.model.flavor}"
    logger.info("titan_linear parameter report\n" + report_markdown(report, title))
    if not dist.is_initialized() or dist.get_rank() == 0:
        md, _ = write_parameter_report(report, job_config.job.dump_folder, title)
        logger.info(f"titan_linear parameter report written to {md}")
    return model
