"""A log of what happened: jobs, searches, answers and errors, as JSON lines in ``KB_HOME/logs/kb.jsonl``.

Every record is one JSON object on one line, ``ts`` (UTC, ISO 8601 with
milliseconds, always 24 characters, so records compare as strings) and
``kind`` first, then ``pid`` and the kind's own fields:

- ``add`` (``source``, ``source_kind``, ``url``, ``branch``: a clone is a job too),
  ``sync``, ``upload``, ``rechunk``, ``verify`` (jobs, written by the
  :class:`~kb.service.KnowledgeBase` facade when they finish): the report
  ``kb <job> --json`` prints (lists longer than :data:`LIST_CAP` cut, their
  length in ``<name>_total``), ``wall_seconds``; a job that raised:
  ``error`` and ``type``. A dry run is not logged (it writes nothing), nor a
  ``verify`` that only checks (the Home page runs one on every view).
- ``search`` (:meth:`kb.search.engine.SearchEngine.search`): ``mode``, ``k``,
  ``latency_ms``, ``hits``, ``top_source``, ``top_path``; the question text
  (``query``) only when ``KB_LOG_QUERIES=true``.
- ``answer`` (:func:`log_answer`, called by the chat): ``id``, ``rag``,
  ``ttft``, ``seconds``, ``tokens``, ``citations``, ``cited``, ``sources``,
  ``feedback`` (and ``sentences``/``sentences_supported`` where the answer
  has them; ``question`` only with ``KB_LOG_QUERIES``); ``feedback`` records
  (:func:`log_feedback`) add a verdict given later.
- ``error`` (unexpected errors, caught by the CLI's and the pages' handlers):
  ``type``, ``message``, ``traceback``, ``origin``.

Writing is safe across threads and processes (the dashboard and the CLI at
once): each record is encoded first, then appended with ``O_APPEND`` in one
``os.write``, which Linux performs whole with respect to other appends, so
lines never interleave. Rotation is by size, done here rather than by
:class:`logging.handlers.RotatingFileHandler`: that handler keeps its file
open and rolls over per process, so with two processes writing, one keeps
appending to the renamed file and both may roll over, clobbering a backup;
it also writes through a buffered stream, which can split a long record
into several writes. Here every write opens the file afresh (about 20 µs),
and a rollover (``kb.jsonl`` → ``kb.jsonl.1`` … ``.5``, at
:data:`MAX_BYTES`) happens under an ``flock`` and only if the file is still
the one that grew too large, so it happens once.

Logging never breaks an operation: a write that fails (read-only disk, full
disk) is dropped, with one warning per folder and process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import json
import logging
import os
import socket
import statistics
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core.settings import duration
from kb import pids
from kb.errors import KBError

FILE_NAME = "kb.jsonl"
MAX_BYTES = 5_000_000  # per file; with BACKUPS, at most 30 MB of log
BACKUPS = 5
LIST_CAP = 100  # a job report's lists (paths added, skipped files, problems) keep this many entries
TEXT_CAP = 2_000  # messages
TRACEBACK_CAP = 20_000
# fetch: a scheduled fetch that failed, or came back after failing (one that finds nothing new is not logged)
JOB_KINDS = ("add", "sync", "upload", "rechunk", "verify", "export", "import", "fetch", "remove")
KINDS = JOB_KINDS + ("search", "answer", "feedback", "error")
_RESERVED = ("ts", "kind", "pid")

_warn = logging.getLogger(__name__)
_warned: set[str] = set()
_warned_lock = threading.Lock()
_rotate_lock = threading.Lock()

try:
    import fcntl
except ImportError:  # not POSIX: rollovers are serialised within the process only
    fcntl = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------- where and when


def home_of(where: Any) -> Path:
    """KB_HOME from a :class:`~core.settings.Settings` (anything with ``.home``) or a path."""
    if isinstance(where, (str, os.PathLike)):  # a Path has a .home() classmethod: test for paths first
        return Path(where)
    return Path(where.home)


def log_dir(where: Any) -> Path:
    return home_of(where) / "logs"


def iso(ts: float) -> str:
    """``2025-06-01T08:30:00.123Z``: UTC, fixed width, so timestamps compare as strings."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def epoch(ts: str) -> float:
    """A record's ``ts`` as seconds since the epoch."""
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``45s``, ``30m``, ``1h``, ``2d``, ``1w``, ``1h30m``) or a local date
    or time (``2025-06-01``, ``2025-06-01T08:00``, ``2025-06-01 08:00``; with an offset, that offset). Returns
    seconds since the epoch; anything else is a :class:`KBError` that says what is accepted."""
    raw = (text or "").strip()
    now = time.time() if now is None else now
    seconds = duration(raw)
    if seconds is not None:
        return max(0.0, now - seconds)  # further back than the epoch is everything (it was a date out of range)
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise KBError(f"--since {text!r}: expected a duration back from now such as 30m, 1h, 2d or 1h30m "
                      "(units s, m, h, d, w), or a date or time such as 2025-06-01 or 2025-06-01T08:00") from None
    return when.timestamp()  # a naive date or time is local time


# ---------------------------------------------------------------------------- the file


class JsonlLog:
    """One size-rotated JSON-lines file (``kb.jsonl``, then ``kb.jsonl.1`` … ``.N``, newest first)."""

    def __init__(self, folder: Path, name: str = FILE_NAME, max_bytes: int | None = None, backups: int | None = None):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.backups = max(1, BACKUPS if backups is None else backups)

    def backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def files(self) -> list[Path]:
        """Oldest first: the backups from the highest number down, then the current file."""
        return [p for p in [*(self.backup(i) for i in range(self.backups, 0, -1)), self.path] if p.is_file()]

    def append(self, line: bytes) -> None:
        """Append one whole line in one write; roll over once the file has reached ``max_bytes``."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # only a full disk does this to a regular file
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
            if os.fstat(fd).st_size >= self.max_bytes:
                self._roll_over(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _exclusive(self):
        """Threads of this process, then other processes (``flock`` on a lock file beside the log)."""
        with _rotate_lock:
            if fcntl is None:
                yield
                return
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _roll_over(self, fd: int) -> None:
        with self._exclusive():
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return
            mine = os.fstat(fd)
            if (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev) or now.st_size < self.max_bytes:
                return  # another writer rolled it over already
            for i in range(self.backups - 1, 0, -1):
                if self.backup(i).exists():
                    os.replace(self.backup(i), self.backup(i + 1))
            os.replace(self.path, self.backup(1))

    def read(self, since: float | None = None, kinds: Iterable[str] | None = None) -> list[dict]:
        """Records at or after ``since`` (epoch seconds) of the given kinds, oldest first.

        A file last written before ``since`` is not opened, and a line whose
        ``ts`` is older is skipped before it is parsed. A line that is not a
        record (a crash mid-write, an edit by hand) is skipped.
        """
        start = iso(since) if since is not None else None
        wanted = set(kinds) if kinds else None
        out: list[dict] = []
        for f in self.files():
            try:
                if since is not None and f.stat().st_mtime < since - 1:
                    continue
                with f.open("rb") as fh:
                    lines = fh.readlines()
            except OSError:  # rolled over between the listing and the read
                continue
            for raw in lines:
                if start is not None and raw.startswith(b'{"ts":"') and raw[7:31].decode("ascii", "replace") < start:
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("ts"), str):
                    continue
                if start is not None and rec["ts"] < start:
                    continue
                if wanted is not None and rec.get("kind") not in wanted:
                    continue
                out.append(rec)
        out.sort(key=lambda r: r["ts"])  # stable: within a millisecond, file order
        return out


# ---------------------------------------------------------------------------- writing


def _warn_once(folder: Path, exc: BaseException) -> None:
    key = str(folder)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    _warn.warning("kb: cannot write the log in %s (%s: %s); records are dropped, the operation goes on",
                  folder, type(exc).__name__, exc)


def write(where: Any, kind: str, **fields: Any) -> bool:
    """Append one record; never raises. ``where``: KB_HOME or settings. False when the write failed."""
    folder = None
    try:
        folder = log_dir(where)
        for key in _RESERVED:
            fields.pop(key, None)
        record = {"ts": iso(time.time()), "kind": kind, "pid": os.getpid(), **fields}
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":")) + "\n"
        JsonlLog(folder).append(line.encode("utf-8", "replace"))
        return True
    except Exception as exc:  # a log must never break what it records
        _warn_once(folder or Path(str(where)), exc)
        return False


def read(where: Any, since: float | None = None, kinds: Iterable[str] | None = None) -> list[dict]:
    """Every kept record of KB_HOME (or settings) since ``since``, of ``kinds``, oldest first; a job whose process
    died under way is logged first (:func:`reap`), so `kb log` and Home's errors count it."""
    reap(where)
    return JsonlLog(log_dir(where)).read(since, kinds)


def _capped(value: Any, cap: int = LIST_CAP) -> Any:
    """A report with every list cut to ``cap`` entries; a dict gets ``<key>_total`` beside a cut list."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k] = _capped(v, cap)
            if isinstance(v, list) and len(v) > cap:
                out[f"{k}_total"] = len(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_capped(v, cap) for v in list(value)[:cap]]
    return value


def log_job(where: Any, kind: str, report: dict) -> bool:
    """A finished job (``sync``, ``upload``, ``rechunk``, ``verify``) with its report (the ``--json`` fields)."""
    return write(where, kind, **_capped(report))


RUNNING = "running"  # in KB_HOME/logs: one marker per job under way, removed when it ends


@contextlib.contextmanager
def running(where: Any, kind: str):
    """Mark a job as under way while it runs, so that one whose process dies is logged by the next (:func:`reap`).

    A `kb sync` killed with SIGKILL wrote nothing, and `kb log` could not tell that it had died (an operator review):
    a process can't log its own death, so the marker outlives it and another process reports it.
    """
    path = None
    try:
        folder = log_dir(where) / RUNNING
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}-{kind}-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps({"kind": kind, "pid": os.getpid(), "pid_start": pids.started(os.getpid()),
                                    "host": socket.gethostname(), "started": iso(time.time())}))
    except OSError:  # a log must never break what it records
        path = None
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def reap(where: Any) -> list[tuple[int, str]]:
    """Log each job whose process died under way (its marker is left, its process gone), once; returns
    ``(pid, kind)`` of each. Markers of another host are left to that host."""
    out: list[tuple[int, str]] = []
    try:
        markers = list((log_dir(where) / RUNNING).glob("*.json"))
    except OSError:
        return out
    for path in markers:
        try:
            rec = json.loads(path.read_text())
            pid, kind = int(rec["pid"]), str(rec["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if rec.get("host") != socket.gethostname() or pids.alive(pid, rec.get("pid_start")):
            continue
        try:
            path.unlink()  # only the process that removes it logs it
        except OSError:
            continue
        log_job(where, kind, {"error": f"interrupted: process {pid} stopped before this {kind} ended (killed, or the "
                                       "machine went down); a sync converges on its next run",
                              "interrupted": True, "started": rec.get("started"), "process": pid})
        out.append((pid, kind))
    return out


def job(kind: str, report: Callable[[Any], dict], when: Callable[[dict], bool] | None = None):
    """Decorate a :class:`~kb.service.KnowledgeBase` method so that its end is logged, result or error.

    ``report(result)`` gives the fields; ``when(arguments)`` (the call's
    arguments by name) may skip the record. A job that raises is logged with
    ``error`` and ``type`` (one cancelled, with ``cancelled``), then the
    exception goes on unchanged.
    """

    def deco(method):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if when is not None:
                try:
                    bound = signature.bind(self, *args, **kwargs)
                    bound.apply_defaults()
                    wanted = bool(when(bound.arguments))
                except Exception:  # a bad call: the method itself says so
                    wanted = True
                if not wanted:
                    return method(self, *args, **kwargs)
            reap(self.settings)
            t0 = time.perf_counter()
            try:
                with running(self.settings, kind):
                    result = method(self, *args, **kwargs)
            except Exception as exc:
                wall = round(time.perf_counter() - t0, 3)
                if getattr(exc, "cancelled", False):  # kb.jobs.Cancelled: what someone asked for, not a failure
                    log_job(self.settings, kind, {"cancelled": True, "note": str(exc)[:TEXT_CAP], "wall_seconds": wall})
                else:
                    log_job(self.settings, kind, {"error": (str(exc) or type(exc).__name__)[:TEXT_CAP],
                                                  "type": _type_name(exc), "wall_seconds": wall})
                raise
            except KeyboardInterrupt:  # Ctrl-C in a terminal: stopped on purpose, like a cancel (it left no record)
                log_job(self.settings, kind, {"cancelled": True, "note": "interrupted (Ctrl-C)",
                                              "wall_seconds": round(time.perf_counter() - t0, 3)})
                raise
            try:
                fields = report(result)
            except Exception as exc:  # a report that can't be built is the log's problem, not the job's
                fields = {"report_error": f"{type(exc).__name__}: {exc}"}
            log_job(self.settings, kind, {**fields, "wall_seconds": round(time.perf_counter() - t0, 3)})
            return result

        return wrapper

    return deco


def _log_queries(where: Any, explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    if hasattr(where, "log_queries"):
        return bool(where.log_queries)
    try:  # a bare KB_HOME: the environment and secrets.toml decide, as for everything else
        from core.settings import load_settings

        return load_settings().log_queries
    except Exception:
        return False


def log_search(settings: Any, query: str, opts: Any, hits: list, latency_ms: float) -> bool:
    """One search: mode, k, latency, hit count and the top hit; the question only with ``KB_LOG_QUERIES``."""
    try:
        top = hits[0] if hits else None
        fields = {"mode": opts.mode, "k": opts.k, "latency_ms": round(latency_ms, 2), "hits": len(hits),
                  "top_source": getattr(top, "source", None), "top_path": getattr(top, "path", None)}
        if _log_queries(settings, None):
            fields["query"] = query
    except Exception as exc:
        _warn_once(log_dir(settings), exc)
        return False
    return write(settings, "search", **fields)


def log_answer(where: Any, answer: Any, feedback: Any = None, *, answer_id: str | None = None,
               log_queries: bool | None = None) -> str:
    """Log one answer; returns its id (give it to :func:`log_feedback` for a verdict that comes later).

    ``where``: the :class:`~core.settings.Settings` (``KB_LOG_QUERIES`` from
    them) or KB_HOME (``KB_LOG_QUERIES`` from the environment).
    ``answer``: a :class:`kb.answer.chain.Answer` or its ``as_dict()``
    (``rag``, ``first_token_seconds``, ``seconds``, ``cited``, ``sources``;
    ``tokens``, ``sentences``, ``error`` and ``id`` where present).
    ``feedback``, if known already: ``"up"``/``"down"``, a score 1/0, or the
    chat's ``{"score", "comment"}`` (the comment kept only with
    ``KB_LOG_QUERIES``); else the answer's own ``feedback``, if any.
    Never raises; the answer text is never logged, the question only with
    ``KB_LOG_QUERIES=true`` (or ``log_queries=True``).
    """
    rid = answer_id or uuid.uuid4().hex[:12]
    try:
        d = answer.as_dict() if hasattr(answer, "as_dict") else dict(answer)
        rid = answer_id or str(d.get("id") or rid)
        cited = list(d.get("cited") or [])
        tokens = next((d[k] for k in ("tokens", "completion_tokens", "output_tokens") if d.get(k) is not None), None)
        fields: dict[str, Any] = {
            "id": rid, "rag": bool(d.get("rag", True)), "ttft": d.get("first_token_seconds", d.get("ttft")),
            "seconds": d.get("seconds"), "tokens": tokens, "citations": len(cited), "cited": cited[:LIST_CAP],
            "sources": len(d.get("sources") or []),
        }
        sentences = d.get("sentences")
        if isinstance(sentences, list):
            fields["sentences"] = len(sentences)
            fields["sentences_supported"] = sum(1 for s in sentences if isinstance(s, dict) and s.get("supported"))
        if d.get("error"):
            fields["error"] = str(d["error"])[:TEXT_CAP]
        queries = _log_queries(where, log_queries)
        fields["feedback"] = _feedback(feedback if feedback is not None else d.get("feedback"), queries)
        if queries:
            fields["question"] = d.get("question")
    except Exception as exc:
        _warn_once(log_dir(where), exc)
        return rid
    write(where, "answer", **fields)
    return rid


def log_feedback(where: Any, answer_id: str, feedback: Any, *, log_queries: bool | None = None) -> bool:
    """A verdict on an answer logged earlier (``answer_id`` from :func:`log_answer`); ``feedback`` as there."""
    return write(where, "feedback", id=answer_id, feedback=_feedback(feedback, _log_queries(where, log_queries)))


def _feedback(value: Any, keep_text: bool) -> Any:
    """A verdict as logged: ``"up"``/``"down"`` for a score of 1/0 (or True/False), other strings as given; the
    chat's ``{"score", "comment", ...}`` becomes ``{"score", "verdict"}``, with ``comment`` only when question
    text may be logged (a comment is the user's words)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        out = {"score": value.get("score"), "verdict": verdict(value)}
        if keep_text and value.get("comment"):
            out["comment"] = str(value["comment"])[:TEXT_CAP]
        return out
    return verdict(value)


def verdict(value: Any) -> str | None:
    """``up``, ``down`` or the value as text: the key the Home page counts feedback under."""
    score = value.get("score") if isinstance(value, dict) else value
    if isinstance(score, dict):
        score = score.get("verdict")
    if score is True or score == 1 or str(score).lower() in ("up", "1", "good", "+1", "yes"):
        return "up"
    if score is False or score == 0 or str(score).lower() in ("down", "0", "bad", "-1", "no"):
        return "down"
    return None if score is None else str(score)


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def unexpected(where: Any, exc: BaseException, origin: str) -> str:
    """An unexpected error of one part of a job (one source's sync or fetch), logged with its traceback: the
    message that part's report carries, so the rest of the job goes on and the admin knows where to look."""
    log_error(where, exc, origin=origin)
    _warn.error("%s failed", origin, exc_info=exc)
    return f"unexpected {type(exc).__name__}: {exc} (its traceback is in the log: python -m kb log --kind error)"


def log_error(where: Any, exc: BaseException, origin: str = "") -> bool:
    """An unexpected error (a bug): type, message, traceback, and where it was caught (``origin``)."""
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if len(tb) > TRACEBACK_CAP:
            tb = tb[:2000] + "\n…\n" + tb[-(TRACEBACK_CAP - 2000):]
        fields = {"type": _type_name(exc), "message": (str(exc) or type(exc).__name__)[:TEXT_CAP], "traceback": tb,
                  "origin": origin}
    except Exception as fail:
        _warn_once(log_dir(where), fail)
        return False
    return write(where, "error", **fields)


# ---------------------------------------------------------------------------- reading it back


def p95(values: list[float]) -> float | None:
    """The 95th percentile by nearest rank (a value that occurred); None for no values."""
    vals = sorted(v for v in values if isinstance(v, (int, float)))
    if not vals:
        return None
    return vals[max(0, -(-95 * len(vals) // 100) - 1)]


def _sync_reports(rec: dict) -> list[dict]:
    """The per-source reports of a job record (sync, upload, a scheduled fetch that failed or came back; a repairing
    verify keeps them in ``reports``)."""
    reps = rec.get("sources") if rec.get("kind") in ("sync", "upload", "fetch") else rec.get("reports")
    return [r for r in reps or [] if isinstance(r, dict) and r.get("name")]


_COUNTED = {"search": "searches", "answer": "answers", "error": "errors"}
_FILE_COUNTS = ("files_added", "files_modified", "files_deleted")


def glance(where: Any, hours: float = 24, now: float | None = None) -> dict:
    """The Home page's summary of the last ``hours``: counts, p95s, per-hour activity, last sync per source."""
    now = time.time() if now is None else now
    since = now - hours * 3600
    records = read(where, since=since)
    searches = [r for r in records if r.get("kind") == "search"]
    answers = [r for r in records if r.get("kind") == "answer"]
    errors = [r for r in records if r.get("kind") == "error"]
    first_hour = int(since // 3600) * 3600
    buckets = {first_hour + 3600 * i: {"start": first_hour + 3600 * i, "searches": 0, "answers": 0, "errors": 0,
                                       "search_p95_ms": None, "ttft_p95_s": None}
               for i in range(int(-(-(now - first_hour) // 3600)))}
    last_sync: dict[str, dict] = {}
    failed_jobs = []
    hourly_latency: dict[int, list[float]] = {}
    hourly_ttft: dict[int, list[float]] = {}
    for r in records:
        t = epoch(r["ts"])
        hour = int(t // 3600) * 3600
        b = buckets.get(hour)
        kind = r.get("kind")
        if b is not None and kind in _COUNTED:
            b[_COUNTED[kind]] += 1
            if kind == "search":
                hourly_latency.setdefault(hour, []).append(r.get("latency_ms"))
            elif kind == "answer":
                hourly_ttft.setdefault(hour, []).append(r.get("ttft"))
        if kind in JOB_KINDS:
            if r.get("error"):
                failed_jobs.append({"ts": t, "kind": kind, "source": None, "error": r["error"]})
            for rep in _sync_reports(r):
                if rep.get("error"):
                    failed_jobs.append({"ts": t, "kind": kind, "source": rep["name"], "error": rep["error"]})
                if rep.get("dry_run"):
                    continue
                last_sync[rep["name"]] = {
                    "ts": t, "job": kind, "commit": rep.get("commit_after"), "error": rep.get("error") or "",
                    "files_changed": sum(int(rep.get(k) or 0) for k in _FILE_COUNTS),
                    "chunks_embedded": rep.get("chunks_embedded"), "seconds": rep.get("seconds"),
                }
    for f in failed_jobs:  # a source that synced or fetched fine since (in the same millisecond too): fixed
        done = last_sync.get(f["source"]) if f["source"] else None
        f["fixed"] = ({"ts": done["ts"], "job": done["job"]} if done and done["ts"] >= f["ts"] and not done["error"]
                      else None)
    feedback = {}  # the latest verdict per answer
    for r in records:
        if r.get("kind") in ("answer", "feedback") and r.get("feedback") is not None:
            feedback[r.get("id") or id(r)] = verdict(r["feedback"])
    verdicts: dict[str, int] = {}
    for v in feedback.values():
        if v is not None:
            verdicts[v] = verdicts.get(v, 0) + 1
    for hour, values in hourly_latency.items():
        buckets[hour]["search_p95_ms"] = p95(values)
    for hour, values in hourly_ttft.items():
        buckets[hour]["ttft_p95_s"] = p95(values)
    latencies = [r.get("latency_ms") for r in searches]
    return {
        "hours": hours, "since": since, "records": len(records),
        "questions": len(answers), "searches": len(searches), "errors": len(errors),
        "search_p95_ms": p95(latencies), "search_p50_ms": _median(latencies),
        "ttft_p95_s": p95([r.get("ttft") for r in answers]),
        "feedback": verdicts, "failed_jobs": failed_jobs, "last_sync": last_sync,
        "per_hour": [buckets[k] for k in sorted(buckets)],
        "last_error": ({"ts": epoch(errors[-1]["ts"]), "type": errors[-1].get("type"),
                        "message": errors[-1].get("message")} if errors else None),
    }


def _median(values: list) -> float | None:
    """The median of the numbers among ``values`` (a record may lack one); None for none."""
    vals = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def describe(rec: dict) -> str:
    """One record as one line for ``kb log`` (local time)."""
    when = dt.datetime.fromtimestamp(epoch(rec["ts"])).strftime("%Y-%m-%d %H:%M:%S")
    kind = rec.get("kind", "?")
    g = rec.get
    if kind == "search":
        top = f"{g('top_source')}/{g('top_path')}" if g("top_path") else "no hits"
        text = f"{g('mode')} k={g('k')} {g('latency_ms')} ms, {g('hits')} hits, top {top}"
        if g("query") is not None:
            text += f"  {json.dumps(g('query'), ensure_ascii=False)}"
    elif kind == "answer":
        ttft = g("ttft")
        text = (f"{'rag' if g('rag') else 'no-rag'} first token {'-' if ttft is None else f'{ttft:.1f}'} s, "
                f"{g('seconds') or 0:.1f} s, {g('tokens') if g('tokens') is not None else '?'} tokens, "
                f"{g('citations')} citations of {g('sources')} sources"
                + (f", feedback {verdict(g('feedback'))}" if g("feedback") is not None else "") + f" [{g('id')}]")
        if g("error"):
            text += f"  ERROR {g('error')}"
        if g("question") is not None:
            text += f"  {json.dumps(g('question'), ensure_ascii=False)}"
    elif kind == "feedback":
        text = f"{verdict(g('feedback'))} on answer {g('id')}"
    elif kind == "error":
        text = f"{g('type')}: {g('message')}" + (f" (in {g('origin')})" if g("origin") else "")
    elif kind in JOB_KINDS:
        parts = []
        if g("error"):
            parts.append(f"ERROR {g('error')}")
        if g("cancelled"):
            parts.append("cancelled" + (f" (job {g('note')})" if g("note") else ""))
        for rep in _sync_reports(rec):
            if rep.get("error"):
                parts.append(f"{rep['name']}: ERROR {rep['error']}")
                continue
            before, after = (rep.get("commit_before") or "none")[:10], (rep.get("commit_after") or "none")[:10]
            parts.append(f"{rep['name']}{' (dry run)' if rep.get('dry_run') else ''} {before} -> {after}, files "
                         f"+{rep.get('files_added')} ~{rep.get('files_modified')} -{rep.get('files_deleted')}, "
                         f"chunks embedded {rep.get('chunks_embedded')}, {rep.get('seconds')} s")
        if kind == "rechunk" and g("collection"):
            parts.append(f"built {g('collection')} ({g('chunk_config')}, {g('chunks')} chunks, {g('seconds')} s)")
        if kind in ("export", "import") and g("collection"):
            parts.append(f"{g('collection')}: {g('chunks')} chunks, {g('passages')} passages, {g('sources')} sources"
                         + (f", {g('path')} ({g('bytes')} bytes)" if g("path") else "") + f", {g('seconds')} s")
        if kind == "fetch" and g("recovered"):
            parts.append("fetched again after failing")
        if kind == "remove":
            parts.append(f"source {g('source')} removed, {g('chunks_removed')} chunks with it")
        if kind == "add" and g("source"):
            parts.append(f"source {g('source')} added ({g('source_kind')}, {g('url')}, branch {g('branch')})")
        if kind == "verify" and "healthy" in rec:
            parts.append(("healthy" if g("healthy") else "NOT healthy") + (" after repair" if g("repaired") else ""))
        text = "; ".join(parts) or json.dumps({k: v for k, v in rec.items() if k not in _RESERVED}, ensure_ascii=False)
    else:
        text = json.dumps({k: v for k, v in rec.items() if k not in _RESERVED}, ensure_ascii=False, default=str)
    return f"{when}  {kind:8} {text}"
