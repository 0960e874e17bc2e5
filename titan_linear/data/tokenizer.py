"""The tokenizer, from `[model] hf_assets_path`.

`build_tokenizer(job_config)` returns torchtitan's `HuggingFaceTokenizer` for
the directory that `model.hf_assets_path` resolves to:

- `"builtin"` or `""`: the packaged tokenizer (assets/tokenizer): a byte-level
  BPE of exactly 2048 ids trained on the tinyshakespeare training split, with
  `<|begin_of_text|>` (BOS) and `<|end_of_text|>` (EOS) declared in its
  tokenizer_config.json. `python -m titan_linear.tools.make_debug_tokenizer`
  rebuilds it byte for byte.
- an existing local directory: used as is; it must hold tokenizer.json, or
  vocab.json / vocab.txt (+ merges.txt), as torchtitan's HuggingFaceTokenizer
  reads, plus tokenizer_config.json for BOS/EOS.
- a hub repo id `org/name` that is not a local path: only the tokenizer files
  are fetched with `huggingface_hub.snapshot_download` (into the usual hub
  cache; when the hub does not answer within 5 s, only that cache is asked);
  if that fails, a one-line ValueError names the key.
- anything else (a missing local path, an unreachable hub): a one-line
  ValueError naming `model.hf_assets_path`, the value and what is allowed.
"""

import os

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

from titan_linear.data.hub import hub_endpoint, hub_offline, hub_reachable, looks_like_repo_id
from titan_linear.data.sources import ASSETS_DIR

BUILTIN = "builtin"
BUILTIN_TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"

# What HuggingFaceTokenizer can load a tokenizer from (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
# What is fetched from the hub: the tokenizer and its config, never weights.
HUB_TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
]

_ALLOWED = (
    f"allowed: '{BUILTIN}' (the packaged 2048-token BPE), a local directory with "
    "tokenizer.json (or vocab.json / vocab.txt + merges.txt), or a reachable "
    "Hugging Face hub repo id 'org/name'"
)


def _error(value: str, problem: str) -> ValueError:
    return ValueError(f"model.hf_assets_path = {value!r}: {problem}; {_ALLOWED}")


def _has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def _fetch_from_hub(repo_id: str) -> str:
    """The tokenizer files of hub repo `repo_id`, downloaded or from the hub cache."""
    from huggingface_hub import snapshot_download

    # Unreachable: ask the cache only, instead of waiting on the network's timeouts.
    cache_only = hub_offline() or not hub_reachable()
    try:
        return snapshot_download(
            repo_id, allow_patterns=HUB_TOKENIZER_PATTERNS, local_files_only=cache_only
        )
    except Exception as e:
        if cache_only:
            problem = (
                f"no such local directory, and the Hugging Face hub ({hub_endpoint()}) is "
                "unreachable from here with no cached copy of that repo"
            )
        else:
            first_line = (str(e).splitlines() or [""])[0]
            problem = (
                "no such local directory, and fetching it from the Hugging Face hub "
                f"failed ({type(e).__name__}: {first_line})"
            )
        raise _error(repo_id, problem) from None


def resolve_hf_assets_path(value: str | None) -> str:
    """The local tokenizer directory that a `model.hf_assets_path` value stands for.

    Args:
        value: "builtin" or "" (the packaged tokenizer), a local directory, or a
            hub repo id "org/name".
    """
    if not value or value == BUILTIN:
        return BUILTIN_TOKENIZER_DIR
    if os.path.isdir(value):
        directory = value
    elif os.path.exists(value):
        raise _error(value, "is a file, not a directory")
    elif looks_like_repo_id(value):
        directory = _fetch_from_hub(value)
    else:
        raise _error(value, "no such local directory, nor a hub repo id 'org/name'")
    if not _has_tokenizer_files(directory):
        files = sorted(os.listdir(directory))
        raise _error(value, f"holds no tokenizer file (it has {files})")
    return directory


def build_tokenizer(job_config: JobConfig) -> HuggingFaceTokenizer:
    """torchtitan's HuggingFaceTokenizer for `model.hf_assets_path` (rules in the module docstring).

    Args:
        job_config: the job; only `model.hf_assets_path` is read.
    """
    return HuggingFaceTokenizer(resolve_hf_assets_path(job_config.model.hf_assets_path))
