"""OELMTransformer: llama3 (optionally hybrid) with frozen random orthogonal attention projections.

OELM's "qk" variant fixes W_q and W_k; its "kv" variant (orthogonal random attention) fixes
W_k and W_v and learns W_q (docs/recipe.md, "OELM"). Which projections, and in which layers, is in the model
args (`frozen_projections`, `frozen_layers`). The frozen weights are:
- `requires_grad=False` from `__init__` on, so FSDP2 keeps no gradient for them (and
  reduce-scatters none), the optimizer built after parallelize never sees them, and
  they are saved and loaded with the model like every other weight;
- Haar-random orthogonal, set in `init_weights` by `torch.nn.init.orthogonal_` (QR
  of a Gaussian with sign correction, Mezzadri math-ph/0609050), gain 1. For grouped-
  query shapes (n_kv_heads < n_heads) W_k and W_v are (n_kv_heads * head_dim) x dim:
  semi-orthogonal with orthonormal rows, W Wᵀ = I.

Each (layer, projection) draws from its own generator seeded from `oelm_seed`, so the
matrices are the same on every rank, for every parallelism, and on resume.

The frozen layers can also be linear-attention layers of the hybrid (linear_attn_ratio):
LinearAttention keeps the same wq/wk/wv, so freezing means the same thing there.
"""

import torch
from torch.distributed.tensor import distribute_tensor, DTensor
from torchtitan.tools.logging import logger

from titan_linear.models.hybrid.model import HybridTransformer

from .args import OELMModelArgs, PROJECTIONS


def orthogonal_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A Haar-random (semi-)orthogonal float32 matrix of `shape`, reproducible from `seed`.

    Drawn and factorised in float64 on the CPU, then rounded to float32. Every rank of a run
    gets the same bits (same thread count); the QR's last float64 bits depend on the BLAS
    thread count, so across machines an entry can differ by one float32 ulp, rarely."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.empty(shape, dtype=torch.float64)
    torch.nn.init.orthogonal_(w, gain=1.0, generator=gen)
    return w.to(torch.float32)


class OELMTransformer(HybridTransformer):
    """HybridTransformer whose `frozen_projections` in `frozen_layers` are fixed orthogonal.

    Its args add the map `oelm_freeze_map` (n_layers x 3, 1 = frozen wq/wk/wv) to the
    checkpoint maps, so loading a checkpoint whose freeze map differs raises an error naming both.
    """

    def __init__(self, model_args: OELMModelArgs):
        super().__init__(model_args)
        self.frozen_layers = model_args.frozen_layers
        self.frozen_projections = model_args.frozen_projections
        for name in self.frozen_param_names():
            self.get_parameter(name).requires_grad_(False)
        logger.info(
            f"titan_linear OELM freeze map {model_args.freeze_map} (F = {'/'.join(self.frozen_projections) or '-'} "
            f"frozen orthogonal, T = trainable): {len(self.frozen_layers)}/{model_args.n_layers} layers"
        )

    def frozen_param_names(self) -> list[str]:
        return [f"layers.{i}.attention.{p}.weight" for i in self.frozen_layers for p in self.frozen_projections]

    def init_weights(self, buffer_device: torch.device | None = None):
        super().init_weights(buffer_device=buffer_device)
        seed = self.model_args.oelm_seed
        with torch.no_grad():
            for i in self.frozen_layers:
                for p in self.frozen_projections:
                    weight = self.get_parameter(f"layers.{i}.attention.{p}.weight")
                    full = orthogonal_weight(tuple(weight.shape), seed * 1_000_003 + 8 * i + PROJECTIONS.index(p))
                    if isinstance(weight, DTensor):
                        full = full.to(device=weight.device, dtype=weight.dtype)
                        # identical on every rank, so each rank keeps its own shard (no traffic)
                        local = distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None)
                        weight.copy_(local)
                    else:
                        weight.copy_(full)
