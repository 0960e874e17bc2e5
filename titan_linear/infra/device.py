"""Let TorchTitan 0.2.2 train on a machine without an accelerator.

TorchTitan decides its device at import time (`device_type = ... or "cuda"` in
torchtitan/tools/utils.py) and several modules copy `device_type` /
`device_module` by name. On a CPU-only machine we point all of those at "cpu"
and at `CpuDeviceModule`, which answers the calls TorchTitan makes of
`torch.cuda`. Nothing in torchtitan's files is edited; this runs when
`titan_linear` is imported, which both our launcher and a stock
`python -m torchtitan.train` with `[experimental] custom_import` do before the
Trainer reads `utils.device_type`.
"""

import logging
import os
import warnings
import platform
import resource
import sys
from types import SimpleNamespace

import torch


class CpuDeviceModule:
    """The subset of the `torch.cuda` API that TorchTitan calls, answered for the CPU."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"CPU ({platform.processor() or platform.machine()})"

    @staticmethod
    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return SimpleNamespace(name=CpuDeviceModule.get_device_name(), total_memory=total)

    @staticmethod
    def memory_stats(device=None) -> dict:
        # Peak resident memory of this process stands in for the allocator's peaks.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def has_accelerator() -> bool:
    return torch._utils._get_available_device_type() is not None


def use_cpu_if_no_accelerator() -> bool:
    """Point TorchTitan at the CPU when no accelerator exists. Returns True if it did."""
    if has_accelerator() or os.environ.get("TITAN_LINEAR_NO_CPU_SHIM"):
        return False
    import torchtitan.tools.utils as tt_utils  # noqa: F401 (loads the modules to patch)
    import torchtitan.components.metrics  # noqa: F401
    import torchtitan.distributed.parallel_dims  # noqa: F401
    import torchtitan.distributed.utils  # noqa: F401
    import torchtitan.tools.profiling  # noqa: F401

    # MFU has no meaning on a CPU: a peak of inf logs it as 0 % without torchtitan running
    # `lspci` and warning that it falls back to an A100's peak.
    tt_utils.get_peak_flops = lambda device_name: float("inf")
    # fp32 training on a CPU asks torch for an fp32 autocast, which it skips with a warning per step.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    shim = CpuDeviceModule()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("torchtitan") or mod is None:
            continue
        if getattr(mod, "device_type", None) == "cuda":
            mod.device_type = "cpu"
        if getattr(mod, "device_module", None) is torch.cuda:
            mod.device_module = shim
    return True


def is_cpu_run() -> bool:
    import torchtitan.tools.utils as tt_utils

    return tt_utils.device_type == "cpu"


class _DropBuiltinTokenizerWarning(logging.Filter):
    """Drops TorchTitan's "HF assets path builtin does not exist!": "builtin" (or "") names the
    tokenizer packaged with titan_linear (data/tokenizer.py), not a path."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return msg not in ("HF assets path builtin does not exist!", "HF assets path  does not exist!")


def quiet_builtin_tokenizer_warning() -> None:
    """Install the filter on the root logger, which TorchTitan logs through."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropBuiltinTokenizerWarning) for f in root.filters):
        root.addFilter(_DropBuiltinTokenizerWarning())
