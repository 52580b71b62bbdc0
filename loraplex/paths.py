"""Where loraplex keeps its data: models, adapters, MLflow store, indexes, keys (LORAPLEX_HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The data directory: $LORAPLEX_HOME, default ~/.cache/loraplex. Created on first use."""
    root = Path(os.environ.get("LORAPLEX_HOME") or Path.home() / ".cache" / "loraplex").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def subdir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
