"""Parallelize hook of the hybrid model: torchtitan's llama3 one, plus what the CPU needs.

The hybrid keeps llama3's module names, so torchtitan's `parallelize_llama`
(tensor parallel, activation checkpointing, per-block compile, FSDP2/HSDP, DDP,
float8 through model converters) applies unchanged. Context parallel is refused
earlier, in `HybridModelArgs.update_from_config` (args.py), which TorchTitan's
Trainer and `launch check` run before this hook. Added here: on a CPU-only
machine, FSDP reduce-scatters use a plain sum: gloo has no PREMUL_SUM, and
torchtitan already sets the divide factor to 1, so the maths is the same.

DDP sums gradients over replicas here (a comm hook), as FSDP does. TorchTitan 0.2.2 divides
each step's loss by the global number of tokens and so turns FSDP's gradient division off
(`set_gradient_divide_factor(1.0)`), but its `apply_ddp` keeps DDP's default hook, which
divides by the number of replicas: gradients (and the clipped norm) came out 1/dp of FSDP's,
and a checkpoint saved under FSDP continued differently under DDP (the integration matrix's
`ckpt_fsdp2_to_ddp2`).

Tensor parallel of the linear layers' options (`shard_linear_options`, applied before
llama3's plan): W_g (output gate) is colwise like wq, so each rank gates its own heads; the
per-head parameters (learned temperatures, the output norm's weight, the short convolution's
kernels; linear_options.HEAD_SHARDED) are DTensors sharded along dim 0, whose rows are heads or
head-major channels, i.e. split exactly as wq/wk/wv split the heads. Sharding them, rather than
replicating them, keeps each rank's gradient its own (a replicated weight used by different
heads on each rank would need its gradient summed over the TP group). FSDP then shards them
further like any parameter; DCP saves them as the DTensors they are.
"""

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import distribute_tensor, DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.infra.parallelize import parallelize_llama

from titan_linear.infra.device import is_cpu_run

from .linear_options import HEAD_SHARDED
from .model import LinearAttention


def shard_linear_options(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard the options' weights of every linear layer with its heads (module docstring)."""
    for block in model.layers.values():
        attn = block.attention
        if not isinstance(attn, LinearAttention):
            continue
        if attn.wg is not None:
            parallelize_module(attn, tp_mesh, {"wg": ColwiseParallel()})
        for name in HEAD_SHARDED:
            owner_name, _, pname = name.rpartition(".")
            owner = getattr(attn, owner_name, None) if owner_name else attn
            param = getattr(owner, pname, None) if owner is not None else None
            if param is None or isinstance(param, DTensor):
                continue
            # Every rank holds the same full tensor (same seed, or meta): keep the own shard, no traffic.
            shard = distribute_tensor(param.data, tp_mesh, [Shard(0)], src_data_rank=None)
            owner.register_parameter(pname, nn.Parameter(shard, requires_grad=param.requires_grad))


def allreduce_sum_hook(process_group, bucket):
    """DDP comm hook: sum a gradient bucket over the replicas, without DDP's division."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def parallelize_hybrid(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    if parallel_dims.tp_enabled:
        shard_linear_options(model, parallel_dims.get_mesh("tp"))
    model = parallelize_llama(model, parallel_dims, job_config)
    if parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled:
        # parallelize_llama applied DDP (composable `replicate`): queue the hook for its lazy init.
        model.register_comm_hook(None, allreduce_sum_hook)
    if is_cpu_run():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model
