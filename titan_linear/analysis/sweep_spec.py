"""A sweep spec (TOML) read, checked and expanded into named runs; see docs/sweeps.md.

    base = "train_configs/sweep_30m.toml"    # the training TOML every run starts from
    out = "outputs/sweeps/ratio_sweep"       # one dump folder per run under it
    prefix = "linearized"                    # optional: starts every run's name and group
    [fixed]                                  # overrides for every run
    "training.steps" = 2000
    [grid]                                   # the cartesian product of these lists
    "model.linear_attn_ratio" = [0, 0.25, 0.5, 0.75, 1.0]
    "debug.seed" = [0, 1, 2]
    [[runs]]                                 # extra points; a list here is a small grid
    "model.linear_attn_ratio" = [0.5, 0.75]
    "model.linear_attn_placement" = ["front", "middle", "back"]
    "debug.seed" = [0, 1, 2]
    [eval]                                   # optional, used by --eval
    factors = [1, 4]                         # perplexity at 1x and 4x training.seq_len
    max_tokens = 262144                      # per length (default: the whole validation set)
    harness_tasks = ["titan_linear_shakespeare"]  # also lm-eval tasks (default: none)
    harness_limit = 100                      # documents per task (default: all)
    [slurm]                                  # optional, used by --slurm
    options = ["--partition=gpu", "--time=04:00:00"]

Keys are TorchTitan / titan_linear config keys in dotted form. Every key is looked up in the
job config's dataclasses (TorchTitan's JobConfig merged with titan_linear.config) and every
value checked against the field's type before anything runs; values that the model or the
recipe refuse (a ratio outside [0, 1], an unknown placement, ...) are found by building each
run's config exactly as `python -m titan_linear.launch check` does. A list-typed key (e.g.
`model.linear_attn_layers`) takes a list of lists in [grid]; in [[runs]] a plain list is one
value of it.

A run's name joins the values of the keys that differ between runs, in spec order with the seed
last (`ratio0.5-front-seed1`); its group is the name without the seed part. A switched-on boolean
shows as its label alone and a switched-off one not at all (`ratio1.0-gate-conv4-seed0`), and so
does an option at the value that switches it off (`linear_attn_short_conv = 0`: no `conv0`). A key
whose value follows from the seed alone (e.g. a checkpoint per seed in
`checkpoint.initial_load_path`) stays out of names, so that the seeds of one configuration share
a group. Two points that end up with the same name are the same run and are run once.
"""

import dataclasses
import difflib
import itertools
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from titan_linear.config_errors import is_int, is_number

SEED_KEY = "debug.seed"
# Keys the driver sets itself for every run.
DRIVER_KEYS = ("job.config_file", "job.dump_folder", "job.custom_config_module")
# Switches the driver turns on for every run, and why a spec may not turn them off.
DRIVER_ON = {
    "checkpoint.enable": "sweeps need checkpoints (to skip finished runs and resume cut ones)",
    "metrics.enable_tensorboard": "titan_linear.analysis.runs reads each run's TensorBoard events",
}
TOP_KEYS = ("base", "out", "prefix", "fixed", "grid", "runs", "eval", "slurm")
EVAL_KEYS = ("factors", "max_tokens", "harness_tasks", "harness_limit")
SLURM_KEYS = ("options",)
# Option keys whose value switches the option off: such a value shows in no name.
OFF_VALUES = {"model.linear_attn_short_conv": 0, "model.linear_attn_decay_rates": "head"}
# How a key shows in run names; other keys show as their last part (`lr0.0008`).
LABELS = {
    "model.linear_attn_ratio": "ratio",
    "model.linear_attn_placement": "",
    "model.linear_attn_layers": "layers",
    "model.flavor": "",
    "model.n_layers": "L",
    "model.dim": "d",
    "training.steps": "steps",
    "model.linear_attn_temperature": "tau",
    "model.linear_attn_learned_temperature": "learned_tau",
    "model.linear_attn_output_norm": "norm",
    "model.linear_attn_output_gate": "gate",
    "model.linear_attn_short_conv": "conv",
    "model.linear_attn_decay": "decay",
    "model.linear_attn_decay_rates": "rates-",
    SEED_KEY: "seed",
}


@dataclass
class Run:
    """One training run of a sweep."""

    name: str
    group: str
    overrides: dict[str, Any]  # dotted key -> value: [fixed] plus this point's own values
    dump_folder: str
    seed: int | None = None  # the run's debug.seed, filled in by the check
    steps: int = 0  # training.steps, filled in by the check
    job_config: Any = None  # the checked TorchTitan JobConfig

    def record(self, base_config: str) -> dict:
        """What `<dump_folder>/run.json` holds (read by titan_linear.analysis)."""
        return {"name": self.name, "group": self.group, "base_config": base_config,
                "overrides": self.overrides, "seed": self.seed}


@dataclass
class Spec:
    path: str
    base: str
    out: str
    runs: list[Run]
    eval_factors: list[int] = field(default_factory=lambda: [1, 4])
    eval_max_tokens: int | None = None
    slurm_options: list[str] = field(default_factory=list)
    eval_harness_tasks: list[str] = field(default_factory=list)
    eval_harness_limit: int | None = None


def _where(section: str, index: int | None = None) -> str:
    return f"[[runs]] entry {index + 1}" if index is not None else f"[{section}]"


def field_type(job_config, key: str, where: str):
    """The annotated type of the dotted `key` in the parsed job config; ValueError naming it otherwise."""
    obj, parts = job_config, key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if part not in names:
            section = ".".join(parts[:depth]) or "the job config"
            keys = all_keys(job_config)
            # The same key name in another section first (training.seed -> debug.seed).
            close = [k for k in keys if k.rsplit(".", 1)[-1] == parts[-1]]
            close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where} {key!r} is not allowed: {part!r} is not a key of {section}{hint}")
        tp = next(f.type for f in dataclasses.fields(obj) if f.name == part)
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        raise ValueError(f"{where} {key!r} is not allowed: a section, not a key (name one of its keys)")
    return tp


def all_keys(job_config, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(job_config):
        value = getattr(job_config, f.name)
        if dataclasses.is_dataclass(value):
            out += all_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def fits(value, tp) -> bool:
    """Whether a TOML value can stand for a field of type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args if a is not type(None))
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_number(value)
    if tp is str:
        return isinstance(value, str)
    return not isinstance(value, (dict, list))


def _is_list_type(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_list_type(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is list


def check_value(key: str, value, tp, where: str) -> None:
    if key in DRIVER_KEYS:
        raise ValueError(f"{where} {key} is not allowed: the sweep driver sets it for every run")
    if key in DRIVER_ON and value is not True:
        raise ValueError(f"{where} {key} = {value!r} is not allowed: {DRIVER_ON[key]}; leave it out")
    if not fits(value, tp):
        raise ValueError(f"{where} {key} = {value!r} is not allowed: {_describe(tp)}")


def _choices(key: str, value, tp, where: str, single_allowed: bool) -> list:
    """The candidate values a [grid] / [[runs]] entry lists for `key`."""
    if _is_list_type(tp):
        if single_allowed and isinstance(value, list) and not any(isinstance(v, list) for v in value):
            return [value]
        if not (isinstance(value, list) and value and all(isinstance(v, list) for v in value)):
            raise ValueError(f"{where} {key} = {value!r} is not allowed: a list of values, each {_describe(tp)}")
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where} {key} = [] is not allowed: a non-empty list of values")
        return value
    if single_allowed:
        return [value]
    raise ValueError(f"{where} {key} = {value!r} is not allowed: a list of values ({_describe(tp)} each)")


def _product(table: dict, types_: dict, where: str, single_allowed: bool) -> list[dict]:
    keys = list(table)
    lists = [_choices(k, table[k], types_[k], where, single_allowed) for k in keys]
    for k, values in zip(keys, lists):
        for v in values:
            check_value(k, v, types_[k], where)
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def _label(value) -> str:
    if isinstance(value, list):
        text = "_".join(_label(v) for v in value) or "none"
    elif isinstance(value, bool):
        text = "on" if value else "off"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _part(key: str, value) -> str:
    """How one key's value shows in a run name: a switched-on boolean option by its label alone,
    a switched-off one not at all (`gate`, not `linear_attn_output_gateon`)."""
    label = LABELS.get(key, key.rsplit(".", 1)[-1])
    if isinstance(value, bool):
        return label if value else ""
    if key in OFF_VALUES and value == OFF_VALUES[key]:
        return ""  # an option at its "off" value, like a switched-off boolean (not `conv0`)
    return f"{label}{_label(value)}"


def effective(job_config, key: str):
    obj = job_config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def name_runs(points: list[dict], key_order: list[str], base_job_config, fallback: str) -> list[tuple[str, str]]:
    """(name, group) per point, from the values of the keys that differ between points."""
    def value(point, key):
        return point[key] if key in point else effective(base_job_config, key)

    def per_seed(key):
        # A key whose value follows from the seed alone (a checkpoint per seed to start from,
        # say) would split a configuration's seeds into groups of one: it stays out of names.
        if key == SEED_KEY or SEED_KEY not in varying:
            return False
        seen = {}
        return all(seen.setdefault(repr(value(p, SEED_KEY)), repr(value(p, key))) == repr(value(p, key))
                   for p in points)

    varying = [k for k in key_order if len({repr(value(p, k)) for p in points}) > 1]
    varying = [k for k in varying if not per_seed(k)]
    varying.sort(key=lambda k: k == SEED_KEY)  # the seed last
    out = []
    for p in points:
        parts = [(k, _part(k, value(p, k))) for k in varying]
        name = "-".join(text for _, text in parts if text) or fallback
        group = "-".join(text for k, text in parts if k != SEED_KEY and text) or fallback
        out.append((name, group))
    return out


def read_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"SPEC = {path!r} is not allowed: no such file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"SPEC = {path!r} is not valid TOML: {e}") from None


def _table(raw: dict, name: str, allowed: tuple[str, ...] | None = None) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{name}] = {value!r} is not allowed: a table")
    for k in value:
        if allowed is not None and k not in allowed:
            raise ValueError(f"[{name}] {k} is not allowed: one of {', '.join(allowed)}")
    return value


def load_spec(path: str, parse_base) -> Spec:
    """Read and expand the spec at `path`; raises ValueError (one line) on anything wrong.

    Args:
        path: the spec TOML.
        parse_base: callable(base, overrides) -> the parsed TorchTitan JobConfig of the base
            config plus the overrides {dotted key: value} (raises ValueError naming a bad value).
    """
    raw = read_toml(path)
    for k in raw:
        if k not in TOP_KEYS:
            raise ValueError(f"{k} is not allowed in a sweep spec: top-level keys are {', '.join(TOP_KEYS)}")
    for k in ("base", "out"):
        if not isinstance(raw.get(k), str) or not raw[k]:
            raise ValueError(f"{k} = {raw.get(k)!r} is not allowed: a path (string) is required")
    base, out = os.path.normpath(raw["base"]), os.path.normpath(raw["out"])
    if not os.path.isfile(base):
        raise ValueError(f"base = {raw['base']!r} is not allowed: no such file (relative paths are taken from the current directory)")
    prefix = raw.get("prefix", "")
    if not (isinstance(prefix, str) and re.fullmatch(r"[A-Za-z0-9._-]*", prefix)):
        raise ValueError(f"prefix = {prefix!r} is not allowed: letters, digits, '.', '_' and '-' only "
                         "(it starts run names and folder names)")
    fixed, grid = _table(raw, "fixed"), _table(raw, "grid")
    entries = raw.get("runs", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"runs = {entries!r} is not allowed: write each extra point as a [[runs]] table")
    if not grid and not entries:
        raise ValueError(f"SPEC = {path!r} is not allowed: it names no run (add a [grid] or [[runs]] table)")
    ev, slurm = _table(raw, "eval", EVAL_KEYS), _table(raw, "slurm", SLURM_KEYS)

    # The base config gives the dataclasses (TorchTitan's merged with ours); with [fixed], the
    # value of every key that a point leaves out.
    job_config = parse_base(base, {})
    types_ = {}
    for where, table in [("[fixed]", fixed), ("[grid]", grid)] + [(_where("runs", i), e) for i, e in enumerate(entries)]:
        for key in table:
            types_[key] = field_type(job_config, key, where)
    for key, value in fixed.items():
        check_value(key, value, types_[key], "[fixed]")
    base_job_config = parse_base(base, fixed)

    points = _product(grid, types_, "[grid]", False) if grid else []
    for i, entry in enumerate(entries):
        points += _product(entry, types_, _where("runs", i), True)
    order = list(dict.fromkeys([*grid, *(k for e in entries for k in e)]))
    fallback = os.path.splitext(os.path.basename(base))[0]
    runs, seen = [], set()
    for point, (name, group) in zip(points, name_runs(points, order, base_job_config, fallback)):
        if prefix:
            # Tells apart runs of two specs whose varying keys read the same (a report groups by name).
            name, group = (f"{prefix}-{x}" if x != fallback else prefix for x in (name, group))
        if name in seen:
            continue  # the same settings listed twice (e.g. by [grid] and [[runs]])
        seen.add(name)
        runs.append(Run(name, group, {**fixed, **point}, os.path.join(out, name)))
    # Seed-major order: every configuration's first seed before any second seed.
    seed_order = list(dict.fromkeys(repr(r.overrides.get(SEED_KEY)) for r in runs))
    runs.sort(key=lambda r: seed_order.index(repr(r.overrides.get(SEED_KEY))))

    factors = ev.get("factors", [1, 4])
    if not (isinstance(factors, list) and factors and all(is_int(f) and f >= 1 for f in factors)
            and len(set(factors)) == len(factors)):
        raise ValueError(f"[eval] factors = {factors!r} is not allowed: a list of distinct integers >= 1")
    max_tokens = ev.get("max_tokens")
    if max_tokens is not None and not (is_int(max_tokens) and max_tokens >= 1):
        raise ValueError(f"[eval] max_tokens = {max_tokens!r} is not allowed: an integer >= 1")
    tasks = ev.get("harness_tasks", [])
    if not (isinstance(tasks, list) and all(isinstance(t, str) and t and not t.startswith("-") and " " not in t
                                            for t in tasks)):
        raise ValueError(f"[eval] harness_tasks = {tasks!r} is not allowed: a list of lm-eval task names")
    limit = ev.get("harness_limit")
    if limit is not None and not (is_int(limit) and limit >= 1):
        raise ValueError(f"[eval] harness_limit = {limit!r} is not allowed: an integer >= 1")
    options = slurm.get("options", [])
    if not (isinstance(options, list) and all(isinstance(o, str) and o.startswith("-") for o in options)):
        raise ValueError(f"[slurm] options = {options!r} is not allowed: a list of sbatch options such as '--time=04:00:00'")
    return Spec(path, base, out, runs, factors, max_tokens, options, tasks, limit)


def cli_args(overrides: dict[str, Any] | list) -> list[str]:
    """TorchTitan command-line overrides for `overrides` ({dotted key: value}, as a spec and
    run.json hold them), as its parser (tyro) reads them; a list of arguments passes as is."""
    if isinstance(overrides, list):
        return [str(x) for x in overrides]
    out = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            section, _, name = key.rpartition(".")
            out.append(f"--{key}" if value else f"--{section}.no-{name}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", *(str(v) for v in value)]
        else:
            out += [f"--{key}", str(value)]
    return out
