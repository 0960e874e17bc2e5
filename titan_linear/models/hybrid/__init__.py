"""The hybrid llama3 train spec ("llama3_mixed"): flavors and TorchTitan builders."""

from dataclasses import fields
from typing import Callable

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.protocols.train_spec import TrainSpec

from titan_linear.data import build_dataloader, build_tokenizer, build_validator
from titan_linear.recipe import train_spec_builders

from .args import ConfigError, HybridModelArgs
from .model import LinearAttention, LinearTransformerBlock, HybridTransformer
from .parallelize import parallelize_hybrid
from .state_dict_adapter import HybridStateDictAdapter

# The registry name (`model.name`), kept from the first release: configs say "llama3_mixed".
NAME = "llama3_mixed"

def _from_llama3(flavor: str) -> HybridModelArgs:
    """A flavor of torchtitan's llama3 as hybrid args (every field taken from upstream)."""
    src = llama3_args[flavor]
    return HybridModelArgs(
        **{f.name: getattr(src, f.name) for f in fields(src) if f.init and f.name != "_enforced"}
    )


# Llama 3.2 1B / 3B shapes (torchtitan 0.2.2 ships no 1B or 3B llama3 flavor).
hybrid_args = {
    "debugmodel": _from_llama3("debugmodel"),
    "1B": HybridModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
        multiple_of=256, rope_theta=500000, vocab_size=128256,
    ),
    "3B": HybridModelArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
        multiple_of=256, rope_theta=500000, vocab_size=128256,
    ),
    # Llama 3.2 as published (RoPE scaling factor 32, not TorchTitan's default 8): the flavors
    # to start a hybrid from those Hugging Face weights (docs/hf.md, "Import / linearize").
    "llama3.2-1B": HybridModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
        multiple_of=256, rope_theta=500000, vocab_size=128256,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=32.0),
    ),
    "llama3.2-3B": HybridModelArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
        multiple_of=256, rope_theta=500000, vocab_size=128256,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=32.0),
    ),
    "8B": _from_llama3("8B"),
    "70B": _from_llama3("70B"),
}


def build_train_spec(
    model_cls: type, model_args: dict, parallelize_fn: Callable, state_dict_adapter: type | None = None
) -> TrainSpec:
    """The TrainSpec of a llama3-family model of this package (the hybrid and OELM).

    Every model gets the same pipelining (llama3's), data builders and training recipe
    (`recipe.train_spec_builders`), so none can silently miss one.

    Args:
        model_cls: the model class, built from one of `model_args`.
        model_args: flavor name -> model arguments.
        parallelize_fn: the model's parallelize hook.
        state_dict_adapter: TorchTitan <-> Hugging Face names (HF import and save); default None.
    """
    return TrainSpec(
        model_cls=model_cls,
        model_args=model_args,
        parallelize_fn=parallelize_fn,
        pipelining_fn=pipeline_llm,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_validator_fn=build_validator,
        build_loss_fn=build_cross_entropy_loss,
        state_dict_adapter=state_dict_adapter,
        **train_spec_builders(),
    )


def get_train_spec() -> TrainSpec:
    # The HF adapter lets `checkpoint.initial_load_in_hf` start a hybrid from a Llama folder
    # (docs/hf.md). OELM has none: an import would overwrite its frozen orthogonal weights.
    return build_train_spec(HybridTransformer, hybrid_args, parallelize_hybrid, HybridStateDictAdapter)


__all__ = [
    "NAME", "ConfigError", "HybridModelArgs", "HybridStateDictAdapter", "HybridTransformer", "LinearAttention",
    "LinearTransformerBlock", "hybrid_args", "build_train_spec", "get_train_spec", "parallelize_hybrid",
]
