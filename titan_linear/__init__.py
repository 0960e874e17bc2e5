"""titan_linear: a TorchTitan 0.2.2 plugin for hybrid llama3 with causal efficient attention.

Importing this package (our launcher does; a stock `python -m torchtitan.train`
does through `[experimental] custom_import = "titan_linear"`) points TorchTitan at
the CPU when no accelerator exists and registers the train specs:
- "llama3_mixed": llama3 with `[model] linear_attn_ratio` (HybridTransformer).
- "llama3_oelm": the same with frozen orthogonal attention projections (OELMTransformer).
"""

from titan_linear.infra.device import quiet_builtin_tokenizer_warning, use_cpu_if_no_accelerator

use_cpu_if_no_accelerator()
quiet_builtin_tokenizer_warning()

from torchtitan.protocols.train_spec import _extra_train_specs, register_train_spec  # noqa: E402

from titan_linear.models import hybrid  # noqa: E402
from titan_linear.models import oelm  # noqa: E402

__version__ = "0.1.0"

if hybrid.NAME not in _extra_train_specs:
    register_train_spec(hybrid.NAME, hybrid.get_train_spec())
if oelm.NAME not in _extra_train_specs:
    register_train_spec(oelm.NAME, oelm.get_train_spec())
