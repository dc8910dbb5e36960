"""Where a command may write: checked before any work, so a bad output path is one line, not a traceback
after hours of sampling."""

from __future__ import annotations

import os
from pathlib import Path


def writable(path: Path) -> bool:
    """Whether path (a file or folder, existing or not) can be written: it exists and is writable, or its
    nearest existing ancestor is a writable folder."""
    path = Path(path)
    if path.exists():
        return os.access(path, os.W_OK)
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    return parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
