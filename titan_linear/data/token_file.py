"""Dataset `tokens`: a flat file of token ids, read through a memory map.

The file is what nanoGPT's and CS336's `prepare.py` write (`data.bin`): the
token ids of the whole corpus, one after the other, with no header.

- `.bin`: raw ids; dtype uint16 when the tokenizer's vocab size is at most
  65,536, else uint32 (the file size must be a multiple of it).
- `.npy`: a 1-D integer numpy array (its header carries the dtype).

Window `w` is `ids[w * seq_len : w * seq_len + seq_len + 1]`: input
`window[:-1]`, label `window[1:]`, so consecutive windows share one token and
every id but the first is a label once per epoch. Data-parallel rank `r` of
`R` takes windows `r, r + R, r + 2R, ...`, each rank the same number
(`n_windows // R`; the few left over are skipped), so ranks never overlap and
none runs dry first. DataLoader workers split a rank's windows the same way.
The position is one integer (`sample_idx`), saved by `state_dict()`, so a
resumed run continues at the next window.
"""

import os
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from titan_linear.data.sources import DataConfigError

TOKEN_FILE_EXTENSIONS = (".bin", ".npy")
# Ids per block of the range scan: large enough for numpy's speed, small enough for memory
# (16M ids: 32 MiB of uint16).
_SCAN_BLOCK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype of a `.bin` token file for this vocab size: uint16 up to 65,536, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def id_range(ids: np.ndarray, limit: int | None = None) -> tuple[int, int]:
    """(min, max) over the first `limit` ids (None: every id), block by block through the memory map."""
    lo, hi = 0, -1
    for start in range(0, ids.size if limit is None else min(limit, ids.size), _SCAN_BLOCK):
        block = np.asarray(ids[start : start + _SCAN_BLOCK])
        b_lo, b_hi = int(block.min()), int(block.max())
        lo, hi = (b_lo, b_hi) if start == 0 else (min(lo, b_lo), max(hi, b_hi))
    return lo, hi


def open_token_file(path: str | None, vocab_size: int, check_all: bool = True) -> np.ndarray:
    """A read-only 1-D memory map of the ids in `path` (.bin or .npy), checked against the vocab
    (a file of another tokenizer or dtype fails here, not mid-run).

    Args:
        path: the token file.
        vocab_size: the tokenizer's vocab size; picks a `.bin` file's dtype and
            bounds the ids.
        check_all: scan every id (what `launch check` does once, before the ranks
            start); False checks the first `_SCAN_BLOCK` ids only, so that each rank
            of a large run does not read the whole file again. Default: True.
    """
    allowed = "dataset 'tokens' reads a .bin file of raw token ids or a 1-D .npy array"
    if not path:
        raise DataConfigError("dataset_path", path, allowed)
    if not os.path.isfile(path):
        raise DataConfigError("dataset_path", path, f"no such file; {allowed}")
    if path.endswith(".npy"):
        ids = np.load(path, mmap_mode="r")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            reason = f"holds a {ids.ndim}-D {ids.dtype} array; {allowed}"
            raise DataConfigError("dataset_path", path, reason)
    elif path.endswith(".bin"):
        dtype = token_dtype(vocab_size)
        if os.path.getsize(path) % dtype.itemsize:
            reason = (
                f"size {os.path.getsize(path)} B is not a multiple of {dtype.itemsize} B, "
                f"the size of {dtype} ids used for a vocab of {vocab_size}"
            )
            raise DataConfigError("dataset_path", path, reason)
        ids = np.memmap(path, dtype=dtype, mode="r")
    else:
        raise DataConfigError("dataset_path", path, f"wrong file extension; {allowed}")
    lo, hi = id_range(ids, None if check_all else _SCAN_BLOCK)
    if ids.size and (hi >= vocab_size or lo < 0):
        where = "" if check_all else f" in the first {min(ids.size, _SCAN_BLOCK):,}"
        reason = (
            f"holds ids outside [0, {vocab_size}), the tokenizer's vocab (ids {lo}..{hi}{where}); "
            f"was it written with another tokenizer or dtype ({ids.dtype})?"
        )
        raise DataConfigError("dataset_path", path, reason)
    return ids


class TokenFileDataset(IterableDataset, Stateful):
    """Windows of `seq_len + 1` ids from a token file, as ({"input": x[:-1]}, x[1:]).

    Args:
        path: a .bin or .npy file of token ids.
        vocab_size: the tokenizer's vocab size.
        seq_len: tokens per input. Default: 2048.
        dp_rank: this data-parallel rank. Default: 0.
        dp_world_size: the data-parallel degree. Default: 1.
        infinite: start again at the first window when the file is used up.
            Default: False.
    """

    def __init__(
        self,
        path: str,
        vocab_size: int,
        seq_len: int = 2048,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = False,
    ) -> None:
        # `launch check` scanned every id before the ranks started.
        ids = open_token_file(path, vocab_size, check_all=False)
        self.path = path
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self.windows_per_rank = (len(ids) - 1) // seq_len // dp_world_size
        if self.windows_per_rank == 0:
            reason = (
                f"holds {len(ids)} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1} for each of {dp_world_size} data-parallel ranks"
            )
            raise DataConfigError("dataset_path", path, reason)
        # Windows this worker has yielded in the current pass over the file.
        self._sample_idx = 0

    def _window(self, ids: np.ndarray, j: int) -> torch.Tensor:
        start = (self.dp_rank + self.dp_world_size * j) * self.seq_len
        return torch.from_numpy(ids[start : start + self.seq_len + 1].astype(np.int64))

    def __iter__(self):
        # Opened here, not kept from __init__, so that workers never pickle the map
        # (the ids were range-checked in __init__).
        ids = np.load(self.path, mmap_mode="r") if self.path.endswith(".npy") else np.memmap(
            self.path, dtype=token_dtype(self.vocab_size), mode="r")
        worker = get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        while True:
            while (j := worker_id + n_workers * self._sample_idx) < self.windows_per_rank:
                x = self._window(ids, j)
                self._sample_idx += 1
                yield {"input": x[:-1]}, x[1:]
            if not self.infinite:
                return
            self._sample_idx = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sample_idx": self._sample_idx}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sample_idx = state_dict["sample_idx"]
