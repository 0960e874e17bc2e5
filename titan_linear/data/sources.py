"""Text datasets, registered in torchtitan's `DATASETS` registry.

torchtitan's `HuggingFaceTextDataset` looks a dataset name up in
`torchtitan.hf_datasets.text_datasets.DATASETS`, loads it with the entry's
`loader(path)` and turns each sample into text with `sample_processor`.
Importing this module adds the entries below to that dict (torchtitan's
documented way of adding datasets), so torchtitan's own text loaders, its
`Validator` included, read them too. `path` is `dataset_path` when set,
else the entry's default.

- `tinyshakespeare` / `tinyshakespeare_val`: the packaged text
  (assets/data/tinyshakespeare.txt, 1.1 MB), first 90 % of its characters
  (cut at the next blank line) / the rest; one sample per paragraph.
  `dataset_path` may name another .txt file to split the same way.
- `tinystories` / `tinystories_val`: roneneldan/TinyStories, train /
  validation split, streamed from the hub.
- `hf` / `hf_val`: the hub dataset named by `dataset_path` (`org/name`), train /
  validation split, streamed, field "text".
- `text`: `dataset_path` = a .txt file or a directory of .txt files (searched
  recursively, read in sorted order); one sample per paragraph.
- `jsonl`: `dataset_path` = a .jsonl / .json file, or a directory of them,
  whose records have a "text" field.
- `c4`, `c4_validation`, `c4_test`: torchtitan's entries (allenai/c4 "en",
  streamed; tests/assets/c4_test from torchtitan's git repo, which its wheel
  lacks), replaced by the same loads with the checks below. `c4_test` is
  torchtitan's default `training.dataset`, so a config that sets none is told
  where that data lives instead of getting a FileNotFoundError.
- `tokens` is read by `token_file.TokenFileDataset`; its entry here only
  tells torchtitan's own loaders so.

Before streaming from the hub a loader checks in 5 s that the hub answers
(`hub.hub_reachable`); when it does not, a one-line error names the setting
and the offline alternatives. A hub dataset may also be a local copy: when
`dataset_path` exists on disk it is loaded from there and the hub is not
asked. Local files use the `datasets` packaged "text" and "json" builders,
which work offline. Bad settings raise `DataConfigError`, a ValueError of one
line. `TextDataset` is the HuggingFaceTextDataset that titan_linear's builders
use; it fixes resuming a stream saved after the data was looped over.
"""

import glob
import os
from functools import partial
from typing import Any, Callable

from datasets import Dataset, IterableDataset, load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets import text_datasets
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

from titan_linear.data.hub import hub_endpoint, hub_offline, hub_reachable, looks_like_repo_id

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
TINYSHAKESPEARE_PATH = os.path.join(ASSETS_DIR, "data", "tinyshakespeare.txt")
TRAIN_FRACTION = 0.9

# The hub (or torchtitan-repo) paths that entries read when dataset_path is unset.
_DEFAULT_PATHS = {
    "c4_test": text_datasets.DATASETS["c4_test"].path,
    "c4": "allenai/c4",
    "c4_validation": "allenai/c4",
    "tinystories": "roneneldan/TinyStories",
    "tinystories_val": "roneneldan/TinyStories",
}

OFFLINE_DATASETS = (
    "dataset = 'tinyshakespeare' (packaged), or 'text' / 'jsonl' / 'tokens' "
    "with dataset_path = a local file"
)


class DataConfigError(ValueError):
    """A bad `dataset` / `dataset_path` setting, as one line naming the key and value.

    Loaders see only `dataset_path`'s value, not the TOML section it came from;
    titan_linear's builders re-raise with `in_section("training")` or
    `in_section("validation")` so that the message names the full key.

    Args:
        key: "dataset" or "dataset_path".
        value: the value that was given.
        reason: what is wrong and what is allowed.
        section: "training", "validation" or None (unknown). Default: None.
    """

    def __init__(self, key: str, value: Any, reason: str, section: str | None = None):
        self.key, self.value, self.reason, self.section = key, value, reason, section
        full_key = f"{section}.{key}" if section else key
        setting = f"{full_key} is not set" if value in (None, "") else f"{full_key} = {value!r} is not allowed"
        super().__init__(f"{setting}: {reason}")

    def in_section(self, section: str) -> "DataConfigError":
        return DataConfigError(self.key, self.value, self.reason, section)


def split_tinyshakespeare(text: str) -> tuple[str, str]:
    """Split text into (train, validation): the first 90 % of characters, cut at a blank line."""
    cut = text.find("\n\n", int(len(text) * TRAIN_FRACTION))
    if cut < 0:
        cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, without empty ones."""
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def existing_files(dataset: str, path: str | None, extensions: tuple[str, ...]) -> list[str]:
    """The files that `path` (one file or a directory) names, or a DataConfigError."""
    allowed = f"dataset '{dataset}' reads a {' / '.join(extensions)} file or a directory of them"
    if not path:
        raise DataConfigError("dataset_path", path, allowed)
    if os.path.isdir(path):
        files = sorted(
            f
            for ext in extensions
            for f in glob.glob(os.path.join(path, "**", f"*{ext}"), recursive=True)
        )
        if not files:
            raise DataConfigError("dataset_path", path, f"directory has no such files; {allowed}")
        return files
    if not os.path.exists(path):
        raise DataConfigError("dataset_path", path, f"no such file or directory; {allowed}")
    if not path.endswith(extensions):
        raise DataConfigError("dataset_path", path, f"wrong file extension; {allowed}")
    return [path]


def _bad_source(dataset: str, path: str, reason: str) -> DataConfigError:
    """The error names `dataset` when `path` is its default, else `dataset_path`."""
    if path == _DEFAULT_PATHS.get(dataset):
        return DataConfigError("dataset", dataset, reason)
    return DataConfigError("dataset_path", path, reason)


def _load_tinyshakespeare(path: str, part: int, dataset: str) -> Dataset:
    (file,) = existing_files(dataset, path, (".txt",))
    with open(file, encoding="utf-8") as f:
        text = split_tinyshakespeare(f.read())[part]
    return Dataset.from_dict({"text": paragraphs(text)})


def _load_text(path: str) -> Dataset:
    files = existing_files("text", path, (".txt",))
    return load_dataset("text", data_files=files, split="train", sample_by="paragraph")


def _load_jsonl(path: str) -> Dataset:
    files = existing_files("jsonl", path, (".jsonl", ".json"))
    try:
        ds = load_dataset("json", data_files=files, split="train")
    except Exception as e:
        reason = (
            f"not readable as JSON lines ({type(e).__name__}); "
            "dataset 'jsonl' reads records with a \"text\" field"
        )
        raise DataConfigError("dataset_path", path, reason) from e
    if "text" not in ds.column_names:
        reason = f"records have no \"text\" field (fields: {ds.column_names})"
        raise DataConfigError("dataset_path", path, reason)
    return ds


def check_hub_source(path: str | None, dataset: str) -> None:
    """Raise DataConfigError unless `path` is a local copy or a hub id and the hub answers."""
    if not path:
        reason = f"dataset '{dataset}' needs a hub dataset id such as 'org/name'"
        raise DataConfigError("dataset_path", path, reason)
    if not os.path.exists(path):
        if not looks_like_repo_id(path):
            reason = f"no such local path, nor a hub id 'org/name' for dataset '{dataset}'"
            raise DataConfigError("dataset_path", path, reason)
        if not hub_offline() and not hub_reachable():
            reason = (
                f"dataset '{dataset}' streams '{path}' from the Hugging Face hub, which is "
                f"unreachable from this machine ({hub_endpoint()}); offline alternatives: "
                f"{OFFLINE_DATASETS}, or dataset_path = a local copy of the dataset"
            )
            raise _bad_source(dataset, path, reason)


def _load_hub(
    path: str | None, dataset: str, split: str, name: str | None = None
) -> IterableDataset:
    """Stream `split` of hub dataset `path` (or of its local copy at `path`)."""
    check_hub_source(path, dataset)
    try:
        ds = load_dataset(path, name=name, split=split, streaming=True)
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        reason = f"load_dataset failed for dataset '{dataset}': {type(e).__name__}: {first_line}"
        raise DataConfigError("dataset_path", path, reason) from e
    # Streams may not know their columns before the first record; check when they do.
    if ds.features is not None and "text" not in ds.features:
        reason = f"split '{split}' has no \"text\" field (fields: {list(ds.features)})"
        raise DataConfigError("dataset_path", path, reason)
    return ds


def _load_c4_test(path: str) -> Dataset:
    """torchtitan's c4_test entry, with an error that says where the data lives."""
    if not os.path.isdir(path):
        reason = (
            "reads tests/assets/c4_test from torchtitan's git repository, which its wheel "
            f"does not ship; set dataset_path to that directory, or use {OFFLINE_DATASETS}"
        )
        raise _bad_source("c4_test", path, reason)
    return load_dataset(path, split="train")


def _text_field(sample: dict[str, Any]) -> str:
    return sample["text"]


def _tokens_needs_titan_linear(path: str) -> None:
    reason = (
        "dataset 'tokens' is read by titan_linear.data's builders "
        "(build_dataloader, build_validation_dataloader, build_validator), "
        "not by torchtitan's text loaders"
    )
    raise DataConfigError("dataset", "tokens", reason)



def _entry(path: str, loader: Callable) -> DatasetConfig:
    return DatasetConfig(path=path, loader=loader, sample_processor=_text_field)


# Name -> torchtitan DatasetConfig. `tokens` is here so that torchtitan's
# loaders explain themselves instead of calling the name unknown.
DATASETS: dict[str, DatasetConfig] = {
    "tinyshakespeare": _entry(
        TINYSHAKESPEARE_PATH, partial(_load_tinyshakespeare, part=0, dataset="tinyshakespeare")
    ),
    "tinyshakespeare_val": _entry(
        TINYSHAKESPEARE_PATH, partial(_load_tinyshakespeare, part=1, dataset="tinyshakespeare_val")
    ),
    "c4": _entry(_DEFAULT_PATHS["c4"], partial(_load_hub, dataset="c4", split="train", name="en")),
    "c4_validation": _entry(
        _DEFAULT_PATHS["c4_validation"],
        partial(_load_hub, dataset="c4_validation", split="validation", name="en"),
    ),
    "c4_test": _entry(_DEFAULT_PATHS["c4_test"], _load_c4_test),
    "tinystories": _entry(
        _DEFAULT_PATHS["tinystories"], partial(_load_hub, dataset="tinystories", split="train")
    ),
    "tinystories_val": _entry(
        _DEFAULT_PATHS["tinystories_val"],
        partial(_load_hub, dataset="tinystories_val", split="validation"),
    ),
    "hf": _entry("", partial(_load_hub, dataset="hf", split="train")),
    "hf_val": _entry("", partial(_load_hub, dataset="hf_val", split="validation")),
    "text": _entry("", _load_text),
    "jsonl": _entry("", _load_jsonl),
    "tokens": _entry("", _tokens_needs_titan_linear),
}

text_datasets.DATASETS.update(DATASETS)


def dataset_names() -> list[str]:
    """Every name `dataset` accepts: ours and torchtitan's (c4_test among them)."""
    return sorted(text_datasets.DATASETS)


class TextDataset(HuggingFaceTextDataset):
    """torchtitan's HuggingFaceTextDataset, resuming streams saved after a re-loop.

    A streamed dataset's state carries the epoch it was saved in, and `datasets`
    applies it only while the stream is in that same epoch (torchtitan raises
    the epoch each time it loops over the data). A fresh dataset is in epoch 0,
    so a state saved in a later epoch was silently ignored and the run restarted
    at the first sample (torchtitan issue #1357). Setting the saved epoch first
    makes it resume in place, as upstream torchtitan does since PR #3008 (after 0.2.2).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if isinstance(self._data, IterableDataset) and "data" in state_dict:
            self._data.set_epoch(state_dict["data"].get("epoch", 0))
        super().load_state_dict(state_dict)
