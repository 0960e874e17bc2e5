"""Checks of a run's data that `launch check` makes before any rank starts.

What a rank would only find out after start-up (an empty or blank text file, a
JSON-lines file that does not parse or has no "text", a token id beyond the vocab,
a hub that does not answer) is found here and reported in one line naming the key
and the value. JSON-lines files are checked over their first `JSONL_RECORDS_CHECKED`
records; token files over every id.
"""

import json
import os

from titan_linear.data.sources import (
    check_hub_source, DataConfigError, DATASETS, dataset_names, existing_files,
)
from titan_linear.data.token_file import open_token_file

JSONL_RECORDS_CHECKED = 1000
# Datasets streamed from the hub unless dataset_path names a local copy.
HUB_DATASETS = ("c4", "c4_validation", "tinystories", "tinystories_val", "hf", "hf_val")


def _has_text(file: str) -> bool:
    """Whether a text file holds anything but whitespace (read in blocks, stops at the first)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        while block := f.read(1 << 20):
            if block.strip():
                return True
    return False


def _check_text(path: str | None, dataset: str, extensions=(".txt",)) -> None:
    files = existing_files(dataset, path, extensions)
    if not any(_has_text(f) for f in files):
        what = "is empty or holds only blank lines" if len(files) == 1 else f"({len(files)} files) hold only blank lines"
        raise DataConfigError("dataset_path", path, f"{what}: dataset '{dataset}' has nothing to train on")


def _check_jsonl(path: str | None) -> None:
    files = existing_files("jsonl", path, (".jsonl", ".json"))
    seen = 0
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if n == 1 and file.endswith(".json"):
                        break  # one JSON document, not lines: the `datasets` json builder reads it
                    raise DataConfigError("dataset_path", path, f"{file} line {n} is not JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    fields = list(record) if isinstance(record, dict) else type(record).__name__
                    raise DataConfigError(
                        "dataset_path", path,
                        f"{file} line {n} has no string \"text\" field (it has {fields}); "
                        "dataset 'jsonl' reads records with a \"text\" field")
                seen += 1
                if seen >= JSONL_RECORDS_CHECKED:
                    return
    if seen == 0 and not any(f.endswith(".json") for f in files):
        raise DataConfigError("dataset_path", path, "holds no records: dataset 'jsonl' has nothing to train on")


def check_source(section: str, dataset: str, path: str | None, vocab_size: int) -> None:
    """Raise DataConfigError (naming `section`.key) when `dataset` / `path` cannot be read."""
    name = (dataset or "").lower()
    try:
        if name not in dataset_names():
            raise DataConfigError("dataset", dataset, f"unknown dataset; allowed: {', '.join(dataset_names())}")
        if name == "tokens":
            open_token_file(path, vocab_size)
        elif name == "text":
            _check_text(path, "text")
        elif name == "jsonl":
            _check_jsonl(path)
        elif name.startswith("tinyshakespeare"):
            _check_text(path or DATASETS[name].path, name)
        elif name == "c4_test":
            if not os.path.isdir(path or DATASETS[name].path):
                # the loader's own message says where that data lives
                DATASETS[name].loader(path or DATASETS[name].path)
        elif name in HUB_DATASETS:
            given = path or DATASETS[name].path or None
            if given and os.path.isfile(given):
                return
            check_hub_source(given, name)
    except DataConfigError as e:
        raise e.in_section(section) from None


def check_data(job_config, vocab_size: int) -> None:
    """Check `[training]` and, when enabled, `[validation]` data of `job_config`."""
    t = job_config.training
    check_source("training", t.dataset, t.dataset_path, vocab_size)
    v = job_config.validation
    if v.enable:
        check_source("validation", v.dataset, v.dataset_path, vocab_size)
