"""Hugging Face export (`python -m titan_linear.export.hf`, docs/hf.md) and the HF model class.

Importing this package registers the exported hybrid's classes with transformers' auto classes
(model_type "titan_linear_llama": `AutoConfig`, `AutoModelForCausalLM`) when transformers is
installed, so an exported folder loads without `trust_remote_code` in a process that ran
`import titan_linear.export`. The registration lives here, not in `titan_linear/__init__.py`:
it needs transformers imported (seconds, and an optional dependency), which training, the
launcher and every evaluation tool should not pay for. Without transformers, nothing is
registered and the export command says what to install.
"""

try:
    import transformers
except ImportError:  # the `hf` extra is not installed
    transformers = None

HF_INSTALL = "pip install 'titan_linear[hf]' (transformers and safetensors)"

if transformers is not None:
    from .configuration_titan_linear import TitanLinearConfig
    from .modeling_titan_linear import TitanLinearForCausalLM

    transformers.AutoConfig.register(TitanLinearConfig.model_type, TitanLinearConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(TitanLinearConfig, TitanLinearForCausalLM, exist_ok=True)
    __all__ = ["HF_INSTALL", "TitanLinearConfig", "TitanLinearForCausalLM"]
else:
    __all__ = ["HF_INSTALL"]
