"""Which TorchTitan DCP checkpoint a run or a tool would load, and whether it is intact.

TorchTitan 0.2.2 saves `<dump_folder>/<checkpoint.folder>/step-N/` with a pickled
`.metadata` file and `__R_0.distcp` data files; on resume it takes the newest
`step-N` that has a `.metadata` (or `checkpoint.load_step`). Two failures reach a
user as bare tracebacks there: a step folder whose save was cut before its
`.metadata` is skipped without a word, and a truncated `.metadata` or data file
gives an `EOFError` or a short read naming no file. Here both are found before
anything runs, by reading the metadata and comparing each data file's size with
the byte ranges the metadata records (no tensor data is read), and reported in
one line that names the folder, the file and the newest intact earlier step.
"""

import os
import pickle
import re
import warnings

_STEP = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the folder and the file."""


def checkpoint_folder(job_config) -> str:
    """`<dump_folder>/<checkpoint.folder>`, where TorchTitan saves and resumes."""
    return os.path.join(job_config.job.dump_folder, job_config.checkpoint.folder)


def step_folders(folder: str) -> dict[int, str]:
    """{N: path} for every `step-N` directory in `folder` (complete or not)."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in os.listdir(folder):
        m = _STEP.fullmatch(name)
        if m and os.path.isdir(os.path.join(folder, name)):
            out[int(m.group(1))] = os.path.join(folder, name)
    return out


def complete_steps(steps: dict[int, str]) -> list[int]:
    """The steps of `step_folders` whose save finished (their `.metadata` exists), sorted."""
    return sorted(s for s, p in steps.items() if os.path.isfile(os.path.join(p, ".metadata")))


def problem(path: str) -> str | None:
    """Why the DCP checkpoint at `path` cannot be loaded, or None when it is intact.

    Reads only `.metadata` and the data files' sizes.
    """
    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        return f"{meta_path} is missing (the save was cut short)"
    try:
        with open(meta_path, "rb") as f:
            metadata = pickle.load(f)
        storage = metadata.storage_data
    except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError, ...
        return f"{meta_path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'})"
    needed: dict[str, int] = {}
    for info in (storage or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        size = os.path.getsize(file)
        if size < end:
            return f"{file} is truncated ({size:,} bytes; its metadata needs {end:,})"
    return None


def _intact_before(steps: dict[int, str], step: int) -> int | None:
    for s in sorted((s for s in steps if s < step), reverse=True):
        if problem(steps[s]) is None:
            return s
    return None


def _way_back(steps: dict[int, str], step: int, flag: str) -> str:
    earlier = _intact_before(steps, step)
    if earlier is None:
        return "no earlier step is intact"
    return f"step-{earlier} is intact: resume from it with {flag} {earlier}"


def resume_step(job_config) -> tuple[int | None, list[str]]:
    """The step a run of `job_config` would resume from (None: it starts fresh) and notes to log.

    Raises CheckpointError when that checkpoint is damaged or `checkpoint.load_step`
    names a step that does not exist.
    """
    ckpt = job_config.checkpoint
    if not ckpt.enable:
        return None, []
    folder = checkpoint_folder(job_config)
    steps = step_folders(folder)
    notes = []
    if ckpt.load_step != -1:
        step = ckpt.load_step
        if step not in steps:
            have = ", ".join(str(s) for s in sorted(steps)) or "none"
            raise CheckpointError(
                f"checkpoint.load_step = {step} is not allowed: {folder} has no step-{step} "
                f"(steps there: {have})"
            )
    else:
        complete = complete_steps(steps)
        step = complete[-1] if complete else None
        for s in sorted(steps):
            if s not in complete and (step is None or s > step):
                notes.append(
                    f"titan_linear: checkpoint {steps[s]} is incomplete (no .metadata: its save was "
                    f"cut short) and is skipped; "
                    + (f"resuming from step-{step}" if step is not None else "starting fresh")
                )
        if step is None:
            return None, notes
    why = problem(steps[step])
    if why is not None:
        raise CheckpointError(
            f"checkpoint {steps[step]} cannot be loaded: {why}; "
            f"{_way_back(steps, step, '--checkpoint.load_step')}"
        )
    return step, notes


def check_intact(path: str, flag: str = "--checkpoint") -> None:
    """Raise CheckpointError naming `path` and the damaged file when it cannot be loaded."""
    why = problem(path)
    if why is None:
        return
    parent = os.path.dirname(os.path.normpath(path))
    m = _STEP.fullmatch(os.path.basename(os.path.normpath(path)))
    msg = f"{flag} = {path!r} cannot be loaded: {why}"
    if m:
        steps = step_folders(parent)
        earlier = _intact_before(steps, int(m.group(1)))
        msg += ("; no earlier step is intact" if earlier is None
                else f"; step-{earlier} is intact: pass {flag} {steps[earlier]}")
    raise CheckpointError(msg)


def read_tensors(path: str, keys: list[str]) -> dict:
    """The tensors `keys` of the DCP checkpoint at `path` (those it has), read on the CPU."""
    import torch
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    out = {}
    for key in keys:
        for name in (key, f"model.{key}"):
            entry = saved.get(name)
            if entry is not None and hasattr(entry, "size"):
                out[name] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
                break
    if out:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming ... a single process": what is meant here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, checkpoint_id=path, no_dist=True)
    return {k.removeprefix("model."): v for k, v in out.items()}
