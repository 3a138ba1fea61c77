"""Background jobs: sync, upload indexing, re-chunk and evaluation runs in one worker thread, with live progress.

The dashboard owns one :class:`JobQueue` per server process (``pages/_resources.py``
makes it once). Pages only enqueue and read: the work runs in the queue's worker
thread, one job at a time, so an admin can leave the page and come back, and a
second write job waits in line with its place shown. Across processes (the CLI,
``kb watch``, another dashboard) the write lock of ``kb.store.manifest`` still
keeps one writer at a time: a job waits for it instead of failing.

Progress comes from the same :class:`kb.progress.Progress` callbacks that drive
the CLI's bars: each job gets a :class:`JobControl`, which keeps the job's record
current (stage, files done of total, chunks embedded, elapsed, ETA) and raises
:class:`Cancelled` at a safe point once cancelling is asked for:

- sync and upload: between sources, after a file is loaded, or after a batch of
  chunks is embedded, but never once the source's vectors are being written; a
  cancel that arrives then takes effect when that source is recorded. So a
  cancelled sync leaves every source either as it was or fully synced, which
  is what a clean run leaves (``kb verify`` is healthy);
- re-chunk: anywhere (the live collection is never touched until the end);
  the half-built collection is dropped;
- evaluation (retrieval or answers): between questions (it only reads, so it
  never waits for the write lock).

Every job is kept as JSON in ``KB_HOME/jobs/<id>.json``, written atomically when
it is queued, while it runs (at most every few seconds) and when it ends, so a
finished job keeps its report (the fields of ``kb sync --json``) across
restarts, and a job whose process died is shown as failed, interrupted.

Scheduled sync (``KB_SYNC_EVERY``, ``kb watch --every``): every interval, each
git source is fetched, and only a source whose branch moved is synced, all as
one job with its report. A remote that cannot be reached is recorded per source
in ``KB_HOME/jobs/watch.json`` and retried with exponential backoff (one
interval, then two, four, ... up to six hours); a failed fetch never reaches
the index. :func:`kb.schedule.sync_failures` returns what is failing now, for the Home page.

What each kind of job does with the knowledge base (the ``Work`` this queue runs) is in ``kb/job_work.py``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from core import atomic
from core.errors import UserError
from kb import job_work, pids
from kb import log as runlog
from kb.errors import KBError
from kb.job_work import Cancelled
from kb.progress import Progress, no_progress
from kb.schedule import WATCH_FILE, WatchState
from kb.store.manifest import WriteLockBusy

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)
KIND_LABELS = {"sync": "Sync", "upload": "Upload", "rechunk": "Re-chunk", "evaluate": "Evaluation",
               "answers": "Answer evaluation", "scheduled": "Scheduled sync", "export": "Snapshot export"}
GIT_STAGES = ("fetch", "clone")  # reported from git's reader threads: never raise there
KEEP = 200  # finished job files kept in KB_HOME/jobs (and records in memory)
PERSIST_EVERY = 2.0  # seconds between writes of a running job's record
LOCK_POLL = 0.5


def new_id() -> str:
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


def _atomic_write(path: Path, data: dict) -> None:
    atomic.write_json(path, data, ensure_ascii=False, default=str, indent=1)


def _alive(rec: dict) -> bool:
    """Whether the process that wrote a running job's record still exists (unknowable on another host: yes)."""
    pid = int(rec.get("pid") or 0)
    return rec.get("host", "") != socket.gethostname() or pid == os.getpid() or pids.alive(pid, rec.get("pid_start"))


T = TypeVar("T")


def lock_busy(home: Path) -> bool:
    """Whether another writer (this process or another) holds KB_HOME's write lock right now."""
    path = home / ".write.lock"
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


# ---------------------------------------------------------------------------- the job record


@dataclass
class Job:
    """One job's record: what it is, where it stands, and how it ended."""

    id: str
    kind: str
    label: str
    args: dict = field(default_factory=dict)  # what it was asked to do (JSON: names, file names, settings)
    origin: str = "dashboard"  # dashboard | schedule | cli
    state: str = QUEUED
    stage: str = ""
    message: str = ""
    source: str = ""  # the source being worked on
    sources_done: int = 0
    sources_total: int = 0
    files_done: int = 0  # of the current source
    files_total: int = 0
    chunks_embedded: int = 0  # so far, every source of the job
    passages_embedded: int = 0
    stage_done: float = 0.0
    stage_total: float | None = None
    stage_started: float | None = None  # when the stage's first report came
    stage_base: float = 0.0  # how far that report said it was (the work before it was not timed)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    report: dict | None = None
    error: str = ""
    cancel_requested: bool = False
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    pid_start: str | None = None  # when that process began: a reused pid is not the writer (kb.pids.started)

    def __post_init__(self) -> None:
        if self.pid_start is None and self.pid == os.getpid():  # not a record of another process read back
            self.pid_start = pids.started(self.pid)

    def elapsed(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return round((self.finished or now or time.time()) - self.started, 2)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left in the current stage at its rate so far (None: not known yet)."""
        timed = self.stage_done - self.stage_base
        if self.state != RUNNING or not self.stage_total or timed <= 0 or self.stage_started is None:
            return None
        spent = (now or time.time()) - self.stage_started
        if spent < 0.2:
            return None
        left = self.stage_total - self.stage_done
        if left <= 0:  # "3 / 3" is reported as the last item starts: what is left of it is not known
            return None
        return round(spent * left / timed, 1)

    def as_dict(self, now: float | None = None) -> dict:
        d = asdict(self)
        d["elapsed"] = self.elapsed(now)
        d["eta"] = self.eta(now)
        d["kind_label"] = KIND_LABELS.get(self.kind, self.kind)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------- progress and cancelling


class JobControl:
    """The :class:`~kb.progress.Progress` a job's work reports to.

    It keeps the job's record current, forwards to another progress (the CLI's
    bars), and raises :class:`Cancelled` at the next safe point once the job is
    to be cancelled. ``begin_source`` marks a source boundary; once a source's
    vectors are being written (its ``store`` stage), it is no longer safe to
    stop until the next boundary, unless ``anywhere`` (a re-chunk, an
    evaluation) says any point is safe.
    """

    def __init__(self, queue: "JobQueue", job: Job, forward: Progress = no_progress, anywhere: bool = False) -> None:
        self.queue = queue
        self.job = job
        self.forward = forward
        self.anywhere = anywhere
        self.writing = False
        self.report: dict | None = None  # what is done so far: kept when the job is cancelled or fails
        self._last_stage = ""
        self._embed_base = 0
        self._persisted = 0.0

    def __call__(self, stage: str, done: float, total: float | None = None, message: str = "") -> None:
        if stage in ("load", "rechunk"):  # a source's files are being read: the previous source is recorded
            self.writing = False
        self.queue._update(self, stage, done, total, message)
        try:
            self.forward(stage, done, total, message)
        except Exception:  # a broken display must not break the job
            log.exception("progress display failed")
        if stage == "store":
            self.writing = True
        if stage not in GIT_STAGES:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Raise :class:`Cancelled` if the job is to be cancelled and this is a safe point."""
        if self.job.cancel_requested and (self.anywhere or not self.writing):
            raise Cancelled(self.job.id)

    def begin_source(self, name: str, index: int, total: int) -> None:
        """A source boundary: nothing is half-written here, so a cancel takes effect."""
        self.writing = False
        self.queue._begin_source(self, name, index, total)
        self.checkpoint()

    def wait_for_lock(self) -> None:
        """Wait while another writer holds KB_HOME's write lock (a CLI sync, another dashboard)."""
        home = self.queue.home
        if not lock_busy(home):
            return
        self.queue._set(self.job, stage="waiting", message="another writer holds the write lock")
        while lock_busy(home):
            self.checkpoint()
            time.sleep(LOCK_POLL)
        self.queue._set(self.job, stage="", message="")

    def when_lock_free(self, call: Callable[[], T]) -> T:
        """``call()`` once the write lock is free, waiting again if another writer takes it first.

        The wait only looks: a `kb sync` in a terminal could take the lock between the wait and the call, and a
        scheduled fetch then recorded the source as failing and backed it off (a review read it in the code).
        """
        while True:
            self.wait_for_lock()
            try:
                return call()
            except WriteLockBusy:
                self.checkpoint()
                time.sleep(LOCK_POLL)


# ---------------------------------------------------------------------------- scheduled-sync state


# ---------------------------------------------------------------------------- the queue


Work = Callable[["KnowledgeBase", JobControl], dict]  # noqa: F821 (kb.service imports nothing from here)


class JobQueue:
    """One worker thread running jobs in order, their records, and (``every`` > 0) the sync schedule.

    ``start=False`` makes a queue without threads, for :meth:`run_now` (the CLI).
    """

    def __init__(self, kb, *, every: float = 0.0, snapshot_every: float = 0.0, snapshot_keep: int | None = None,
                 start: bool = True, forward: Progress = no_progress) -> None:
        self.kb = kb
        self.home: Path = kb.settings.home
        self.folder = self.home / "jobs"
        self.every = float(every or 0.0)
        self.snapshot_every = float(snapshot_every or 0.0)
        self.snapshot_keep = int(snapshot_keep or kb.settings.snapshot_keep)
        self._snapshot_not_before = 0.0  # the schedule's last submission plus its interval
        self._snapshotter: threading.Thread | None = None
        self.forward = forward
        self.watch = WatchState(self.folder / WATCH_FILE)
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._work: dict[str, tuple[Work, bool, bool]] = {}
        self._jobs: dict[str, Job] = {}  # every job of this queue, by id
        self._running: Job | None = None
        self._controls: dict[str, JobControl] = {}
        self._disk: dict[str, tuple[float, dict]] = {}  # other processes' job files, by name: (mtime, record)
        self._disk_lock = threading.Lock()
        self._last_idle: str | None = None  # the last scheduled pass that found nothing to do
        self._closed = False
        self._worker: threading.Thread | None = None
        self._scheduler: threading.Thread | None = None
        self._recover()
        if start:
            self._worker = threading.Thread(target=self._loop, name="kb-jobs", daemon=True)
            self._worker.start()
            self.set_every(self.every)
            self.set_snapshot_every(self.snapshot_every)

    def set_snapshot_every(self, every: float, keep: int | None = None) -> None:
        """Set the scheduled-snapshot interval (``KB_SNAPSHOT_EVERY``, 0: off) and how many are kept
        (``KB_SNAPSHOT_KEEP``); the first is due ``every`` after the newest scheduled archive on disk, or now."""
        with self._cond:
            changed = float(every or 0.0) != self.snapshot_every
            self.snapshot_every = float(every or 0.0)
            if keep:
                self.snapshot_keep = int(keep)
            self._cond.notify_all()
            if self.snapshot_every > 0 and self._worker is not None and self._snapshotter is None:
                self._snapshotter = threading.Thread(target=self._snapshot_loop, name="kb-snapshot-schedule",
                                                     daemon=True)
                self._snapshotter.start()
        if changed:
            log.info("scheduled snapshot every %s s", self.snapshot_every or "(off)")

    def set_every(self, every: float) -> None:
        """Set the scheduled-sync interval (0: off); the first pass runs now when the schedule starts."""
        with self._cond:
            changed = float(every or 0.0) != self.every
            self.every = float(every or 0.0)
            self._cond.notify_all()
            if self.every > 0 and self._worker is not None and self._scheduler is None:
                self._scheduler = threading.Thread(target=self._schedule_loop, name="kb-sync-schedule", daemon=True)
                self._scheduler.start()
        if changed:
            log.info("scheduled sync every %s s", self.every or "(off)")

    # ------------------------------------------------------------------ submitting

    def submit(self, kind: str, args: dict, work: Work, *, label: str = "", origin: str = "dashboard",
               anywhere: bool = False, writes: bool = True) -> dict:
        """Queue ``work(kb, control)``; returns the job's record. ``writes``: wait for the write lock first."""
        job = Job(new_id(), kind, label or KIND_LABELS.get(kind, kind), args, origin)
        with self._cond:
            if self._closed:
                raise KBError("the job queue is closed")
            self._jobs[job.id] = job
            self._work[job.id] = (work, anywhere, writes)
            self._pending.append(job)
            self._persist(job)
            self._cond.notify_all()
            return self._snapshot(job)

    def submit_sync(self, names: list[str] | None = None, origin: str = "dashboard") -> dict:
        """Sync some sources (None: all), one after another: the fields of ``kb sync --json``."""
        names = list(names) if names else None
        label = "Sync " + (", ".join(names) if names else "all sources")
        return self.submit("sync", {"names": names}, job_work.sync_work(names), label=label, origin=origin)

    def submit_upload(self, files: dict[str, bytes], source: str, origin: str = "dashboard") -> dict:
        """Commit uploaded files to a files-only source and index them (``kb upload``).

        A bad source name is refused here, not by the queued job: it became a failed job (counted among Home's
        errors) labelled "Upload 1 file(s) to failed" for an empty name (a browser review).
        """
        from kb.ingest.sources import validate_name

        validate_name(source)
        if not files:
            raise KBError("no files given")
        files = dict(files)
        args = {"source": source, "files": sorted(files), "bytes": sum(len(b) for b in files.values())}
        return self.submit("upload", args, job_work.upload_work(files, source),
                           label=f"Upload {len(files)} file(s) to {source}", origin=origin)

    def submit_rechunk(self, config, origin: str = "dashboard") -> dict:
        """Build a collection with ``config`` beside the live one, switching when complete (``kb rechunk``)."""
        return self.submit("rechunk", {"chunk_config": config.to_json(), "label": config.label()},
                           job_work.rechunk_work(config), label=f"Re-chunk: {config.label()}", origin=origin,
                           anywhere=True)

    def submit_export(self, with_repos: bool = False, origin: str = "dashboard") -> dict:
        """Write a snapshot to ``KB_HOME/snapshots`` (``kb export``); the report: ``export_snapshot``'s fields.

        A job, not the page's script run: a snapshot with its clones takes
        minutes, and one written in the page's run was lost, half-written,
        when its browser tab closed. It takes the shared lock itself (no sync
        or re-chunk while it reads), and a cancel anywhere leaves nothing
        behind (the export removes its temporary files).
        """
        label = "Snapshot export" + (" with the clones" if with_repos else "")
        return self.submit("export", {"with_repos": with_repos}, job_work.export_work(with_repos), label=label,
                           origin=origin, anywhere=True, writes=False)

    def submit_evaluation(self, engine, questions: list[dict], options: list, questions_name: str,
                          only_indexed: bool = False, origin: str = "dashboard") -> dict:
        """Score ``questions`` once per search options (``kb eval``); each run is saved in KB_HOME/evals.

        ``only_indexed``: only the questions on sources in the live collection
        (``KnowledgeBase.run_and_save_evaluation``). The report: ``{"runs": [one report per options]}``.
        """
        modes = [o.mode for o in options]
        args = {"questions": questions_name, "n": len(questions), "modes": modes, "k": [o.k for o in options],
                "only_indexed": only_indexed}
        return self.submit("evaluate", args,
                           job_work.evaluate_work(engine, questions, list(options), questions_name, only_indexed),
                           label=f"Evaluation ({', '.join(modes)}) on {Path(questions_name).name}", origin=origin,
                           anywhere=True, writes=False)

    def submit_answer_evaluation(self, llm, engine, questions: list[dict], options, questions_name: str,
                                 only_indexed: bool = False, limit: int | None = None,
                                 origin: str = "dashboard") -> dict:
        """Ask ``questions`` through the answer chain with ``llm`` (``kb eval --answers``); saved in evals/answers.

        A job, not the page's script run, because each answer takes the model
        seconds and leaving the page must not lose the run. ``llm`` is the
        process's shared model object: its own lock keeps one question at a
        time at it, so a chat in another session waits its turn as before.
        ``only_indexed`` and ``limit`` as ``KnowledgeBase.run_and_save_answer_evaluation``.
        It only reads: it does not wait for the write lock, and a cancel stops
        it between two questions (an unfinished run is not saved). The report:
        the saved run's (``kb eval --answers`` fields, a row per question).
        """
        args = {"questions": questions_name, "n": len(questions), "mode": options.mode, "k": options.k,
                "only_indexed": only_indexed, "limit": limit}
        return self.submit("answers", args,
                           job_work.answers_work(llm, engine, questions, options, questions_name, only_indexed, limit),
                           label=f"Answer evaluation ({options.mode}, k={options.k}) on {Path(questions_name).name}",
                           origin=origin, anywhere=True, writes=False)

    def submit_scheduled(self, origin: str = "schedule") -> dict | None:
        """Queue one scheduled fetch-and-sync, unless one is queued or running already (then None)."""
        with self._cond:
            if any(j.kind == "scheduled" and j.state in (QUEUED, RUNNING) for j in self._jobs.values()):
                return None
        return self.submit("scheduled", {"every": self.every}, job_work.scheduled_work(self, self.every),
                           label="Scheduled sync", origin=origin)

    def submit_scheduled_snapshot(self, origin: str = "schedule") -> dict | None:
        """Queue one scheduled snapshot (with the clones: an upload source can't be cloned again), unless there is
        nothing to back up yet or one is queued or running already (then None)."""
        if not self._has_live():
            return None
        with self._cond:
            if any(j.kind == "export" and j.args.get("scheduled") and j.state in (QUEUED, RUNNING)
                   for j in self._jobs.values()):
                return None
        return self.submit("export", {"with_repos": True, "scheduled": True, "keep": self.snapshot_keep},
                           job_work.export_work(True, scheduled=True, keep=self.snapshot_keep),
                           label="Scheduled snapshot", origin=origin, anywhere=True, writes=False)

    def run_scheduled_snapshot_now(self, origin: str = "cli") -> dict | None:
        """``kb watch``: the scheduled snapshot in the calling thread, when one is due (else None)."""
        from kb import snapshot

        if self.snapshot_every <= 0 or not self._has_live():
            return None
        try:
            if snapshot.scheduled_due(self.kb, self.snapshot_every) > time.time():
                return None
        except KBError:  # the folder can't be read: the export fails too, and its job says why
            pass
        return self.run_now("export", {"with_repos": True, "scheduled": True, "keep": self.snapshot_keep},
                            job_work.export_work(True, scheduled=True, keep=self.snapshot_keep),
                            label="Scheduled snapshot", origin=origin, anywhere=True, writes=False)

    def _has_live(self) -> bool:
        try:
            return bool(self.kb.manifest.live_collection)
        except Exception:  # an unreadable manifest: the export would fail the same way, and say why
            return True

    def run_now(self, kind: str, args: dict, work: Work, *, label: str = "", origin: str = "cli",
                anywhere: bool = False, writes: bool = True) -> dict:
        """Run a job in the calling thread (the CLI), with the same record, progress and persistence."""
        job = Job(new_id(), kind, label or KIND_LABELS.get(kind, kind), args, origin)
        with self._cond:
            self._jobs[job.id] = job
            self._persist(job)
        self._execute(job, work, anywhere, writes)
        return self.get(job.id)  # type: ignore[return-value]

    def run_scheduled_now(self, origin: str = "cli") -> dict:
        return self.run_now("scheduled", {"every": self.every}, job_work.scheduled_work(self, self.every),
                            label="Scheduled sync", origin=origin)

    # ------------------------------------------------------------------ control

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or a running one at its next safe point. False: no such job, or it ended."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINAL:
                return False
            if job.state == QUEUED:
                self._pending.remove(job)
                self._work.pop(job.id, None)
                job.state, job.finished, job.message = CANCELLED, time.time(), "cancelled before it started"
                self._persist(job)
                self._cond.notify_all()
                return True
            job.cancel_requested = True
            job.message = "cancelling at the next safe point…"
            self._cond.notify_all()
            return True

    def request_stop(self) -> None:
        """Ask the running job to stop at its next safe point, taking no lock (safe in a signal handler)."""
        job = self._running
        if job is not None:
            job.cancel_requested = True

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel the queued ones, ask the running one to stop, and wait a little."""
        with self._cond:
            self._closed = True
            for job in list(self._pending):
                job.state, job.finished, job.message = CANCELLED, time.time(), "the server stopped"
                self._persist(job)
            self._pending.clear()
            if self._running is not None:
                self._running.cancel_requested = True
            self._cond.notify_all()
        for t in (self._worker, self._scheduler, self._snapshotter):
            if t is not None and t is not threading.current_thread():
                t.join(timeout)

    # ------------------------------------------------------------------ reading

    def get(self, job_id: str) -> dict | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                return self._snapshot(job)
        for rec in self._from_disk():
            if rec["id"] == job_id:
                return rec
        return None

    def active(self) -> list[dict]:
        """The running job, then the queued ones in order (``ahead``: jobs before it), this process's and others'."""
        with self._cond:
            out = [self._snapshot(self._running)] if self._running is not None else []
            out += [self._snapshot(j) for j in self._pending]
        out += [r for r in self._from_disk() if r["state"] in (QUEUED, RUNNING)]
        return out

    def jobs(self, recent: int = 10) -> list[dict]:
        """The active jobs, then the ``recent`` last finished ones (newest first), from this process and the disk."""
        with self._cond:
            finished = [self._snapshot(j) for j in self._jobs.values() if j.state in FINAL]
        finished += [r for r in self._from_disk() if r["state"] in FINAL]
        finished.sort(key=lambda r: (r.get("finished") or r.get("created") or 0, r["id"]), reverse=True)
        return self.active() + finished[:recent]

    def wait(self, job_id: str, timeout: float | None = None) -> dict | None:
        """Wait until a job of this queue has ended; its record (still running after ``timeout``: as it is)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            self._cond.wait_for(lambda: job.state in FINAL, timeout)
            return self._snapshot(job)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running in this queue; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and self._running is None, timeout)

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                job = self._pending.popleft()
                work, anywhere, writes = self._work.pop(job.id)
            self._execute(job, work, anywhere, writes)

    def _execute(self, job: Job, work: Work, anywhere: bool, writes: bool) -> None:
        ctl = JobControl(self, job, self.forward, anywhere)
        with self._cond:
            self._running = job
            self._controls[job.id] = ctl
            job.state, job.started = RUNNING, time.time()
            self._persist(job)
            self._cond.notify_all()
        state, report, error = DONE, None, ""
        try:
            ctl.checkpoint()  # cancelled in the moment between taking it from the queue and starting it
            if writes:
                ctl.wait_for_lock()
            report = work(self.kb, ctl)
        except Cancelled:
            state, report = CANCELLED, ctl.report
        except UserError as exc:
            state, report, error = FAILED, ctl.report, str(exc) or type(exc).__name__
        except Exception as exc:  # a bug: keep the traceback in the log, the job says what happened
            log.exception("job %s (%s) failed", job.id, job.kind)
            state, report, error = FAILED, ctl.report, f"unexpected error: {type(exc).__name__}: {exc}"
        with self._cond:
            job.state, job.report, job.error, job.finished = state, report, error, time.time()
            if state == CANCELLED:
                job.message = "cancelled at a safe point: what was done is kept, nothing is half-written"
            elif state == DONE:
                job.message = ""
            job.stage, job.stage_total, job.stage_started = "", None, None
            self._persist(job)
            self._running = None
            self._controls.pop(job.id, None)
            self._forget_idle(job)
            self._cond.notify_all()
        self._prune()

    def _forget_idle(self, job: Job) -> None:
        """A scheduled pass that synced nothing and met no error replaces the previous such pass (lock held).

        Otherwise a 15-minute schedule would fill the history with "nothing to do"
        (``watch.json`` keeps when the last pass ran). Finished records beyond
        ``KEEP`` leave memory too: they stay on disk.
        """
        rep = job.report or {}
        if job.kind == "scheduled" and job.state == DONE and not rep.get("sources") and not rep.get("error"):
            if self._last_idle and self._last_idle in self._jobs:
                self._jobs.pop(self._last_idle)
                try:
                    (self.folder / f"{self._last_idle}.json").unlink()
                except OSError:
                    pass
            self._last_idle = job.id
        finished = [j for j in self._jobs.values() if j.state in FINAL]
        for old in sorted(finished, key=lambda j: j.id)[: max(0, len(finished) - KEEP)]:
            self._jobs.pop(old.id, None)

    def _schedule_loop(self) -> None:
        next_at = time.monotonic()
        while True:
            with self._cond:
                every = self.every
                self._cond.wait_for(lambda: self._closed or self.every != every,
                                    max(0.0, next_at - time.monotonic()) if every > 0 else None)
                if self._closed:
                    return
                if self.every != every:  # a new interval counts from the last pass
                    next_at = next_at - every + self.every if every > 0 else time.monotonic()
                    continue
            try:
                self.submit_scheduled()
            except KBError:
                return  # closed meanwhile
            next_at = max(next_at + self.every, time.monotonic())

    def _snapshot_loop(self) -> None:
        from kb import snapshot

        while True:
            with self._cond:
                every = self.snapshot_every
                wait = None
                if every > 0:
                    try:
                        due = snapshot.scheduled_due(self.kb, every)
                    except KBError:  # the folder can't be listed: try again an interval later
                        due = time.time() + every
                    wait = max(0.0, max(due, self._snapshot_not_before) - time.time())
                self._cond.wait_for(lambda: self._closed or self.snapshot_every != every, wait)
                if self._closed:
                    return
                if self.snapshot_every != every:
                    continue
                # one submission an interval at most, even while its file is not written yet or its export fails
                self._snapshot_not_before = time.time() + every
            try:
                if self.submit_scheduled_snapshot() is None and not self._has_live():
                    # nothing to back up yet: look again within a minute, not a whole interval after the first sync
                    self._snapshot_not_before = time.time() + min(every, 60.0)
            except KBError:
                return  # closed meanwhile

    # ------------------------------------------------------------------ records (called with or without the lock)

    def _update(self, ctl: JobControl, stage: str, done: float, total: float | None, message: str) -> None:
        job = ctl.job
        now = time.time()
        with self._cond:
            if stage != ctl._last_stage or done < job.stage_done:
                job.stage_started, job.stage_base = now, float(done)
                if stage == "embed":
                    ctl._embed_base = job.passages_embedded if ctl.writing else job.chunks_embedded
            ctl._last_stage = stage
            job.stage, job.stage_done, job.stage_total = stage, float(done), (float(total) if total else None)
            if not job.cancel_requested:  # else it keeps saying that it is cancelling
                job.message = message[:200]
            if stage == "load":
                job.files_done, job.files_total = int(done), int(total or 0)
            elif stage == "embed":
                if ctl.writing:  # after the chunks are stored: the passages
                    job.passages_embedded = ctl._embed_base + int(done)
                else:
                    job.chunks_embedded = ctl._embed_base + int(done)
            elif stage == "rechunk":
                job.sources_done, job.source = int(done), message
                job.files_done = job.files_total = 0
            if now - ctl._persisted >= PERSIST_EVERY:
                ctl._persisted = now
                self._persist(job)

    def _begin_source(self, ctl: JobControl, name: str, index: int, total: int) -> None:
        with self._cond:
            job = ctl.job
            job.source, job.sources_done, job.sources_total = name, index, total
            job.files_done = job.files_total = 0
            ctl._last_stage = ""

    def _set(self, job: Job, **values) -> None:
        with self._cond:
            for k, v in values.items():
                setattr(job, k, v)

    def _snapshot(self, job: Job) -> dict:
        d = job.as_dict()
        d["local"] = True
        d["ahead"] = None
        if job.state == QUEUED and job in self._pending:
            d["ahead"] = list(self._pending).index(job) + (1 if self._running is not None else 0)
        return d

    def _persist(self, job: Job) -> None:
        try:
            _atomic_write(self.folder / f"{job.id}.json", job.as_dict())
        except OSError:
            log.exception("cannot write the record of job %s", job.id)

    def _recover(self) -> None:
        """Jobs left queued or running by a process that is gone: failed, interrupted (rewritten once)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob("*.json"):
            if path.name == WATCH_FILE:
                continue
            rec = atomic.read_json(path)
            if rec and rec.get("state") in (QUEUED, RUNNING) and not _alive(rec):
                self._interrupted(path, rec)

    def _logged_by_its_marker(self, rec: dict) -> bool:
        """A running job's method left a marker that logged its death already (``kb.log.reap``, run by the read)."""
        pid = int(rec.get("pid") or 0)
        since = rec.get("started") or rec.get("created")
        return any(r.get("interrupted") and r.get("process") == pid
                   for r in runlog.read(self.kb.settings, since=since, kinds=[rec.get("kind")]))

    def _interrupted(self, path: Path, rec: dict) -> dict:
        was = rec.get("state")
        rec.update(state=FAILED, finished=rec.get("finished") or rec.get("started") or rec.get("created"),
                   error="interrupted: the process running it stopped" + (" before it started" if was == QUEUED else
                         "; a sync converges on its next run"))
        try:
            _atomic_write(path, rec)
        except OSError:
            return rec
        if rec.get("kind") in runlog.JOB_KINDS and not (was == RUNNING and self._logged_by_its_marker(rec)):
            # Home's errors and `kb log --kind KIND` count it, as the jobs table does
            runlog.log_job(self.kb.settings, rec["kind"], {"error": rec["error"], "interrupted": True,
                                                           "job": rec.get("id"), "origin": rec.get("origin")})
        return rec

    def _from_disk(self) -> list[dict]:
        """Job records of other processes and earlier runs (read once per change of the file)."""
        if not self.folder.is_dir():
            return []
        with self._cond:
            mine = set(self._jobs)
        with self._disk_lock:  # pages read from several threads at once
            return self._read_disk(mine)

    def _read_disk(self, mine: set[str]) -> list[dict]:
        out = []
        seen = set()
        for path in self.folder.glob("*.json"):
            if path.name == WATCH_FILE or path.stem in mine:
                continue
            seen.add(path.name)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            cached = self._disk.get(path.name)
            if cached is None or cached[0] != mtime:
                rec = atomic.read_json(path)
                if rec is None or "id" not in rec:
                    continue
                if rec.get("state") in (QUEUED, RUNNING) and not _alive(rec):
                    rec = self._interrupted(path, rec)
                self._disk[path.name] = cached = (mtime, rec)
            rec = dict(cached[1])
            rec["local"], rec["ahead"] = False, None
            if rec.get("state") == RUNNING and rec.get("started"):
                rec["elapsed"] = round(time.time() - rec["started"], 2)
            out.append(rec)
        for name in set(self._disk) - seen:
            self._disk.pop(name, None)
        return out

    def _prune(self) -> None:
        """Keep the newest ``KEEP`` finished job files."""
        try:
            files = sorted(p for p in self.folder.glob("*.json") if p.name != WATCH_FILE)
        except OSError:
            return
        extra = len(files) - KEEP
        for path in files:
            if extra <= 0:
                break
            rec = atomic.read_json(path)
            if rec is not None and rec.get("state") in (QUEUED, RUNNING):
                continue
            try:
                path.unlink()
                extra -= 1
            except OSError:
                pass


def watch(kb, every: float, *, once: bool = False, runs: int | None = None, progress: Progress = no_progress,
          on_run: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
          queue: JobQueue | None = None) -> int:
    """``kb watch``: a scheduled fetch-and-sync now and then every ``every`` seconds, in this thread.

    Each pass is a job like the dashboard's (kept in KB_HOME/jobs), followed by a scheduled snapshot when
    ``KB_SNAPSHOT_EVERY`` makes one due (so a snapshot is at most one pass late). Ends after
    one pass (``once``), ``runs`` passes, or when ``stop`` is set (the running
    pass stops at its next safe point if the caller also calls
    ``queue.request_stop()``). Returns the number of passes.
    """
    queue = queue or JobQueue(kb, every=every, snapshot_every=kb.settings.snapshot_every, start=False,
                              forward=progress)
    stop = stop or threading.Event()
    n = 0
    while not stop.is_set():
        t0 = time.monotonic()
        job = queue.run_scheduled_now()
        n += 1
        if on_run is not None:
            on_run(job)
        if job["state"] != CANCELLED and not stop.is_set():  # a due snapshot, after the pass (KB_SNAPSHOT_EVERY)
            snap = queue.run_scheduled_snapshot_now()
            if snap is not None and on_run is not None:
                on_run(snap)
            if snap is not None and snap["state"] == CANCELLED:
                break
        if once or (runs is not None and n >= runs) or job["state"] == CANCELLED:
            break
        stop.wait(max(0.0, every - (time.monotonic() - t0)))
    return n
