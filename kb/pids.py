"""Whether a process of this machine still runs: what a job record or an export's leftovers were written by."""

from __future__ import annotations

import os
from pathlib import Path


def started(pid: int) -> str | None:
    """When the process began, in the kernel's clock ticks since boot (``/proc/PID/stat`` field 22); None unknown.

    A pid is reused once its process ends: a job's marker whose pid now names another process (a day later, after
    a reboot) would be taken as still running and its death never logged. The pair (pid, start) names one process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return stat.rsplit(b")", 1)[1].split()[19].decode()  # the fields after the command name start at field 3
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def alive(pid: int, since: str | None = None) -> bool:
    """A process that has ended is gone; one we may not signal (another user's) still runs.

    ``since`` (what :func:`started` said when the record was written) tells a reused pid from the writer: a
    process that started at another time is not it. Unknown on either side (no /proc, an old record): the pid decides.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if since is None:
        return True
    now = started(pid)
    return now is None or now == since
