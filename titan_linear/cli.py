"""What every command that loads a trained model shares: `python -m titan_linear.generate` and
the evaluation tools `python -m titan_linear.eval.<name>`.

- the model flags: `--config TOML` (the training config) and `--checkpoint DIR` (a DCP
  `step-N`, or the checkpoint folder: its newest intact step) or `--random-init`; `--device`,
  `--dtype`, `--seed`; TorchTitan overrides after `--`;
- `load_model(args, overrides)`: the model built as training builds it (same layer map, a
  checkpoint with another map refused), its weights, its tokenizer;
- `run_main(prog, run, argv)`: every bad input ends in one line naming the flag and the
  value, exit status 2;
- `write_json(path, obj)`, `write_text(path, text)`: results written whole or not at all.
"""

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from titan_linear.config_errors import first_line

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
DEVICES = ("cpu", "cuda")


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every bad input is one line."""

    def error(self, message):
        raise ValueError(message)


def model_parser(prog: str, description: str | None) -> Parser:
    """A parser with the model flags (`--config`, `--checkpoint` / `--random-init`, device, dtype, seed)."""
    p = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training TOML the checkpoint was trained with")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="<dump_folder>/checkpoint/step-N (or the checkpoint folder: newest step)")
    src.add_argument("--random-init", action="store_true", help="random weights, no checkpoint (timing, tests)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and --random-init")
    p.add_argument("--device", default=None, help="cpu or cuda; default cuda when there is one")
    p.add_argument("--dtype", default=None, help="bf16 or fp32; default bf16 on cuda, fp32 on cpu")
    return p


def check_at_least(flag: str, value, minimum: int = 1) -> None:
    """Raise the one-line ValueError for an integer flag below `minimum`; None (not given) passes."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} = {value} is not allowed: an integer >= {minimum}")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own flags, TorchTitan overrides after `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def device_and_dtype(args):
    """(torch.device, "bf16" | "fp32") from `--device` / `--dtype`; raises ValueError naming the flag."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise ValueError(f"--device = {device!r} is not allowed: one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device = 'cuda' is not allowed: no CUDA device is visible here")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype = {dtype!r} is not allowed: one of {', '.join(DTYPES)}")
    return torch.device(device), dtype


@dataclass
class Loaded:
    """A model ready to run, and what it was built from."""

    job_config: Any
    model_args: Any
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any  # a torch.dtype
    source: str  # the checkpoint path, or "random init"
    dtype_name: str = "fp32"  # as --dtype names it: "bf16" or "fp32"

    @property
    def layer_map(self) -> str:
        return getattr(self.model_args, "layer_map", "S" * self.model_args.n_layers)

    def describe(self) -> dict:
        """What a result file records about the model."""
        return {
            "config": self.job_config.job.config_file, "model": self.job_config.model.name,
            "flavor": self.job_config.model.flavor, "layer_map": self.layer_map,
            "n_layers": self.model_args.n_layers, "dim": self.model_args.dim,
            "training_seq_len": self.job_config.training.seq_len, "weights": self.source,
            "device": self.device.type, "dtype": self.dtype_name,
        }


def load_model(args, overrides: list[str], max_len: int | None = None) -> Loaded:
    """Build the model of `--config` (plus overrides), load `--checkpoint` or init from `--seed`,
    cast to `--dtype`, cover `max_len` positions with the RoPE table, eval mode.

    Raises ValueError naming the flag for a missing config or checkpoint.
    """
    import torch

    from titan_linear.inference import prepare_model
    from titan_linear.models.fused import fuse_projections
    from titan_linear.inference.build import (
        build_model, build_tokenizer, find_checkpoint, load_model_weights, parse_job_config,
    )

    if not os.path.isfile(args.config):
        raise ValueError(f"--config = {args.config!r} is not allowed: no such file")
    device, dtype = device_and_dtype(args)
    if args.checkpoint is not None:
        find_checkpoint(args.checkpoint)  # a bad path fails before the model is built
    job_config, model_args = parse_job_config(args.config, overrides)
    tokenizer = build_tokenizer(job_config)
    model = build_model(job_config, model_args, device, seed=args.seed)
    source = "random init" if args.random_init else load_model_weights(model, args.checkpoint)
    torch_dtype = getattr(torch, DTYPES[dtype])
    prepare_model(model, torch_dtype, max_len=max_len)
    # q, k, v and w1, w3 as one product each: on an H200 a batch-1 decode step of the 1B shape
    # took 1.30 ms instead of 1.45 (benchmarks/results/inference_h200_fused.json); equal up to
    # rounding, and no weight is stored twice (models/fused.py).
    fuse_projections(model)
    return Loaded(job_config, model_args, model, tokenizer, device, torch_dtype, source, dtype)


def write_text(path: str, text: str, mode: int | None = None) -> None:
    """Write `text` (UTF-8, as it is) to `path` through a temporary file, so a failure leaves
    nothing half-written; `mode`: the file's permission bits (e.g. 0o755), else the default."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as JSON to `path`, whole or not at all (`write_text`)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def run_main(prog: str, run: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Call `run(argv)`; a ValueError becomes one line `<prog>: error: ...` and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # TorchTitan logs on the root logger and DCP warns that it loads in one process:
    # neither concerns a command whose output is its result.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return run(argv)
    except ValueError as e:
        print(f"{prog}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or tyro's own message on a bad TorchTitan override
        return 0 if e.code in (0, None) else 2
    finally:
        root.setLevel(level)
