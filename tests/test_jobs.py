"""Background jobs (kb/jobs.py) and the scheduled sync (KB_SYNC_EVERY, ``kb watch``).

Real syncs on the shared bundles with the tiny embedding model; cancelling is
timed by an embedding model that holds a chosen call until the test has asked
to cancel, so the safe points are hit exactly, not by luck.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from itertools import repeat
from pathlib import Path

import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from pydantic import Field

from conftest import ROOT, base_settings, git
from core.errors import SettingsError
from core.settings import load_settings, parse_interval
from kb import log as runlog
from kb.errors import KBError
from kb.jobs import CANCELLED, DONE, FAILED, JobQueue, watch
from kb.schedule import DUE_SLACK, WatchState, sync_failures

CLI_FIELDS = ["name", "commit_before", "commit_after", "files_added", "files_modified", "files_deleted",
              "chunks_embedded", "chunks_reused", "chunks_deleted", "seconds"]


class HeldEmbeddings(Embeddings):
    """Holds the ``hold_at``-th embed_documents call until ``release`` is set (``entered`` says it is there)."""

    def __init__(self, inner: Embeddings, hold_at: int | None = 1) -> None:
        self.inner = inner
        self.hold_at = hold_at
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        if self.calls == self.hold_at:
            self.entered.set()
            assert self.release.wait(300), "never released"
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)


def make_kb(home: Path, tiny_st_dir: Path, embeddings: Embeddings):
    from kb.service import KnowledgeBase

    return KnowledgeBase(base_settings(home, embed_model=str(tiny_st_dir), embed_backend="torch"), embeddings=embeddings)


def ids(kb) -> tuple[list[str], list[str]]:
    live = kb.manifest.live_collection
    passages = kb.index.passages(live)
    return sorted(kb.index.get(live).get(include=[])["ids"]), sorted(passages.get(include=[])["ids"]) if passages else []


@pytest.fixture
def queue_of():
    """``queue_of(kb, **kw)``: a JobQueue closed at the end of the test."""
    made: list[JobQueue] = []

    def make(kb, **kw) -> JobQueue:
        q = JobQueue(kb, **kw)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close(timeout=60)


def wait_for(predicate, timeout: float = 300, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError("timed out")


# ---------------------------------------------------------------------------- settings


def test_sync_every_setting():
    assert parse_interval("15m") == 900 and parse_interval("30s") == 30 and parse_interval("1h") == 3600
    assert parse_interval("1h30m") == 5400 and parse_interval("0") == 0 and parse_interval("") == 0
    assert load_settings(env={"KB_SYNC_EVERY": "15m"}, secrets_path=Path("/nonexistent")).sync_every == 900
    assert load_settings(env={}, secrets_path=Path("/nonexistent")).sync_every == 0
    assert parse_interval("1d") == 86400 and parse_interval("1d12h") == 129600
    for bad in ("15", "15x", "m", "-5m", "fast", "1w"):
        with pytest.raises(SettingsError, match="KB_SYNC_EVERY=.*s, m, h or d"):
            load_settings(env={"KB_SYNC_EVERY": bad}, secrets_path=Path("/nonexistent"))
    assert parse_interval("365d") == 365 * 86400  # a wait past threading's limit was an OverflowError, one pass in
    with pytest.raises(SettingsError, match="--every='200000d' is longer than a year"):
        parse_interval("200000d", "--every")
    snap = load_settings(env={"KB_SNAPSHOT_EVERY": "1d", "KB_SNAPSHOT_KEEP": "3"}, secrets_path=Path("/nonexistent"))
    assert (snap.snapshot_every, snap.snapshot_keep) == (86400, 3)
    assert load_settings(env={}, secrets_path=Path("/nonexistent")).snapshot_every == 0
    with pytest.raises(SettingsError, match="KB_SNAPSHOT_EVERY='daily' is not an interval"):
        load_settings(env={"KB_SNAPSHOT_EVERY": "daily"}, secrets_path=Path("/nonexistent"))
    with pytest.raises(SettingsError, match="KB_SNAPSHOT_KEEP=0: use 1 or more"):
        load_settings(env={"KB_SNAPSHOT_KEEP": "0"}, secrets_path=Path("/nonexistent"))


# ---------------------------------------------------------------------------- jobs


def test_eta_is_the_current_stage_at_its_rate_so_far():
    from kb.jobs import Job

    job = Job("j", "sync", "Sync", state="running", stage="embed", stage_total=100, stage_done=50, stage_base=10,
              stage_started=100.0, started=90.0)
    assert job.eta(now=104.0) == 5.0  # 40 timed in 4 s (the first report's 10 were not), 50 left
    assert job.elapsed(now=104.0) == 14.0
    assert Job("j", "sync", "Sync", state="running", stage_total=None).eta() is None
    # "3 / 3" is reported as the last item starts: not "0.0 s left" while it runs (a browser review)
    assert Job("j", "sync", "Sync", state="running", stage_total=3, stage_done=3, stage_base=0,
               stage_started=1.0).eta(now=10.0) is None
    assert Job("j", "sync", "Sync", state="done", stage_total=10, stage_done=5, stage_started=1.0).eta() is None


def test_sync_job_reports_like_the_cli_and_is_kept_across_restarts(tiny_kb, corpus, queue_of):
    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    queue = queue_of(tiny_kb)
    job = queue.submit_sync(["lagent"])
    assert job["state"] in ("queued", "running") and job["kind"] == "sync" and job["args"] == {"names": ["lagent"]}
    done = queue.wait(job["id"], 300)
    assert done["state"] == DONE, done
    rep = done["report"]["sources"][0]
    assert all(k in rep for k in CLI_FIELDS) and not rep["error"] and "error" not in done["report"]
    assert rep["chunks_embedded"] > 0 and rep["files_added"] > 0
    # the progress that fed the record agrees with the report
    assert done["chunks_embedded"] == rep["chunks_embedded"] and done["passages_embedded"] == rep["passages_embedded"]
    assert done["files_total"] == done["files_done"] > 0 and done["elapsed"] > 0 and done["eta"] is None
    assert tiny_kb.manifest.source("lagent").indexed_commit == rep["commit_after"]

    path = tiny_kb.settings.home / "jobs" / f"{job['id']}.json"
    kept = json.loads(path.read_text())
    assert kept["state"] == DONE and kept["report"] == done["report"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically
    queue.close()
    later = queue_of(tiny_kb)  # a restarted server
    listed = later.jobs()
    assert listed[0]["id"] == job["id"] and listed[0]["report"] == done["report"] and not listed[0]["local"]
    assert later.get(job["id"])["state"] == DONE


def blocker(started: threading.Event, release: threading.Event):
    """Work that waits (cancellably) until released."""

    def work(kb, ctl):
        started.set()
        while not release.is_set():
            ctl.checkpoint()
            time.sleep(0.02)
        return {"blocked": True}

    return work


def test_a_second_job_queues_with_its_place_and_cancelling_works(tiny_kb, corpus, queue_of):
    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    queue = queue_of(tiny_kb)
    started, release = threading.Event(), threading.Event()
    first = queue.submit("test", {}, blocker(started, release), label="Blocker")
    assert started.wait(30)
    second = queue.submit_sync(["lagent"])
    third = queue.submit_sync()
    active = queue.active()
    assert [(j["id"], j["state"], j["ahead"]) for j in active] == [
        (first["id"], "running", None), (second["id"], "queued", 1), (third["id"], "queued", 2)]
    # a queued job is cancelled at once and never runs; the one behind it moves up
    assert queue.cancel(second["id"])
    assert queue.get(second["id"])["state"] == CANCELLED and queue.get(third["id"])["ahead"] == 1
    # a running one stops at its next safe point
    assert queue.cancel(first["id"])
    assert queue.wait(first["id"], 30)["state"] == CANCELLED
    done = queue.wait(third["id"], 300)
    assert done["state"] == DONE and [r["name"] for r in done["report"]["sources"]] == ["lagent"]
    assert not queue.cancel(third["id"]) and not queue.cancel("no-such-job")
    assert json.loads((tiny_kb.settings.home / "jobs" / f"{second['id']}.json").read_text())["state"] == CANCELLED
    assert queue.wait_idle(5)


def test_cancel_mid_sync_leaves_a_healthy_index_and_a_resync_completes(tmp_path, tiny_st_dir, tiny_embeddings, corpus,
                                                                       queue_of):
    clean = make_kb(tmp_path / "clean", tiny_st_dir, tiny_embeddings)
    held = HeldEmbeddings(tiny_embeddings, hold_at=1)  # the first batch of lagent's chunks
    kb = make_kb(tmp_path / "home", tiny_st_dir, held)
    for k in (clean, kb):
        for name in ("lagent", "InternLM"):
            k.add_source(name, str(corpus / f"{name}.bundle"))
    clean.sync()
    queue = queue_of(kb)
    job = queue.submit_sync(["lagent", "InternLM"])
    assert held.entered.wait(120)
    assert queue.cancel(job["id"])
    assert "cancelling" in queue.get(job["id"])["message"]
    held.release.set()
    out = queue.wait(job["id"], 300)
    assert out["state"] == CANCELLED and out["report"] == {"sources": []}, out
    assert out["chunks_embedded"] > 0  # it was stopped after a batch, before any write
    logged = runlog.read(kb.settings, kinds=["sync"])[-1]  # a cancel is what someone asked for, not a failure
    assert logged["cancelled"] and "error" not in logged and not kb.activity(1)["failed_jobs"]
    assert runlog.describe(logged).endswith(f"cancelled (job {job['id']})")
    assert kb.verify()["healthy"]
    assert kb.manifest.source("lagent").indexed_commit is None and kb.stats()["chunks"] == 0
    again = kb.sync()
    assert all(not r.error and r.files_added > 0 for r in again)
    assert kb.verify()["healthy"] and ids(kb) == ids(clean)


def test_a_cancel_while_writing_waits_for_the_source_to_be_recorded(tmp_path, tiny_st_dir, tiny_embeddings, corpus,
                                                                     queue_of):
    held = HeldEmbeddings(tiny_embeddings, hold_at=2)  # lagent's passages: its chunks are stored by then
    kb = make_kb(tmp_path / "home", tiny_st_dir, held)
    for name in ("lagent", "InternLM"):
        kb.add_source(name, str(corpus / f"{name}.bundle"))
    queue = queue_of(kb)
    job = queue.submit_sync(["lagent", "InternLM"])
    assert held.entered.wait(120)
    live = kb.manifest.live_collection
    assert kb.index.get(live).count() > 0, "the hold is after the chunk writes"
    queue.cancel(job["id"])
    held.release.set()
    out = queue.wait(job["id"], 300)
    assert out["state"] == CANCELLED
    assert [r["name"] for r in out["report"]["sources"]] == ["lagent"]  # finished, then stopped before InternLM
    assert kb.manifest.source("lagent").indexed_commit and not kb.manifest.source("InternLM").indexed_commit
    assert kb.verify()["healthy"]
    assert all(not r.error for r in kb.sync())
    assert kb.verify()["healthy"]


def test_cancelled_rechunk_keeps_the_live_collection_and_drops_the_half_built_one(tmp_path, tiny_st_dir,
                                                                                  tiny_embeddings, corpus, queue_of):
    held = HeldEmbeddings(tiny_embeddings, hold_at=None)
    kb = make_kb(tmp_path / "home", tiny_st_dir, held)
    kb.add_source("lagent", str(corpus / "lagent.bundle"))
    kb.sync()
    live, before = kb.manifest.live_collection, ids(kb)
    held.hold_at, held.calls = 2, 0  # after the new collection's chunks are stored
    queue = queue_of(kb)
    job = queue.submit_rechunk(kb.rechunk_config(size=200, overlap=20))
    assert held.entered.wait(120)
    assert len(kb.index.names()) > 1
    queue.cancel(job["id"])
    held.release.set()
    out = queue.wait(job["id"], 300)
    assert out["state"] == CANCELLED and out["report"]["dropped"]
    assert runlog.read(kb.settings, kinds=["rechunk"])[-1]["cancelled"] and not kb.activity(1)["failed_jobs"]
    assert kb.manifest.live_collection == live and kb.index.names() == [live] and ids(kb) == before
    assert kb.verify()["healthy"] and not [p for p in kb.health() if p["kind"] == "not_live"]


def test_a_collection_left_building_by_a_dead_rechunk_is_interrupted_and_never_made_live(tiny_kb):
    """kill -9 mid re-chunk left its collection "building", and the page offered to make it live (a review)."""
    from kb.store.manifest import write_lock

    tiny_kb.upload({"notes.md": b"# Notes\n\nLive.\n"}, "notes")
    config = tiny_kb.rechunk_config(size=200, overlap=20)
    name = "kb-halfbuilt"
    tiny_kb.index.create(name, config.to_json(), tiny_kb.embed_model)
    tiny_kb.manifest.put_collection(name, config.to_json(), tiny_kb.embed_model, "building")
    status = lambda: next(c["status"] for c in tiny_kb.collections() if c["name"] == name)  # noqa: E731
    with write_lock(tiny_kb.settings.home):  # a re-chunk running: it holds the lock while it builds
        assert status() == "building"
    assert status() == "interrupted"
    with pytest.raises(KBError, match="is not complete"):
        tiny_kb.set_live(name)


def test_upload_job_and_a_failing_one(tiny_kb, queue_of):
    queue = queue_of(tiny_kb)
    ok = queue.wait(queue.submit_upload({"notes.md": b"# Notes\n\nJobs run in the background.\n"}, "notes")["id"], 300)
    assert ok["state"] == DONE and ok["report"]["sources"][0]["chunks_embedded"] > 0
    assert ok["args"] == {"source": "notes", "files": ["notes.md"], "bytes": len(b"# Notes\n\nJobs run in the background.\n")}
    bad = queue.wait(queue.submit_upload({"../evil.md": b"x"}, "notes")["id"], 60)
    assert bad["state"] == FAILED and "refused" in bad["error"]
    assert tiny_kb.verify()["healthy"]


def test_a_snapshot_export_job_waits_for_a_writer_and_a_cancel_leaves_no_file(tiny_kb, corpus, queue_of,
                                                                              monkeypatch):
    from kb import snapshot
    from kb.store.manifest import write_lock

    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    tiny_kb.sync(["lagent"])
    queue = queue_of(tiny_kb)
    folder = tiny_kb.settings.home / "snapshots"
    with write_lock(tiny_kb.settings.home):  # a `kb sync` in a terminal: the export waits, it does not fail
        job = queue.submit_export(with_repos=True)
        wait_for(lambda: queue.get(job["id"])["stage"] == "waiting")
    done = queue.wait(job["id"], 300)
    assert done["state"] == DONE and done["label"] == "Snapshot export with the clones"
    rep = done["report"]
    assert Path(rep["path"]).parent == folder and rep["repos"] == ["lagent"] and rep["chunks"] > 0
    assert [s["path"] for s in tiny_kb.snapshots()] == [rep["path"]]
    assert snapshot.read_index(Path(rep["path"]))["counts"]["chunks"] == rep["chunks"]

    entered, release = threading.Event(), threading.Event()
    add_file = snapshot._add_file

    def held(tar, name, path):  # the archive is half-packed when the cancel comes
        entered.set()
        assert release.wait(60)
        add_file(tar, name, path)

    monkeypatch.setattr(snapshot, "_add_file", held)
    second = queue.submit_export()
    assert entered.wait(60)
    assert queue.cancel(second["id"])
    release.set()
    assert queue.wait(second["id"], 60)["state"] == CANCELLED
    assert sorted(p.name for p in folder.iterdir()) == [Path(rep["path"]).name]  # no archive, no temporary file
    kinds = [(r["kind"], bool(r.get("cancelled"))) for r in runlog.read(tiny_kb.settings)]
    assert ("export", False) in kinds and ("export", True) in kinds


def test_scheduled_snapshots_are_due_an_interval_after_the_newest_and_only_theirs_are_pruned(tiny_kb):
    from kb import snapshot

    folder = tiny_kb.settings.home / "snapshots"
    assert snapshot.scheduled_due(tiny_kb, 3600, now=1000.0) == 1000.0  # none yet: due now
    folder.mkdir(parents=True)
    made = {}
    for i, name in enumerate(["kb-snapshot-auto-1.tar.gz", "kb-snapshot-auto-2.tar.gz", "kb-snapshot-by-hand.tar.gz",
                              "kb-snapshot-auto-3.tar.gz", ".kb-snapshot-auto-4.tar.gz.123.abcd1234.part"]):
        path = folder / name
        path.write_bytes(b"x")
        os.utime(path, (1000.0 + i, 1000.0 + i))
        made[name] = path
    assert snapshot.scheduled_due(tiny_kb, 3600, now=2000.0) == 1003.0 + 3600  # the newest auto one, not by hand
    assert snapshot.scheduled_due(tiny_kb, 3600, now=500.0) == 500.0 + 3600  # a file dated ahead of the clock
    assert snapshot.prune_scheduled(tiny_kb, 2) == ["kb-snapshot-auto-1.tar.gz"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n in made if n != "kb-snapshot-auto-1.tar.gz")
    assert snapshot.prune_scheduled(tiny_kb, 0) == ["kb-snapshot-auto-2.tar.gz"]  # at least one is always kept
    assert [f["name"] for f in tiny_kb.snapshots()] == ["kb-snapshot-auto-3.tar.gz", "kb-snapshot-by-hand.tar.gz"]


def test_the_queue_writes_scheduled_snapshots_and_keeps_the_newest(tiny_kb, corpus, queue_of):
    from kb import snapshot

    idle = queue_of(tiny_kb, snapshot_every=0.5, snapshot_keep=2)
    time.sleep(1.5)
    assert not idle.jobs() and not tiny_kb.snapshots()  # nothing to back up yet: no job, no failure
    idle.close(timeout=30)

    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    tiny_kb.sync(["lagent"])
    by_hand = tiny_kb.export_snapshot()["path"]
    queue = queue_of(tiny_kb, snapshot_every=1.0, snapshot_keep=2)
    done = wait_for(lambda: (lambda d: d if len(d) >= 3 else None)(
        [j for j in queue.jobs(recent=20) if j["kind"] == "export" and j["state"] == DONE]), timeout=300)
    assert all(j["label"] == "Scheduled snapshot" and j["origin"] == "schedule" for j in done)
    assert any(j["report"]["removed"] for j in done)  # the third removed the first
    queue.set_snapshot_every(0)
    assert queue.wait_idle(120)
    names = [f["name"] for f in tiny_kb.snapshots()]
    auto = [n for n in names if n.startswith(snapshot.SCHEDULED_PREFIX)]
    assert len(auto) == 2 and Path(by_hand).name in names  # the newest two, and the one written by hand
    index = snapshot.read_index(tiny_kb.settings.home / "snapshots" / auto[0])
    assert index["with_repos"] is True and index["repos"] == ["lagent"]
    sched = tiny_kb.snapshot_schedule()
    assert sched["every"] == 0 and sched["next_run"] is None  # the settings' schedule: off


def test_files_committed_by_an_upload_killed_before_indexing_are_reported_stale(tiny_kb):
    """kill -9 between an upload's commit and its index left the files unsearchable while every check said healthy."""
    from kb.ingest import sources

    tiny_kb.upload({"notes.md": b"# Notes\n\nIndexed.\n"}, "notes")
    assert tiny_kb.health() == []
    src = tiny_kb.manifest.source("notes")
    head = sources.commit_uploads("notes", Path(src.repo_path), {"late.md": b"# Late\n\nCommitted, never indexed.\n"})
    stale = [p for p in tiny_kb.health() if p["subject"] == "notes"]
    assert [p["kind"] for p in stale] == ["not_indexed"]
    assert f"uploaded files not yet indexed: its branch is at {head[:8]}" in stale[0]["message"]
    # kb verify says so too (an operator review: it said healthy, and nothing else), without calling it inconsistent
    checked = tiny_kb.verify()
    assert checked["healthy"] and checked["not_indexed"] == [{"source": "notes", "head": head}]
    (report,) = tiny_kb.sync(["notes"])
    assert report.added == ["uploads/late.md"] and tiny_kb.health() == [] and tiny_kb.verify()["not_indexed"] == []


def test_evaluation_job_reports_each_question(tiny_kb, corpus, queue_of):
    from kb.evaluate import load_questions
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions

    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    tiny_kb.sync()
    questions = [q for q in load_questions(corpus / "dev_questions.jsonl") if q["repo"] == "lagent"]
    seen: list[tuple] = []
    queue = queue_of(tiny_kb, forward=lambda *a: seen.append(a))
    job = queue.submit_evaluation(SearchEngine(tiny_kb), questions, [SearchOptions(k=3, mode="bm25")],
                                  "dev_questions.jsonl")
    out = queue.wait(job["id"], 300)
    assert out["state"] == DONE and out["stage"] == ""
    run = out["report"]["runs"][0]
    assert run["n"] == len(questions) and run["mode"] == "bm25" and out["args"]["modes"] == ["bm25"]
    assert [c for c in seen if c[0] == "evaluate"][-1][1:3] == (len(questions), len(questions))  # one per question
    assert (tiny_kb.settings.home / "evals").is_dir()


def test_a_job_whose_process_died_is_recorded_as_interrupted(tiny_kb, queue_of):
    folder = tiny_kb.settings.home / "jobs"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    rec = {"id": "20000101-000000000-abcdef", "kind": "sync", "label": "Sync all sources", "state": "running",
           "pid": int(dead.stdout), "host": socket.gethostname(), "created": 1.0, "started": 2.0}
    (folder / f"{rec['id']}.json").write_text(json.dumps(rec))
    queue = queue_of(tiny_kb)
    got = queue.get(rec["id"])
    assert got["state"] == FAILED and "interrupted" in got["error"] and not queue.active()
    assert json.loads((folder / f"{rec['id']}.json").read_text())["state"] == FAILED
    # counted where the other failures are: Home's errors and `kb log` (a browser review: Home said 3, the jobs table 7)
    (logged,) = [r for r in runlog.read(tiny_kb.settings, kinds=["sync"]) if r.get("job") == rec["id"]]
    assert logged["interrupted"] and "interrupted" in logged["error"]
    assert any("interrupted" in f["error"] for f in tiny_kb.activity(1)["failed_jobs"])

    # the same death, also left as its method's marker (kb.log.running): logged once, not twice
    before = len(runlog.read(tiny_kb.settings, kinds=["sync"]))
    rec2 = {**rec, "id": "20000101-000000000-abcde2", "started": 3.0}
    (folder / f"{rec2['id']}.json").write_text(json.dumps(rec2))
    markers = tiny_kb.settings.home / "logs" / runlog.RUNNING
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"{rec2['pid']}-sync-deadbeef.json").write_text(json.dumps(
        {"kind": "sync", "pid": rec2["pid"], "host": socket.gethostname(), "started": "2000-01-01T00:00:03.000Z"}))
    assert queue_of(tiny_kb).get(rec2["id"])["state"] == FAILED
    after = runlog.read(tiny_kb.settings, kinds=["sync"])
    assert len(after) == before + 1 and after[-1]["process"] == rec2["pid"] and not list(markers.iterdir())


def test_a_cli_sync_killed_mid_way_is_logged_as_interrupted_by_the_next_process(tmp_path, tiny_st_dir, corpus):
    """An operator review: `kill -9` of a `kb sync` left nothing in `kb log`; its marker now outlives it."""
    env = {**os.environ, "KB_HOME": str(tmp_path / "home"), "KB_EMBED_MODEL": str(tiny_st_dir),
           "KB_EMBED_BACKEND": "torch"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kb", *a], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=600)
    assert run("add", "InternLM", str(corpus / "InternLM.bundle"), "-q").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "kb", "sync", "-q"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = tmp_path / "home" / "logs" / runlog.RUNNING
    wait_for(lambda: markers.is_dir() and list(markers.glob(f"{proc.pid}-sync-*.json")), timeout=120, every=0.02)
    proc.kill()
    proc.wait(timeout=30)
    (rec,) = json.loads(run("log", "--kind", "sync", "--json").stdout)["records"]
    assert rec["interrupted"] and rec["process"] == proc.pid and "interrupted: process" in rec["error"]
    assert not list(markers.iterdir())
    assert len(json.loads(run("log", "--kind", "sync", "--json").stdout)["records"]) == 1  # logged once
    assert run("sync", "-q").returncode == 0  # and the next sync converges


# ---------------------------------------------------------------------------- scheduled sync


@pytest.fixture
def small_remote(tmp_path, corpus):
    """A bare repo made from lagent.bundle, holding one more commit (a new page and an edited one) that main is
    moved to by the test: like ``history_remote``, at a fraction of the cost."""
    remote = tmp_path / "lagent-remote.git"
    git("clone", "-q", "--bare", str(corpus / "lagent.bundle"), str(remote))
    work = tmp_path / "lagent-work"
    git("clone", "-q", str(remote), str(work))
    git("config", "user.email", "t@t", cwd=work)
    git("config", "user.name", "t", cwd=work)
    (work / "docs").mkdir(exist_ok=True)
    (work / "docs" / "scheduled.md").write_text("# Scheduled sync\n\nThe watcher fetched this page on its own.\n")
    readme = work / "README.md"
    readme.write_text(readme.read_text() + "\n\nOne more line from upstream.\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", "upstream moves on", cwd=work)
    old = git("rev-parse", "main", cwd=remote)
    new = git("rev-parse", "HEAD", cwd=work)
    git("push", "-q", str(remote), "HEAD:refs/heads/next", cwd=work)  # the objects are there; main is not moved yet
    return remote, old, new


def scheduled(queue: JobQueue) -> list[dict]:
    return [j for j in queue.jobs(recent=100) if j["kind"] == "scheduled" and j["state"] == DONE]


def test_the_dashboard_schedule_syncs_a_new_commit_while_it_runs(tiny_kb, history_remote, queue_of):
    remote, old, new = history_remote
    tiny_kb.add_source("xtuner", str(remote))
    tiny_kb.upload({"notes.md": b"# Notes\n"}, "notes")  # a files-only source: never fetched
    queue = queue_of(tiny_kb, every=1.0)
    first = wait_for(lambda: [j for j in scheduled(queue) if j["report"]["sources"]])[0]
    rep = first["report"]["sources"][0]
    assert first["origin"] == "schedule" and rep["name"] == "xtuner" and rep["commit_after"] == old
    assert [r["name"] for r in first["report"]["sources"]] == ["xtuner"]
    wait_for(lambda: [j for j in scheduled(queue) if j["report"]["unchanged"] == ["xtuner"]])  # nothing to do
    git("update-ref", "refs/heads/main", new, cwd=remote)  # the remote moves on while the schedule runs
    moved = wait_for(lambda: [j for j in scheduled(queue)
                              if j["report"]["sources"] and j["report"]["sources"][0]["commit_after"] == new])[0]
    rep = moved["report"]["sources"][0]
    assert (rep["commit_before"], rep["files_added"], rep["files_modified"], rep["files_deleted"]) == (old, 17, 12, 0)
    assert tiny_kb.manifest.source("xtuner").indexed_commit == new and tiny_kb.verify()["healthy"]
    assert (tiny_kb.settings.home / "jobs" / f"{moved['id']}.json").is_file()
    assert tiny_kb.sync_failures() == []


def test_an_unreachable_remote_is_recorded_retried_with_backoff_and_never_touches_the_index(tiny_kb, small_remote,
                                                                                             queue_of):
    remote, old, new = small_remote
    tiny_kb.add_source("lagent", str(remote))
    every = 60.0
    queue = queue_of(tiny_kb, every=every, start=False)
    assert queue.run_scheduled_now()["report"]["sources"][0]["commit_after"] == old
    before = ids(tiny_kb)
    git("update-ref", "refs/heads/main", new, cwd=remote)
    moved = remote.with_name("moved.git")
    remote.rename(moved)  # the remote is gone

    out = queue.run_scheduled_now()
    assert out["state"] == DONE and "fetch failed" in out["report"]["sources"][0]["error"] and out["report"]["error"]
    assert ids(tiny_kb) == before and tiny_kb.manifest.source("lagent").indexed_commit == old
    fail = tiny_kb.sync_failures()
    assert [f["source"] for f in fail] == ["lagent"] and fail[0]["failures"] == 1 and fail[0]["last_error"]
    # in the log too, so the Home page shows the source's last outcome as this failure, not its last sync's "ok"
    act = tiny_kb.activity(1)
    assert [(f["kind"], f["source"]) for f in act["failed_jobs"]] == [("fetch", "lagent")]
    assert act["last_sync"]["lagent"]["job"] == "fetch" and "fetch failed" in act["last_sync"]["lagent"]["error"]
    assert "lagent: ERROR fetch failed" in runlog.describe(runlog.read(tiny_kb.settings, kinds=["fetch"])[-1])
    # due at the next pass, even one that starts a little before a whole interval has passed
    assert fail[0]["next_try"] - fail[0]["last_failure"] == pytest.approx(every * (1 - DUE_SLACK))
    # until then, a pass leaves it alone (backing off), without touching it
    out = queue.run_scheduled_now()
    assert out["report"]["sources"] == [] and [b["name"] for b in out["report"]["backing_off"]] == ["lagent"]

    # its next try fails again: the wait doubles
    state = WatchState(tiny_kb.settings.home / "jobs" / "watch.json")
    state._change(lambda d: d["sources"]["lagent"].update(next_try=0))
    queue.run_scheduled_now()
    fail = sync_failures(tiny_kb.settings.home)
    assert fail[0]["failures"] == 2 and fail[0]["next_try"] - fail[0]["last_failure"] == pytest.approx(
        2 * every - DUE_SLACK * every)
    assert ids(tiny_kb) == before

    # the remote is back: the next try syncs the new commit and the failure is cleared
    moved.rename(remote)
    state._change(lambda d: d["sources"]["lagent"].update(next_try=0))
    out = queue.run_scheduled_now()
    assert out["report"]["sources"][0]["commit_after"] == new and not out["report"].get("error")
    assert tiny_kb.sync_failures() == [] and tiny_kb.verify()["healthy"]
    back = runlog.read(tiny_kb.settings, kinds=["fetch"])[-1]  # logged, so Home's last outcome is not the failure
    assert back["recovered"] and "fetched again after failing" in runlog.describe(back)
    assert not tiny_kb.activity(1)["last_sync"]["lagent"]["error"]


def test_kb_watch_cli_syncs_a_new_commit_and_stops_on_sigterm(tmp_path, tiny_st_dir, small_remote):
    remote, old, new = small_remote
    env = {**os.environ, "KB_HOME": str(tmp_path / "home"), "KB_EMBED_MODEL": str(tiny_st_dir),
           "KB_EMBED_BACKEND": "torch", "PYTHONUNBUFFERED": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kb", *a], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=600)
    assert run("add", "lagent", str(remote), "-q").returncode == 0
    bad = run("watch", "--every", "15", "--json")
    assert bad.returncode == 1 and "not an interval" in bad.stderr and "Traceback" not in bad.stderr
    once = run("watch", "--once", "--json")
    assert once.returncode == 0, once.stderr
    out = json.loads(once.stdout)
    assert out["state"] == "done" and out["sources"][0]["commit_after"] == old and CLI_FIELDS[0] in out["sources"][0]
    assert "snapshot" not in out  # KB_SNAPSHOT_EVERY is off
    # a scheduled snapshot after the pass, once it is due: the first now, the next an interval after it
    bad = run("watch", "--once", "--snapshot-every", "5")
    assert bad.returncode == 1 and "--snapshot-every='5' is not an interval" in bad.stderr
    snap = json.loads(run("watch", "--once", "--json", "--snapshot-every", "1h").stdout)["snapshot"]
    assert snap["state"] == "done" and snap["scheduled"] and snap["repos"] == ["lagent"]
    assert Path(snap["path"]).name.startswith("kb-snapshot-auto-") and Path(snap["path"]).is_file()
    assert "snapshot" not in json.loads(run("watch", "--once", "--json", "--snapshot-every", "1h").stdout)
    text = run("watch", "--once", "--snapshot-every", "1s")
    assert text.returncode == 0 and " snapshot: " in text.stdout and "kb-snapshot-auto-" in text.stdout, text.stdout
    snaps = tmp_path / "home" / "snapshots"  # a backup that fails fails a cron job's `kb watch --once` too
    snaps.rename(tmp_path / "aside")
    snaps.write_text("in the way")
    failed = run("watch", "--once", "--snapshot-every", "1s")
    assert failed.returncode == 1 and "snapshot failed: cannot write the snapshot in" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    snaps.unlink()
    (tmp_path / "aside").rename(snaps)

    proc = subprocess.Popen([sys.executable, "-m", "kb", "watch", "--every", "1s", "--json"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: [lines.append(json.loads(line)) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(x.get("unchanged") == ["lagent"] for x in lines), timeout=120)
        git("update-ref", "refs/heads/main", new, cwd=remote)
        got = wait_for(lambda: [x for x in lines if x.get("sources") and x["sources"][0]["commit_after"] == new],
                       timeout=300)[0]
        assert (got["sources"][0]["files_added"], got["sources"][0]["files_modified"]) == (1, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()
    assert lines[-1]["stopped"] == "signal" and lines[-1]["runs"] >= 2
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "home" / "jobs").glob("2*.json")]
    assert jobs and all(j["origin"] == "cli" for j in jobs)
    failed = [j for j in jobs if j["state"] not in ("done", "cancelled")]
    assert [(j["kind"], j["state"]) for j in failed] == [("export", "failed")]  # the snapshot in the way, above
    assert lines[-1]["failed_passes"] == 0
    # a bounded watch whose passes fail (the remote gone) says so in its status: it exited 0 (an operator review)
    remote.rename(remote.with_name("gone"))
    bounded = run("watch", "--every", "1s", "--runs", "2", "--json")
    summary = json.loads(bounded.stdout.strip().splitlines()[-1])
    assert bounded.returncode == 1 and summary["failed_passes"] >= 1 and "passes failed" in summary["error"]


def test_watch_function_runs_passes_and_stops(tiny_kb, corpus):
    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    seen: list[dict] = []
    assert watch(tiny_kb, 0.05, runs=2, on_run=seen.append) == 2
    assert seen[0]["report"]["sources"][0]["name"] == "lagent" and seen[1]["report"]["unchanged"] == ["lagent"]
    tiny_kb.upload({"a.md": b"# A\n"}, "files")
    with pytest.raises(KBError, match="not a git repository"):
        tiny_kb.fetch_source("files")


def test_the_schedule_can_be_turned_on_retuned_and_off(tiny_kb, queue_of):
    queue = queue_of(tiny_kb)
    time.sleep(0.3)
    assert not scheduled(queue)  # KB_SYNC_EVERY unset: no schedule
    queue.set_every(0.1)
    wait_for(lambda: WatchState(tiny_kb.settings.home / "jobs" / "watch.json").load().get("last_run"), timeout=30)
    idle = scheduled(queue)
    assert len(idle) == 1 and idle[0]["report"] == {"sources": [], "unchanged": [], "backing_off": []}
    queue.set_every(0)
    assert queue.wait_idle(30)
    time.sleep(0.2)
    last = WatchState(tiny_kb.settings.home / "jobs" / "watch.json").load()["last_run"]
    time.sleep(0.5)
    assert WatchState(tiny_kb.settings.home / "jobs" / "watch.json").load()["last_run"] == last  # off
    # passes with nothing to do replace each other: one record on disk, not one per pass
    assert len([p for p in (tiny_kb.settings.home / "jobs").glob("2*.json")]) == 1


# ---------------------------------------------------------------------------- answer evaluation


class HeldChat(GenericFakeChatModel):
    """A scripted chat model whose ``hold_at``-th answer waits until ``release`` is set (``entered``: it waits).

    So a cancel lands while a question is being answered, and the test knows
    exactly which safe point (the end of that question) it must stop at.
    """

    hold_at: int = 0
    calls: int = 0
    entered: threading.Event = Field(default_factory=threading.Event)
    release: threading.Event = Field(default_factory=threading.Event)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls += 1
        if self.calls == self.hold_at:
            self.entered.set()
            assert self.release.wait(300), "never released"
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def scripted_chat(hold_at: int = 0) -> HeldChat:
    """The same short answer to every question: the job's bookkeeping is under test, not the model."""
    return HeldChat(messages=repeat(AIMessage("Lagent is a lightweight framework for building agents [1].")),
                    hold_at=hold_at)


def test_answer_evaluation_job_counts_questions_saves_the_run_and_cancels_between_questions(tiny_kb, corpus,
                                                                                               queue_of):
    from kb.evaluate import load_questions, past_runs
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions
    from kb.store.manifest import write_lock

    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    tiny_kb.sync()
    questions = load_questions(corpus / "dev_questions.jsonl")
    n = sum(q["repo"] == "lagent" for q in questions)
    seen: list[tuple] = []
    queue = queue_of(tiny_kb, forward=lambda *a: seen.append(a))
    engine, options = SearchEngine(tiny_kb), SearchOptions(k=2, mode="bm25")
    with write_lock(tiny_kb.settings.home):  # it only reads: another writer does not hold it up
        job = queue.submit_answer_evaluation(scripted_chat(), engine, questions, options, "dev_questions.jsonl",
                                             only_indexed=True)
        out = queue.wait(job["id"], 300)
    assert out["state"] == DONE and out["kind"] == "answers" and not out["error"], out
    assert [a[1:3] for a in seen if a[0] == "answer"] == [(i, n) for i in range(n + 1)]  # 0 of n, then each answer
    (run,) = past_runs(tiny_kb.settings.home, "answers")  # saved by the job, with nobody watching
    assert run["n"] == out["report"]["n"] == n and run["k"] == 2 and run["config"]["only_indexed"] is True
    assert [r["id"] for r in run["rows"]] == [r["id"] for r in out["report"]["rows"]]
    assert len(run["not_indexed"]) == len(questions) - n

    # cancelled while the 2nd of 3 questions is answered: it stops once that answer is in, the 3rd never asked
    llm = scripted_chat(hold_at=2)
    job = queue.submit_answer_evaluation(llm, engine, questions, options, "dev_questions.jsonl", only_indexed=True,
                                         limit=3)
    assert llm.entered.wait(60)
    assert queue.cancel(job["id"])
    llm.release.set()
    out = queue.wait(job["id"], 300)
    assert out["state"] == CANCELLED and llm.calls == 2, out
    assert (out["report"]["answered"], out["report"]["of"]) == (2, 3) and out["stage_done"] == 2
    assert len(past_runs(tiny_kb.settings.home, "answers")) == 1, "an unfinished run is not saved"


def test_one_sources_unexpected_error_is_its_own_and_the_others_sync(tiny_kb, corpus, queue_of, monkeypatch):
    """A bug or an unforeseen store error in one source ended the whole pass: the sources after it never synced, and
    a scheduled pass retried the same failing source first, every time, with no back-off."""
    for name in ("lagent", "InternLM"):
        tiny_kb.add_source(name, str(corpus / f"{name}.bundle"))
    real_fetch, real_sync = tiny_kb.fetch_source, tiny_kb.sync

    def fetch(name, progress=None):
        if name == "lagent":
            raise OSError("the disk went away")
        return real_fetch(name, progress=progress)

    monkeypatch.setattr(tiny_kb, "fetch_source", fetch)
    queue = queue_of(tiny_kb, every=60.0, start=False)
    out = queue.run_scheduled_now()
    assert out["state"] == DONE, out
    reps = {r["name"]: r for r in out["report"]["sources"]}
    assert "unexpected OSError: the disk went away" in reps["lagent"]["error"]
    assert not reps["InternLM"]["error"] and tiny_kb.manifest.source("InternLM").indexed_commit
    (fail,) = tiny_kb.sync_failures()  # backs off like an unreachable remote
    assert fail["source"] == "lagent" and fail["next_try"] > fail["last_failure"]
    (err,) = runlog.read(tiny_kb.settings, kinds=["error"])
    assert err["type"] == "OSError" and "fetch of lagent" in err["origin"] and "Traceback" in err["traceback"]

    def sync(names=None, dry_run=False, progress=None):
        if names == ["InternLM"]:
            raise RuntimeError("a bug")
        return real_sync(names, dry_run=dry_run, progress=progress)

    monkeypatch.setattr(tiny_kb, "sync", sync)
    monkeypatch.setattr(tiny_kb, "fetch_source", real_fetch)
    runner = queue_of(tiny_kb)  # a queue with its worker: a sync job the Sources page starts
    job = runner.submit_sync(["InternLM", "lagent"])
    out = runner.wait(job["id"], 300)
    assert out["state"] == DONE, out
    reps = {r["name"]: r for r in out["report"]["sources"]}
    assert "unexpected RuntimeError: a bug" in reps["InternLM"]["error"]
    assert not reps["lagent"]["error"] and tiny_kb.manifest.source("lagent").indexed_commit


def test_kb_sync_goes_on_past_one_sources_unexpected_error(tiny_kb, corpus, monkeypatch):
    import kb.service

    for name in ("InternLM", "lagent"):
        tiny_kb.add_source(name, str(corpus / f"{name}.bundle"))
    real = kb.service.sync_source

    def sync_source(ctx, src, *args, **kwargs):
        if src.name == "InternLM":
            raise RuntimeError("a bug")
        return real(ctx, src, *args, **kwargs)

    monkeypatch.setattr(kb.service, "sync_source", sync_source)
    first, second = tiny_kb.sync()
    assert first.name == "InternLM" and "unexpected RuntimeError: a bug" in first.error
    assert second.name == "lagent" and not second.error and second.files_added > 0
    assert runlog.read(tiny_kb.settings, kinds=["error"])[-1]["origin"] == "sync of InternLM"


def test_a_writer_taking_the_lock_between_the_wait_and_the_fetch_is_waited_for(tiny_kb, corpus, queue_of,
                                                                               monkeypatch):
    """The scheduled pass waited for the write lock by looking, then took it: a `kb sync` in a terminal taking it in
    between made the fetch fail, and the source was recorded as failing and backed off (a review read it in the
    code). The pass waits again instead; the sync job's sources likewise."""
    from kb.jobs import JobControl
    from kb.store.manifest import write_lock

    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    real_wait, holders = JobControl.wait_for_lock, []

    def wait_then_race(self):
        real_wait(self)
        if len(holders) < 2:  # the first two waits: another writer takes the lock just after the wait saw it free
            taken = threading.Event()

            def hold():
                with write_lock(tiny_kb.settings.home):
                    taken.set()
                    time.sleep(0.4)

            holders.append(threading.Thread(target=hold))
            holders[-1].start()
            taken.wait()

    monkeypatch.setattr(JobControl, "wait_for_lock", wait_then_race)
    queue = queue_of(tiny_kb, every=60.0, start=False)
    out = queue.run_scheduled_now()
    assert out["state"] == DONE, out
    (rep,) = out["report"]["sources"]
    assert not rep["error"] and tiny_kb.manifest.source("lagent").indexed_commit and len(holders) == 2
    assert tiny_kb.sync_failures() == [] and not runlog.read(tiny_kb.settings, kinds=["fetch"])
    for t in holders:
        t.join()
