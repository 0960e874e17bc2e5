"""The one-line error of a bad setting, and the type checks that TOML values need.

Every refusal of a job-config value reads `<key> = <value> is not allowed: <what is>`,
so a user sees the key, what they gave and what to give instead on one line.
"""


class ConfigError(ValueError):
    """A bad setting in the job config; the message names the key, value and what is allowed."""


def bad_value(key: str, value, allowed: str) -> ConfigError:
    """The error for `key = value`, e.g. bad_value("model.n_heads", 7, "a divisor of model.dim = 256")."""
    return ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def checked_bool(key: str, value) -> bool:
    """`value` if it is a real boolean; else the one-line error. A TOML string ("false") would
    be truthy, so a switch is never cast with bool()."""
    if not isinstance(value, bool):
        raise bad_value(key, value, "true or false")
    return value


def is_number(x) -> bool:
    """An int or float from TOML or the command line; False for bools (a TOML `true` is not 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x) -> bool:
    """An int from TOML or the command line; False for bools."""
    return isinstance(x, int) and not isinstance(x, bool)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    command prints of a failure, so that every failure is one line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
