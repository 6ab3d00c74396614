"""Paths as committed results show them: relative to the repository, never one machine's absolute path."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown_path(path: str | Path) -> str:
    """A local path relative to the repository (`../shared/models/...`); a Hub id, or a path that does not exist, as
    it was given."""
    return os.path.relpath(path, ROOT) if Path(path).exists() else str(path)
