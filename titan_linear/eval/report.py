"""What the evaluation tools share beyond `titan_linear.cli`: peak memory and lazy matplotlib."""

import resource
import sys

import torch


def pyplot(flag: str = "--plot"):
    """matplotlib.pyplot (Agg backend), or a one-line ValueError naming `flag` when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError(f"{flag} is not allowed: matplotlib is not installed (pip install matplotlib)") from e
    return plt


def save_figure(plt, fig, path: str, title: str | None = None) -> None:
    """Title, tight layout, PNG at 120 dpi, close: how every evaluation tool writes its plot."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """{"peak_memory_bytes": CUDA max_memory_allocated since the last reset (None on CPU),
    "peak_rss_bytes": the process's peak resident set so far (whole run, not per length)}."""
    cuda = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        cuda = int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return {"peak_memory_bytes": cuda, "peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
