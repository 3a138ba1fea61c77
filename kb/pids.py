"""Whether a process of this machine still runs: what a job record or an export's leftovers were written by."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """A process that has ended is gone; one we may not signal (another user's) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
