"""Command-line entry points: `python -m titan_linear.launch {check,train} [torchtitan args]`.

`check` parses the job config exactly as training will, builds the model
arguments of the chosen flavor and validates every titan_linear key, then prints
the layer map. It runs before torchrun starts any process (run_train.sh), so a
bad value stops the run with one line and a non-zero exit before anything is
written. `train` runs the same check in every rank, then TorchTitan's own
training loop.
"""

import copy
import sys

CONFIG_MODULE = "titan_linear.config"
_CONFIG_FILE_FLAGS = ("--job.config_file", "--job.config-file")
_CUSTOM_FLAGS = ("--job.custom_config_module", "--job.custom-config-module")


def _with_config_module(argv: list[str]) -> list[str]:
    """Add `--job.custom_config_module titan_linear.config` unless the CLI or the TOML names one."""
    if any(a.split("=")[0] in _CUSTOM_FLAGS for a in argv):
        return argv
    import tomllib

    for i, a in enumerate(argv):
        key, _, value = a.partition("=")
        if key in _CONFIG_FILE_FLAGS:
            path = value or (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                with open(path, "rb") as f:
                    if tomllib.load(f).get("job", {}).get("custom_config_module"):
                        return argv
            except (OSError, tomllib.TOMLDecodeError):
                pass  # torchtitan reports it when it parses the file
    return [*argv, "--job.custom_config_module", CONFIG_MODULE]


def _config_file(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        key, _, value = a.partition("=")
        if key in _CONFIG_FILE_FLAGS:
            return value or (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def check(argv: list[str]):
    """Parse and validate the job config; return (job_config, model_args). Raises ValueError."""
    import os
    import tomllib

    path = _config_file(argv)
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"--job.config_file = {path!r} is not allowed: no such file")
        try:
            with open(path, "rb") as f:
                tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--job.config_file = {path!r} is not valid TOML: {e}") from None

    import titan_linear  # noqa: F401 (registers the train specs)
    from torchtitan.config import ConfigManager
    from torchtitan.protocols.train_spec import get_train_spec

    job_config = ConfigManager().parse_args(argv)
    try:
        spec = get_train_spec(job_config.model.name)
    except ValueError:
        raise ValueError(
            f"model.name = {job_config.model.name!r} is not allowed: a registered train spec "
            "such as 'llama3_mixed'"
        ) from None
    flavor = job_config.model.flavor
    if flavor not in spec.model_args:
        raise ValueError(
            f"model.flavor = {flavor!r} is not allowed: one of {', '.join(spec.model_args)}"
        )
    model_args = copy.deepcopy(spec.model_args[flavor])
    model_args.update_from_config(job_config)
    return job_config, model_args


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("check", "train"):
        print("usage: python -m titan_linear.launch {check,train} [torchtitan args]", file=sys.stderr)
        return 2
    command, rest = argv[0], _with_config_module(argv[1:])
    try:
        job_config, model_args = check(rest)
    except (ValueError, KeyError, TypeError) as e:
        print(f"titan_linear: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # tyro prints its own message on a bad CLI flag
        return int(e.code or 2)
    if command == "check":
        layers = getattr(model_args, "linear_layers", [])
        print(
            f"titan_linear: config OK: {job_config.model.name} {job_config.model.flavor}, "
            f"{model_args.n_layers} layers, layer map "
            f"{getattr(model_args, 'layer_map', 'S' * model_args.n_layers)} "
            f"({len(layers)} linear)"
        )
        return 0

    return _train(job_config)


def _train(job_config) -> int:
    """TorchTitan's own Trainer on an already parsed config (what `torchtitan.train.main` does,
    minus re-parsing sys.argv, whose default torchtitan binds at import time)."""
    import os

    import torch
    from torchtitan.tools.logging import init_logger
    from torchtitan.train import Trainer

    init_logger()
    trainer = None
    try:
        trainer = Trainer(job_config)
        if job_config.checkpoint.create_seed_checkpoint:
            assert int(os.environ["WORLD_SIZE"]) == 1, "create a seed checkpoint on one process"
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
