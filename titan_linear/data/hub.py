"""Is the Hugging Face hub reachable, and does a string name a hub repo?

`datasets.load_dataset` retries an unreachable hub for about 25 s when DNS
fails, and for minutes where packets are dropped; a HEAD request with a short
timeout tells the same thing in seconds, so loaders ask it first.
"""

import re
import threading
import urllib.error
import urllib.request

from huggingface_hub import constants

# `org/name`: one slash, each part starting with a letter or digit (the hub's rule).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_repo_id(value: str) -> bool:
    """True for `org/name` strings such as "allenai/c4" (no leading ./ or /)."""
    return bool(_REPO_ID.fullmatch(value)) and ".." not in value


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE ask for the local cache only."""
    from datasets import config as datasets_config

    return bool(constants.HF_HUB_OFFLINE or datasets_config.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub's address (HF_ENDPOINT, default https://huggingface.co)."""
    return constants.ENDPOINT


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub answers an HTTP HEAD within `timeout` seconds.

    Any HTTP answer (even 401 or 404) counts as reachable. The request runs in a
    daemon thread because a stalled DNS lookup ignores socket timeouts.
    Proxies from HTTPS_PROXY / HTTP_PROXY are used, as urllib does by default.

    Args:
        timeout: seconds to wait in all. Default: 5.0.
    """
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(hub_endpoint(), method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered) and answered[0]
