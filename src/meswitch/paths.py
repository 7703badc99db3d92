"""Where meswitch keeps what it builds. One function, no module globals read deep in the stack."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root: ``$MESWITCH_CACHE`` if set, else ``~/.cache/meswitch``."""
    env = os.environ.get("MESWITCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meswitch"
