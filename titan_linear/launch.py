"""Command-line entry points before any rank starts.

    python -m titan_linear.launch check [torchtitan args]
    python -m titan_linear.launch run [torchrun args] -- [torchtitan args]

`check` parses the job config exactly as training will, builds the model arguments
of the chosen flavor (every titan_linear key and the recipe validated there), then
checks what would otherwise fail only inside a rank: the tokenizer and its vocab,
the training and validation data, the checkpoint a run would resume from (intact,
same layer maps) or start from (`checkpoint.initial_load_path`: every tensor fits,
titan_linear/initial_load.py) and the dump folder's lock. A problem stops it with one line
naming the key, the value and what is allowed, exit status 2, nothing written.

`run` (what run_train.sh calls) does `check`, takes the dump folder's lock (a second
run on the same folder is refused while this one lives), then runs torchrun in this
process with one `python -m titan_linear.train` per rank. A failed rank is reported
in one line (its own message) with exit status 1. Interrupting or killing the
launcher ends its ranks: torchrun stops them on SIGINT/SIGTERM, and each rank dies
with its parent otherwise (titan_linear/train.py).
"""

import copy
import fcntl
import logging
import os
import socket
import sys

from titan_linear.config_errors import first_line

CONFIG_MODULE = "titan_linear.config"
_CONFIG_FILE_FLAGS = ("--job.config_file", "--job.config-file")
_CUSTOM_FLAGS = ("--job.custom_config_module", "--job.custom-config-module")
LOCK_FILE = ".titan_linear.lock"


def with_config_module(argv: list[str]) -> list[str]:
    """Add `--job.custom_config_module titan_linear.config` unless the CLI or the TOML names one."""
    if any(a.split("=")[0] in _CUSTOM_FLAGS for a in argv):
        return argv
    import tomllib

    path = config_file(argv)
    if path is not None:
        try:
            with open(path, "rb") as f:
                if tomllib.load(f).get("job", {}).get("custom_config_module"):
                    return argv
        except (OSError, tomllib.TOMLDecodeError):
            pass  # check() reports it
    return [*argv, "--job.custom_config_module", CONFIG_MODULE]


def config_file(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        key, _, value = a.partition("=")
        if key in _CONFIG_FILE_FLAGS:
            return value or (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _parse(manager, argv: list[str]):
    """TorchTitan's parse; tyro's framed message on a bad command-line flag becomes one line."""
    import contextlib
    import io
    import re

    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            return manager.parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help: show it as tyro wrote it
            sys.stderr.write(box.getvalue())
            raise
        # The first section of the frame (before its first rule) says what is wrong.
        words = []
        for line in box.getvalue().splitlines()[1:]:
            inner = line.strip().strip("│╭╰").strip()
            if not inner or set(inner) <= set("─"):
                break
            words.append(inner)
        message = re.sub(r"\s+", " ", " ".join(words)) or "bad command-line arguments (see --help)"
        raise ValueError(message) from None


def check(argv: list[str]):
    """Parse and validate the job config; return (job_config, model_args). Raises ValueError."""
    import tomllib

    path = config_file(argv)
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

    job_config = _parse(ConfigManager(), argv)
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


def preflight(job_config, model_args) -> list[str]:
    """What can be checked before ranks start (tokenizer, data, resume or initial load, lock); returns notes.

    Raises ValueError naming the key and the value.
    """
    from titan_linear.checkpoint import checkpoint_folder, read_tensors, resume_step
    from titan_linear.data.preflight import check_data
    from titan_linear.data.tokenizer import BUILTIN, resolve_hf_assets_path
    from titan_linear.initial_load import initial_dcp_path, plan_for
    from titan_linear.models.maps import check_maps
    from torchtitan.protocols.train_spec import get_train_spec

    check_lock_free(job_config.job.dump_folder)
    hf = job_config.model.hf_assets_path
    directory = resolve_hf_assets_path(hf)
    vocab = _tokenizer_vocab(directory)
    if vocab is not None and vocab > model_args.vocab_size:
        raise ValueError(
            f"model.vocab_size = {model_args.vocab_size} is not allowed: at least the {vocab} ids of "
            f"the tokenizer of model.hf_assets_path = {hf or BUILTIN!r}"
        )
    check_data(job_config, vocab or model_args.vocab_size)
    step, notes = resume_step(job_config)
    if step is not None:
        path = os.path.join(checkpoint_folder(job_config), f"step-{step}")
        own = model_args.checkpoint_maps()
        try:
            check_maps(read_tensors(path, list(own)), own)
        except ValueError as e:
            raise ValueError(f"{e} (resuming from {path})") from None
        notes.append(f"titan_linear: resuming from {path}")
    elif (initial := initial_dcp_path(job_config)) is not None:
        notes += plan_for(initial, job_config, get_train_spec(job_config.model.name).model_cls, model_args).notes
    return notes


def _tokenizer_vocab(directory: str) -> int | None:
    """The vocab size of the tokenizer.json in `directory` (None: the tokenizer has none)."""
    from tokenizers import Tokenizer

    file = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    return Tokenizer.from_file(file).get_vocab_size()


def _lock_path(dump_folder: str) -> str:
    return os.path.join(dump_folder, LOCK_FILE)


def check_lock_free(dump_folder: str) -> None:
    """Raise ValueError when a live run holds `dump_folder`."""
    path = _lock_path(dump_folder)
    if not os.path.isfile(path):
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(
                f"job.dump_folder = {dump_folder!r} is not allowed: a live run holds it ({holder}); "
                "wait for it or stop it, or choose another dump_folder"
            ) from None
        fcntl.flock(f, fcntl.LOCK_UN)


def take_lock(dump_folder: str):
    """Hold `dump_folder`'s lock for this process's life; returns the open file (keep it)."""
    os.makedirs(dump_folder, exist_ok=True)
    f = open(_lock_path(dump_folder), "a+")  # not inherited by the ranks (close-on-exec)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        check_lock_free(dump_folder)  # held: raises naming the holder
        raise
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _error(e: BaseException) -> str:
    return f"titan_linear: error: {first_line(e)}"


def _checked(argv: list[str]):
    """(job_config, model_args, notes) or an exit status after printing the one-line error."""
    try:
        job_config, model_args = check(argv)
        notes = preflight(job_config, model_args)
    except (ValueError, KeyError, TypeError) as e:
        print(_error(e), file=sys.stderr)
        return 2
    except SystemExit as e:  # tyro prints its own message on a bad CLI flag
        return int(e.code or 2)
    for note in notes:
        print(note, file=sys.stderr)
    return job_config, model_args


def _run(torchrun_args: list[str], train_args: list[str], job_config) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    lock = None
    if int(os.environ.get("NNODES", "1")) == 1:
        # On several nodes the dump folder may be shared storage where locks do not hold.
        try:
            lock = take_lock(job_config.job.dump_folder)
        except ValueError as e:
            print(_error(e), file=sys.stderr)
            return 2
    # torchrun's agent repeats a rank's failure as a traceback block; the rank's own line says it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args([*torchrun_args, "-m", "titan_linear.train", *train_args]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        line = (message.strip().splitlines() or [""])[0]
        if not line.startswith("titan_linear:"):
            line = f"titan_linear: error: rank {rank} failed (exit code {failure.exitcode}): {line}"
        print(line, file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.close()
            try:
                os.remove(lock.name)
            except OSError:
                pass
    return 0


USAGE = ("usage: python -m titan_linear.launch check [torchtitan args]\n"
         "       python -m titan_linear.launch run [torchrun args] -- [torchtitan args]")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("check", "run"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    torchrun_args = []
    if command == "run":
        if "--" not in rest:
            print(USAGE, file=sys.stderr)
            return 2
        i = rest.index("--")
        torchrun_args, rest = rest[:i], rest[i + 1:]
    rest = with_config_module(rest)
    checked = _checked(rest)
    if isinstance(checked, int):
        return checked
    job_config, model_args = checked
    if command == "check":
        layers = getattr(model_args, "linear_layers", [])
        print(
            f"titan_linear: config OK: {job_config.model.name} {job_config.model.flavor}, "
            f"{model_args.n_layers} layers, layer map "
            f"{getattr(model_args, 'layer_map', 'S' * model_args.n_layers)} "
            f"({len(layers)} linear)"
        )
        return 0
    return _run(torchrun_args, rest, job_config)


if __name__ == "__main__":
    sys.exit(main())
