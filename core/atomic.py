"""Files written whole or not at all: a reader, or a crash, sees the old file or the new one, never half of one.

One way for every small JSON file the dashboard keeps (jobs, the schedule, conversations, a snapshot import's plan,
a model's verified stamp): a temporary file beside it, named for this process and thread so that two writers never
share one, renamed over it, and removed if the write fails.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict | None:
    """The JSON object a file holds; None when it is missing, unreadable or not an object (a reader never fails on
    a file another process is about to replace)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Any, *, durable: bool = False, **dump: Any) -> None:
    """``durable``: on disk before the rename (fsync), for a file that must outlive a power cut, not only a crash;
    ``dump``: json.dump's own options (``indent``, ``default``, ``ensure_ascii``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(data, fh, **dump)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
