"""Tokenizer, datasets and dataloaders for titan_linear's train specs.

All settings are torchtitan's own TOML keys: `[model] hf_assets_path`,
`[training] dataset`, `dataset_path` and `[validation] dataset`, `dataset_path`.
The default (train_configs/debug_model.toml) runs offline on files packaged
with titan_linear: the tinyshakespeare text and a 2048-token BPE.

Tokenizer: `model.hf_assets_path`
- `"builtin"` or `""`: the packaged byte-level BPE (assets/tokenizer/, vocab
  2048 with `<|begin_of_text|>` = BOS, `<|end_of_text|>` = EOS), trained on
  the tinyshakespeare training split by `titan_linear/tools/make_debug_tokenizer.py`.
- an existing local directory: used as is; it must hold tokenizer.json (or
  vocab.json / vocab.txt + merges.txt) and, for BOS/EOS, tokenizer_config.json.
- a hub repo id `org/name` that is no local path: only its tokenizer files are
  downloaded (huggingface_hub.snapshot_download with allow_patterns); when the
  hub does not answer within 5 s, a copy in the hub cache is used if present.
- otherwise (missing path, hub unreachable): a one-line ValueError naming
  `model.hf_assets_path`, the value and what is allowed.

Datasets: `dataset` (+ `dataset_path`), the same names under `[training]` and
`[validation]`
- `tinyshakespeare`: packaged text, first 90 % of its characters (cut at a
  blank line); one sample per paragraph. `tinyshakespeare_val`: the last 10 %.
  `dataset_path` may name another .txt file to split the same way.
- `c4` / `c4_validation`: torchtitan's allenai/c4 (en), streamed from the hub.
- `tinystories` / `tinystories_val`: roneneldan/TinyStories, streamed.
- `hf` / `hf_val`: `dataset_path` = a hub dataset id `org/name`; its train /
  validation split, streamed, field "text".
- `text`: `dataset_path` = a .txt file or a directory of .txt files; one sample
  per paragraph.
- `jsonl`: `dataset_path` = a .jsonl / .json file (or a directory of them)
  whose records have a "text" field.
- `tokens`: `dataset_path` = a flat file of token ids: `.bin` (raw; uint16 when
  the vocab has at most 65,536 ids, else uint32) or a 1-D `.npy`; contiguous
  windows of seq_len + 1 ids, split across data-parallel ranks without overlap.
- `c4_test`: torchtitan's entry, a directory in torchtitan's git repo only.

Hub datasets also accept a local copy as `dataset_path`. Before streaming from
the hub the loaders check in 5 s that it answers, so an offline machine gets a
one-line ValueError naming `training.dataset` / `training.dataset_path` (or
`validation.*`), the value and the offline alternatives, not minutes of retries.
Every dataset is Stateful: the dataloader's state in a checkpoint resumes a run
at exactly the next batch, also after the data was looped over. Text datasets
are torchtitan's HuggingFaceTextDataset over entries that `sources` adds to
torchtitan's `DATASETS` registry, so torchtitan's own text loaders (its stock
Validator included) read them as well. `build_validator` (a subclass of
torchtitan's Validator) reads `tokens` too, and gives every validation the same
batches, where torchtitan's goes on from where the previous validation stopped.
"""

from titan_linear.data.dataloader import (
    FromStartEachPass,
    build_dataloader,
    build_dataset,
    build_validation_dataloader,
)
from titan_linear.data.sources import DATASETS, DataConfigError, dataset_names
from titan_linear.data.token_file import TokenFileDataset, open_token_file, token_dtype
from titan_linear.data.tokenizer import (
    BUILTIN_TOKENIZER_DIR,
    build_tokenizer,
    resolve_hf_assets_path,
)
from titan_linear.data.validate import Validator, build_validator

__all__ = [
    "BUILTIN_TOKENIZER_DIR",
    "DATASETS",
    "DataConfigError",
    "FromStartEachPass",
    "TokenFileDataset",
    "Validator",
    "build_dataloader",
    "build_dataset",
    "build_tokenizer",
    "build_validation_dataloader",
    "build_validator",
    "dataset_names",
    "open_token_file",
    "resolve_hf_assets_path",
    "token_dtype",
]
