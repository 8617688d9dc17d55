"""Whether the Hugging Face hub can be used right now, decided quickly.

Hub presets must fail before any heavy work when the machine is offline, so the check honours
``HF_HUB_OFFLINE`` and otherwise makes one short request to the hub's endpoint.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

_TRUE = {"1", "true", "yes", "on"}


def env_flag(var: str) -> bool:
    """True when the environment variable ``var`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(var, "").strip().lower() in _TRUE


def offline_requested() -> bool:
    """True when the user asked for offline mode through the standard environment variables."""
    return any(env_flag(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when offline mode is off and the hub endpoint answers within ``timeout`` seconds."""
    if offline_requested():
        return False
    return _endpoint_answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


@functools.lru_cache(maxsize=4)
def _endpoint_answers(url: str, timeout: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True
