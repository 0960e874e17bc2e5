"""Run under torchrun (2 ranks, gloo): FSDP2 over an OELM model with frozen and trainable
weights in one block; records every reduce-scatter and writes one JSON file per rank,
OUT_DIR/rank<r>.json (argv[1]: the ranks share a stdout, where records could interleave)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

from titan_linear.models.oelm import oelm_args, OELMTransformer

sizes = []
_orig = coll.DefaultReduceScatter.__call__


def _record(self, output_tensor, input_tensor, *args, **kwargs):
    sizes.append(input_tensor.numel())
    return _orig(self, output_tensor, input_tensor, *args, **kwargs)


coll.DefaultReduceScatter.__call__ = _record


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args = oelm_args["debugmodel"]
    args.max_seq_len, args.n_layers, args.oelm_seed = 32, 2, 3
    with torch.device("meta"):
        model = OELMTransformer(args)
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    for m in model.modules():
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    frozen_before = {n: p.full_tensor().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(rank)
    for _ in range(3):
        tokens = torch.randint(0, 2048, (2, 17))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {
        "rank": rank,
        "reduce_scatter_numel": sum(sizes),
        "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_numel": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "frozen_grads": [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None],
        "trainable_without_grad": [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None],
        "frozen_unchanged": all(torch.equal(frozen_before[n], p.full_tensor())
                                for n, p in model.named_parameters() if n in frozen_before),
        "frozen_names": sorted(frozen_before),
    }
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
