"""Generation from a trained model: prefill over the prompt, then one token at a time from caches.

Softmax layers decode from a KV cache whose storage grows with the text in buckets of powers of
two positions (2 x n_kv_heads x head_dim numbers per token and layer); linear layers decode from the
constant-size recurrent state of efficient attention (n_kv_heads x (d_k x d_v + d_k) numbers,
whatever the context length). The model classes are not changed: the functions here walk
their modules (tok_embeddings, layers[i].attention.wq/wk/wv/wo, norms, feed_forward, output).

- prepare.py:    cast weights (keeping the complex RoPE table), extend RoPE, eval mode.
- cache.py:      KVCache, Caches (per layer KVCache or RecurrentState, and the length); the
                 buckets the KV storage grows by.
- prefill.py:    the model's parallel forward over the prompt, filling the caches.
- decode.py:     decode_step, one token through every block from the caches.
- graph_decode.py: the same step with fixed shapes, compiled (torch.compile) and replayed from
                 a CUDA graph per bucket (GraphDecoder); generate() uses it on CUDA.
- sampling.py:   greedy / temperature / top-k / top-p.
- generation.py: the loop with timings; `python -m titan_linear.generate` is its command.
- build.py:      a model from a training TOML and a DCP checkpoint, and its tokenizer.
"""

from .cache import bucket_length, Caches, is_linear, KVCache
from .decode import decode_step
from .generation import generate, GenerationResult
from .graph_decode import GraphDecoder, static_decode_step
from .prefill import prefill, recurrent_state_from_prompt
from .prepare import cast_weights, ensure_rope_length, prepare_model
from .sampling import filter_logits, sample, SamplingConfig

__all__ = [
    "bucket_length",
    "Caches",
    "GenerationResult",
    "GraphDecoder",
    "KVCache",
    "SamplingConfig",
    "cast_weights",
    "decode_step",
    "ensure_rope_length",
    "filter_logits",
    "generate",
    "is_linear",
    "prefill",
    "prepare_model",
    "recurrent_state_from_prompt",
    "sample",
    "static_decode_step",
]
