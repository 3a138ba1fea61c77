"""What each kind of background job does: the ``Work`` that :class:`kb.jobs.JobQueue` runs in its worker thread.

Each factory takes a job's arguments and returns a function of the knowledge base and the job's
:class:`~kb.jobs.JobControl`, which reports progress and raises :class:`Cancelled` at a safe point. The
queue (records, order, the write lock, the schedule) lives in ``kb/jobs.py``; what a sync, an upload, a re-chunk, an
evaluation, a snapshot or a scheduled pass does with the knowledge base lives here, so each can be read on its own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kb import log as runlog
from kb.errors import KBError

if TYPE_CHECKING:
    from kb.jobs import JobControl, JobQueue, Work


class Cancelled(Exception):
    """Raised from a job's progress callback at a safe point once someone asked to cancel the job.

    Deliberately not a :class:`~core.errors.UserError`: the sync loops turn a
    ``KBError`` into one source's error and go on with the next source, while a
    cancel must end the whole job.
    """

    cancelled = True  # the log records it as cancelled, not as a failure (kb.log.job)


def with_errors(out: dict) -> dict:
    """The report with every failed source's error joined into one line, as ``kb sync --json`` gives it."""
    failed = [r for r in out["sources"] if r.get("error")]
    if failed:
        out["error"] = "; ".join(f"{r['name']}: {r['error']}" for r in failed)
    return out


def sync_one(kb, name: str, ctl: JobControl) -> dict:
    """One source's sync, its report as ``kb sync --json`` gives it (an error of this source alone in it)."""
    from kb.ingest.sync import SyncReport
    from kb.store.index import ChromaUnreachable

    try:
        return ctl.when_lock_free(lambda: kb.sync([name], progress=ctl))[0].as_dict()
    except (ChromaUnreachable, Cancelled):  # every source would fail alike; a cancel ends the whole job
        raise
    except KBError as exc:  # e.g. the source was deleted while the job waited
        return SyncReport(name, None, None, error=str(exc)).as_dict()
    except Exception as exc:  # a bug, or a store error nobody foresaw: this source's error, the others still sync
        return SyncReport(name, None, None, error=runlog.unexpected(kb.settings, exc, f"sync of {name}")).as_dict()


def sync_work(names: list[str] | None) -> Work:
    def work(kb, ctl: JobControl) -> dict:
        todo = names or [s.name for s in kb.sources()]
        if not todo:
            raise KBError("no sources yet: add one first")
        out: dict = {"sources": []}
        ctl.report = out
        for i, name in enumerate(todo):
            ctl.begin_source(name, i, len(todo))
            out["sources"].append(sync_one(kb, name, ctl))
            ctl.job.sources_done = i + 1
        return with_errors(out)

    return work


def upload_work(files: dict[str, bytes], source: str) -> Work:
    def work(kb, ctl: JobControl) -> dict:
        ctl.begin_source(source, 0, 1)
        try:
            rep = kb.upload(files, source, progress=ctl).as_dict()
        except Cancelled:
            ctl.report = {"sources": [], "note": f"the files are committed to {source} but not indexed: "
                                                 f"sync {source} to index them"}
            raise
        return with_errors({"sources": [rep]})

    return work


def rechunk_work(config) -> Work:
    def work(kb, ctl: JobControl) -> dict:
        from core import embeddings as emb
        from kb.store.index import collection_name

        target = collection_name(config.hash, emb.model_slug(kb.settings))
        try:
            return kb.rechunk(config, ctl)
        except Cancelled:
            try:  # the live collection was never touched; the half-built one goes
                kb.drop_collection(target)
            except KBError:
                pass
            ctl.report = {"collection": target, "dropped": True}
            raise

    return work


class CountingEngine:
    """A search engine that reports each question as progress (and so can be cancelled between questions)."""

    def __init__(self, engine, ctl: JobControl, total: int) -> None:
        self._engine = engine
        self._ctl = ctl
        self._total = total
        self._done = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def search(self, query: str, options):
        hits = self._engine.search(query, options)
        self._done += 1
        self._ctl("evaluate", self._done, self._total, query[:80])
        return hits


def export_work(with_repos: bool, scheduled: bool = False, keep: int | None = None) -> Work:
    def work(kb, ctl: JobControl) -> dict:
        return ctl.when_lock_free(lambda: kb.export_snapshot(with_repos=with_repos, progress=ctl, scheduled=scheduled,
                                                             keep=keep))

    return work


def evaluate_work(engine, questions: list[dict], options: list, questions_name: str, only_indexed: bool) -> Work:
    def work(kb, ctl: JobControl) -> dict:
        from kb.evaluate import answerable

        keep = kb.indexed_sources() if only_indexed else None
        n = sum(1 for q in questions if answerable(q) and (keep is None or q.get("repo") in keep))
        counting = CountingEngine(engine, ctl, n * len(options))
        extra = {"only_indexed": True} if only_indexed else {}
        out: dict = {"runs": []}
        ctl.report = out
        for opt in options:
            out["runs"].append(kb.run_and_save_evaluation(counting, questions, opt, questions_name, **extra))
        return out

    return work


def answers_to_ask(kb, questions: list[dict], only_indexed: bool, limit: int | None) -> int:
    """How many questions an answer run asks, as ``run_and_save_answer_evaluation`` picks them: the total shown
    from the start, before the first answer (which takes the model seconds) reports it."""
    from kb.evaluate import split_indexed

    kept = split_indexed(questions, kb.indexed_sources() if only_indexed else None)[0]
    return len(kept) if limit is None else min(len(kept), max(1, int(limit)))


def answers_work(llm, engine, questions: list[dict], options, questions_name: str, only_indexed: bool,
                  limit: int | None) -> Work:
    def work(kb, ctl: JobControl) -> dict:
        from kb.answer.chain import Answerer

        total = answers_to_ask(kb, questions, only_indexed, limit)
        so_far = {"answered": 0, "of": total, "note": "an answer run is saved only once every question is answered"}
        ctl.report = so_far  # what a cancelled or failed run reports

        def answered(done: int, n: int) -> None:  # after each question: the safe point where a cancel stops the run
            so_far.update(answered=done, of=n)
            ctl("answer", done, n, f"{done} of {n} questions answered")

        answered(0, total)
        return kb.run_and_save_answer_evaluation(Answerer(llm, engine, options), questions, options, questions_name,
                                                 only_indexed=only_indexed, limit=limit, progress=answered)

    return work


def scheduled_work(queue: "JobQueue", every: float) -> Work:
    """Fetch every due git source; sync only those whose branch moved; record failures with backoff."""

    def work(kb, ctl: JobControl) -> dict:
        from kb.ingest.sync import SyncReport
        from kb.store.index import ChromaUnreachable

        at = time.time()
        live = kb.live()[0]
        # a pass that finds nothing new touches no vector: it said "done, 0 failed" for hours with the Chroma server
        # down (an operator review). The pass fails at once, naming the server, and the next one tries again.
        kb.check_store()
        rows = [s for s in kb.sources() if s.kind == "git"]
        due = [s for s in rows if queue.watch.due(s.name, at)]
        state = queue.watch.load()["sources"]
        out: dict = {"sources": [], "unchanged": [],
                     "backing_off": [{"name": s.name, "failures": state[s.name]["failures"],
                                      "next_try": state[s.name]["next_try"]} for s in rows if s not in due]}
        ctl.report = out
        for i, src in enumerate(due):
            ctl.begin_source(src.name, i, len(due))
            try:
                head = ctl.when_lock_free(lambda: kb.fetch_source(src.name, progress=ctl))
            except (ChromaUnreachable, Cancelled):
                raise
            except Exception as exc:  # unreachable remote, missing branch: recorded, the index is not touched
                error = (str(exc) if isinstance(exc, KBError)
                         else runlog.unexpected(kb.settings, exc, f"fetch of {src.name}"))
                queue.watch.failed(src.name, error, at, every)  # backs off, as a failing sync does
                rep = SyncReport(src.name, src.indexed_commit, None, error=f"fetch failed: {error}").as_dict()
                out["sources"].append(rep)
                # logged as a job of its own: no sync runs, and the Home page would show the source's last sync "ok"
                runlog.log_job(kb.settings, "fetch", {"sources": [rep], "origin": ctl.job.origin})
                continue
            if state.get(src.name, {}).get("failures"):  # back after failing: logged, so Home's last outcome is it
                runlog.log_job(kb.settings, "fetch", {"sources": [SyncReport(src.name, src.indexed_commit, head)
                                                                  .as_dict()], "origin": ctl.job.origin,
                                                      "recovered": True})
            if head == src.indexed_commit and src.indexed_collection == live:
                queue.watch.succeeded(src.name, at)
                out["unchanged"].append(src.name)
                continue
            rep = sync_one(kb, src.name, ctl)
            if rep["error"]:
                queue.watch.failed(src.name, rep["error"], at, every)
            else:
                queue.watch.succeeded(src.name, at)
            out["sources"].append(rep)
            ctl.job.sources_done = i + 1
        queue.watch.ran(at, every, ctl.job.origin)
        return with_errors(out)

    return work
