"""The training and validation dataloaders that titan_linear's TrainSpec builds.

Both read `dataset` / `dataset_path` / `local_batch_size` / `seq_len` /
`dataloader` from their TOML section (`[training]` or `[validation]`), build
the dataset (`TextDataset`, a subclass of torchtitan's HuggingFaceTextDataset,
for every text dataset; `TokenFileDataset` for `tokens`) and wrap it in torchtitan's
ParallelAwareDataloader, which checkpoints each data-parallel rank's position.
"""

import copy
from dataclasses import asdict
from typing import Any

from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from titan_linear.data.sources import DataConfigError, TextDataset, dataset_names
from titan_linear.data.token_file import TokenFileDataset


def build_dataset(
    section: str,
    dataset: str,
    dataset_path: str | None,
    tokenizer: BaseTokenizer,
    seq_len: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    infinite: bool = False,
) -> IterableDataset:
    """The dataset that `[section] dataset` / `dataset_path` name; yields ({"input": x}, label).

    Args:
        section: "training" or "validation", for error messages.
        dataset: a name from `dataset_names()` (any case).
        dataset_path: overrides the dataset's default path; None keeps it.
        tokenizer: encodes text; its vocab size sets a token file's dtype.
        seq_len: tokens per sample.
        dp_rank: this data-parallel rank. Default: 0.
        dp_world_size: the data-parallel degree. Default: 1.
        infinite: loop over the data forever. Default: False.
    """
    name = dataset.lower()
    if name not in dataset_names():
        allowed = ", ".join(dataset_names())
        raise ValueError(f"{section}.dataset = {dataset!r} is not allowed: unknown dataset; allowed: {allowed}")
    if tokenizer is None:
        raise ValueError(
            f"{section}.dataset = {dataset!r} needs a tokenizer; the train spec built none"
        )
    try:
        if name == "tokens":
            return TokenFileDataset(
                dataset_path,
                tokenizer.get_vocab_size(),
                seq_len=seq_len,
                dp_rank=dp_rank,
                dp_world_size=dp_world_size,
                infinite=infinite,
            )
        return TextDataset(
            dataset_name=name,
            dataset_path=dataset_path,
            tokenizer=tokenizer,
            seq_len=seq_len,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            infinite=infinite,
        )
    except DataConfigError as e:
        raise e.in_section(section) from e.__cause__


class FromStartEachPass(IterableDataset):
    """Each `iter()` starts the wrapped dataset again at its first sample.

    torchtitan's Validator iterates its dataloader afresh at every validation;
    a Stateful dataset would go on from where the previous validation stopped
    (or, when finite, yield nothing the second time). Restoring the state it
    had when built makes every validation read the same batches.

    Args:
        dataset: a Stateful IterableDataset.
    """

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset
        self._start: dict[str, Any] = copy.deepcopy(dataset.state_dict())

    def __iter__(self):
        self.dataset.load_state_dict(copy.deepcopy(self._start))
        return iter(self.dataset)


def _build(
    section: str,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool,
) -> ParallelAwareDataloader:
    config = getattr(job_config, section)
    dataset = build_dataset(
        section,
        config.dataset,
        config.dataset_path,
        tokenizer,
        seq_len=config.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
    )
    if section == "validation":
        dataset = FromStartEachPass(dataset)
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{**asdict(config.dataloader), "batch_size": config.local_batch_size},
    )


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """The `[training]` dataloader (torchtitan's `build_text_dataloader` signature).

    Args:
        dp_world_size: the data-parallel degree.
        dp_rank: this data-parallel rank.
        tokenizer: encodes text (and sizes token-file ids).
        job_config: reads `training.dataset`, `dataset_path`, `local_batch_size`,
            `seq_len` and `dataloader`.
        infinite: loop over the data forever. Default: True.
    """
    return _build("training", dp_world_size, dp_rank, tokenizer, job_config, infinite)


def build_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = False,
) -> ParallelAwareDataloader:
    """The `[validation]` dataloader; every pass over it starts at the first batch.

    Args:
        dp_world_size: the data-parallel degree.
        dp_rank: this data-parallel rank.
        tokenizer: encodes text (and sizes token-file ids).
        job_config: reads `validation.dataset`, `dataset_path`, `local_batch_size`,
            `seq_len` and `dataloader`.
        infinite: loop over the data forever (the validator sets it when
            `validation.steps` is not -1). Default: False.
    """
    return _build("validation", dp_world_size, dp_rank, tokenizer, job_config, infinite)
