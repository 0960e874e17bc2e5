"""The OELM llama3 train spec ("llama3_oelm"): flavors and TorchTitan builders.

Flavors (docs/recipe.md, "OELM"; SwiGLU FFN as in llama3: three d x h matrices where a GPT
FFN has two, so FFN parameters are 1.5x a GPT's at the same hidden width h):
- debugmodel: torchtitan's llama3 debug shape (6 layers, dim 256, 16 heads, vocab 2048).
- medium512: the GPT / OELM comparison's Medium-512, 6 layers, dim 512, 8 heads, FFN
  hidden 2048, vocab 50257 (GPT-2); set `model.vocab_size = 2048` with the builtin tokenizer.
- small / base / large: the orthogonal random attention sizes, 6/12/24 layers,
  512/768/1024 wide, 8/12/16 heads, FFN hidden 2048/3072/4096, vocab 32000.
Hidden widths: llama3 takes int(2 * 4d / 3), times ffn_dim_multiplier 1.5, rounded up
to multiple_of 256, which gives exactly 4d for these widths.
"""

from torchtitan.protocols.train_spec import TrainSpec

from titan_linear.models.hybrid import build_train_spec, hybrid_args

from .args import FREEZE_MODES, OELMModelArgs
from .model import OELMTransformer, orthogonal_weight
from .parallelize import parallelize_oelm
from .report import parameter_report

NAME = "llama3_oelm"


def _wide(dim: int, n_layers: int, n_heads: int, vocab_size: int) -> OELMModelArgs:
    return OELMModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size,
        ffn_dim_multiplier=1.5, multiple_of=256, rope_theta=10000, max_seq_len=512,
    )


def _debug() -> OELMModelArgs:
    src = hybrid_args["debugmodel"]
    return OELMModelArgs(dim=src.dim, n_layers=src.n_layers, n_heads=src.n_heads,
                         vocab_size=src.vocab_size, rope_theta=src.rope_theta)


oelm_args = {
    "debugmodel": _debug(),
    "medium512": _wide(512, 6, 8, 50257),
    "small": _wide(512, 6, 8, 32000),
    "base": _wide(768, 12, 12, 32000),
    "large": _wide(1024, 24, 16, 32000),
}


def get_train_spec() -> TrainSpec:
    return build_train_spec(OELMTransformer, oelm_args, parallelize_oelm)


__all__ = [
    "NAME", "FREEZE_MODES", "OELMModelArgs", "OELMTransformer", "oelm_args", "get_train_spec",
    "orthogonal_weight", "parameter_report", "parallelize_oelm",
]
