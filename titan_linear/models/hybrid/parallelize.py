"""Parallelize hook of the hybrid model: torchtitan's llama3 one, plus what the CPU needs.

The hybrid keeps llama3's module names, so torchtitan's `parallelize_llama`
(tensor parallel, activation checkpointing, per-block compile, FSDP2/HSDP, DDP,
float8 through model converters) applies unchanged. Context parallel is refused
earlier, in `HybridModelArgs.update_from_config` (args.py), which TorchTitan's
Trainer and `launch check` run before this hook. Added here: on a CPU-only
machine, FSDP reduce-scatters use a plain sum: gloo has no PREMUL_SUM, and
torchtitan already sets the divide factor to 1, so the maths is the same.
"""

import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.infra.parallelize import parallelize_llama

from titan_linear.infra.device import is_cpu_run


def parallelize_hybrid(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    model = parallelize_llama(model, parallel_dims, job_config)
    if is_cpu_run():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model
