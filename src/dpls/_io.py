"""Atomic file writes: readers (and a crash) see the old file or the new one, never half of one.

Every small text or JSON file the project writes — metadata, configs, metrics, study state,
the README's generated section — goes through here: write a temporary file beside the
target, flush it to disk, rename it over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` by temporary file, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``obj`` as indented JSON (plus a final newline); ``dumps`` go to `json.dumps` (e.g. ``default=``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, **dumps) + "\n")
