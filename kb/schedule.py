"""The scheduled sync's state: each source's last fetch (its failures, when to try it again) and the last pass.

Kept in ``KB_HOME/jobs/watch.json``, written by whichever process runs the schedule (the dashboard's job queue or
``kb watch``) and read by the dashboard's Home and Sources pages through the ``KnowledgeBase`` facade: plain state,
below both the queue and the facade.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from core import atomic

WATCH_FILE = "watch.json"
BACKOFF_CAP = 6 * 3600.0  # the longest wait before retrying a failing remote
DUE_SLACK = 0.1  # of an interval: a retry is due at a pass that starts this much before its time


class WatchState:
    """Per-source outcome of the scheduled fetches, in ``KB_HOME/jobs/watch.json`` (dashboard and ``kb watch``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict:
        data = atomic.read_json(self.path) or {}
        data.setdefault("sources", {})
        return data

    def _change(self, fn: Callable[[dict], None]) -> None:
        with self._lock:
            data = self.load()
            fn(data)
            atomic.write_json(self.path, data, ensure_ascii=False, default=str, indent=1)

    def due(self, name: str, now: float) -> bool:
        entry = self.load()["sources"].get(name)
        return not entry or not entry.get("failures") or now >= float(entry.get("next_try") or 0)

    def failed(self, name: str, error: str, at: float, every: float) -> None:
        def fn(data: dict) -> None:
            e = data["sources"].setdefault(name, {})
            e["failures"] = int(e.get("failures") or 0) + 1
            e["last_error"] = error
            e["last_failure"] = at
            wait = min(max(every, 1.0) * 2 ** (e["failures"] - 1), max(every, BACKOFF_CAP))
            # due at the pass that many intervals on, which may start a little early: a pass's clock starts when
            # its job does, after any job queued before it (a review saw the first retry come two intervals late)
            e["next_try"] = at + wait - DUE_SLACK * max(every, 1.0)
        self._change(fn)

    def succeeded(self, name: str, at: float) -> None:
        def fn(data: dict) -> None:
            e = data["sources"].setdefault(name, {})
            e.update(failures=0, last_ok=at, next_try=None)
        self._change(fn)

    def ran(self, at: float, every: float, origin: str) -> None:
        self._change(lambda data: data.update(last_run=at, every=every, origin=origin))


def schedule_status(home: Path, every: float) -> dict:
    """The scheduled sync at a glance: this process's interval (0: off), and the last pass on ``home``, whoever ran
    it (``origin``: "schedule" for the dashboard's, "cli" for ``kb watch`` or ``kb watch --once``)."""
    data = WatchState(home / "jobs" / WATCH_FILE).load()
    last = data.get("last_run")
    return {"every": every, "last_run": last, "origin": data.get("origin"), "last_every": data.get("every"),
            "next_run": (last + every) if (last and every) else None}


def sync_failures(home: Path, names: list[str] | None = None) -> list[dict]:
    """Sources whose scheduled fetch or sync is failing now: the last error, when, how often, next retry.

    ``names`` limits it to sources that still exist. Sorted by source name;
    empty when every remote answered at its last try.
    """
    data = WatchState(home / "jobs" / WATCH_FILE).load()
    out = []
    for name, e in sorted(data["sources"].items()):
        if not e.get("failures") or (names is not None and name not in names):
            continue
        out.append({"source": name, "failures": int(e["failures"]), "last_error": e.get("last_error", ""),
                    "last_failure": e.get("last_failure"), "next_try": e.get("next_try"), "last_ok": e.get("last_ok")})
    return out
