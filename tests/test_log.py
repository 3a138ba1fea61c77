"""The log of what happened (kb/log.py): records, rotation, query privacy, --since, concurrent writers, a failing
disk, and `kb log`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from conftest import ROOT, add_bundle
from core.settings import Settings, load_settings
from kb import log as runlog
from kb.errors import KBError


def lines_of(home: Path) -> list[dict]:
    """Every line of every log file, each of which must be one JSON object."""
    out = []
    for f in runlog.JsonlLog(runlog.log_dir(home)).files():
        for raw in f.read_bytes().splitlines():
            out.append(json.loads(raw))
    return out


@pytest.fixture(autouse=True)
def _fresh_warnings():
    runlog._warned.clear()
    yield
    runlog._warned.clear()


# ---------------------------------------------------------------------------- records


def test_every_kind_is_one_json_line_with_ts_and_kind(tmp_path):
    home = tmp_path / "home"
    s = Settings(home=home)
    hit = NS(source="xtuner", path="docs/install.md")
    assert runlog.log_search(s, "how to install xtuner", NS(mode="hybrid", k=5), [hit, hit], 31.234)
    aid = runlog.log_answer(s, {"question": "q", "answer": "secret answer", "rag": True, "first_token_seconds": 4.2,
                                "seconds": 9.5, "cited": [1, 3], "sources": [{}, {}, {}], "tokens": 87,
                                "sentences": [{"supported": True}, {"supported": False}]}, feedback="up")
    assert runlog.log_feedback(s, aid, "down")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        assert runlog.log_error(s, exc, origin="kb stats")
    assert runlog.log_job(s, "sync", {"sources": [{"name": "xtuner", "files_added": 1, "added": ["a"] * 250}]})

    raw = (home / "logs" / "kb.jsonl").read_bytes().splitlines()
    assert len(raw) == 5 and all(r.startswith(b'{"ts":"') for r in raw)
    search, answer, feedback, error, sync = recs = [json.loads(r) for r in raw]
    assert [r["kind"] for r in recs] == ["search", "answer", "feedback", "error", "sync"]
    for r in recs:
        assert len(r["ts"]) == 24 and r["ts"].endswith("Z") and r["pid"] == os.getpid()
        assert abs(runlog.epoch(r["ts"]) - time.time()) < 60
    assert search == {**search, "mode": "hybrid", "k": 5, "latency_ms": 31.23, "hits": 2, "top_source": "xtuner",
                      "top_path": "docs/install.md"}
    assert answer["id"] == aid and answer["ttft"] == 4.2 and answer["seconds"] == 9.5 and answer["tokens"] == 87
    assert answer["citations"] == 2 and answer["cited"] == [1, 3] and answer["sources"] == 3 and answer["rag"] is True
    assert answer["feedback"] == "up" and answer["sentences"] == 2 and answer["sentences_supported"] == 1
    assert "secret answer" not in raw[1].decode(), "the answer text is never logged"
    assert feedback["id"] == aid and feedback["feedback"] == "down"
    assert error["type"] == "ValueError" and error["message"] == "boom" and error["origin"] == "kb stats"
    assert "Traceback" in error["traceback"] and "raise ValueError" in error["traceback"]
    rep = sync["sources"][0]
    assert len(rep["added"]) == runlog.LIST_CAP and rep["added_total"] == 250 and rep["files_added"] == 1

    assert [r["kind"] for r in runlog.read(home, kinds=["error", "search"])] == ["search", "error"]
    assert runlog.read(home, since=time.time() + 5) == []
    assert all(runlog.describe(r) for r in recs)


def test_answer_object_and_bare_home(tmp_path, monkeypatch):
    """log_answer takes an Answer as well as its dict, and a bare KB_HOME (KB_LOG_QUERIES from the environment)."""
    from kb.answer.chain import Answer

    monkeypatch.delenv("KB_LOG_QUERIES", raising=False)
    ans = Answer(question="xtuner是什么？", answer="XTuner 是… [1]", cited=[1], rag=False, seconds=2.0,
                 first_token_seconds=0.5)
    runlog.log_answer(tmp_path, ans)
    monkeypatch.setenv("KB_LOG_QUERIES", "true")
    runlog.log_answer(tmp_path, ans.as_dict(), answer_id="a1")
    first, second = runlog.read(tmp_path)
    assert "question" not in first and first["rag"] is False and first["ttft"] == 0.5 and first["tokens"] is None
    assert second["question"] == "xtuner是什么？" and second["id"] == "a1"


def test_query_text_is_private_by_default(tmp_path):
    assert Settings().log_queries is False
    assert load_settings(env={}, secrets_path=Path("/nonexistent")).log_queries is False
    on = load_settings(env={"KB_LOG_QUERIES": "true"}, secrets_path=Path("/nonexistent"))
    assert on.log_queries is True
    opts = NS(mode="bm25", k=3)
    runlog.log_search(Settings(home=tmp_path), "私密的问题 private question", opts, [], 2.0)
    runlog.log_search(on.with_(home=tmp_path), "logged question", opts, [], 2.0)
    runlog.log_answer(Settings(home=tmp_path), {"question": "私密的问题", "seconds": 1})
    text = (tmp_path / "logs" / "kb.jsonl").read_text()
    assert "私密" not in text and "private question" not in text
    runlog.log_feedback(on.with_(home=tmp_path), "a1", {"score": 0, "comment": "wrong file"})
    off, logged, answer, feedback = runlog.read(tmp_path)
    assert "query" not in off and off["top_source"] is None and off["hits"] == 0
    assert logged["query"] == "logged question" and "question" not in answer
    assert feedback["feedback"] == {"score": 0, "verdict": "down", "comment": "wrong file"}


# ---------------------------------------------------------------------------- rotation


def test_rotation_keeps_whole_lines_and_drops_the_oldest(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "MAX_BYTES", 4000)
    monkeypatch.setattr(runlog, "BACKUPS", 3)
    for i in range(400):
        runlog.write(tmp_path, "search", seq=i, pad="x" * 50)
    log = runlog.JsonlLog(runlog.log_dir(tmp_path))
    files = log.files()
    assert [f.name for f in files] == ["kb.jsonl.3", "kb.jsonl.2", "kb.jsonl.1", "kb.jsonl"]
    assert all(f.stat().st_size < 4000 + 200 for f in files)  # rolled over at the first line past the limit
    seqs = [r["seq"] for r in lines_of(tmp_path)]
    assert seqs == list(range(seqs[0], 400)), "newest kept, in order, none lost or torn within the kept files"
    assert 0 < seqs[0] and len(seqs) < 400
    assert [r["seq"] for r in runlog.read(tmp_path)] == seqs


def test_since_skips_old_files_and_lines(tmp_path, monkeypatch):
    folder = runlog.log_dir(tmp_path)
    folder.mkdir(parents=True)
    old, new = time.time() - 7200, time.time()
    (folder / "kb.jsonl.1").write_text(json.dumps({"ts": runlog.iso(old - 10), "kind": "search"}) + "\n")
    os.utime(folder / "kb.jsonl.1", (old, old))
    (folder / "kb.jsonl").write_text(
        json.dumps({"ts": runlog.iso(old), "kind": "sync"}) + "\n"
        + "{torn line\n" + "[1, 2]\n"
        + json.dumps({"ts": runlog.iso(new), "kind": "error"}) + "\n")
    assert [r["kind"] for r in runlog.read(tmp_path)] == ["search", "sync", "error"]
    assert [r["kind"] for r in runlog.read(tmp_path, since=new - 3600)] == ["error"]


# ---------------------------------------------------------------------------- --since


@pytest.mark.parametrize("text,seconds", [("45s", 45), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1w", 604800),
                                          ("1h30m", 5400), ("1.5h", 5400), (" 2H ", 7200)])
def test_since_durations(text, seconds):
    assert runlog.parse_since(text, now=1_000_000.0) == pytest.approx(1_000_000.0 - seconds)


def test_since_further_back_than_the_epoch_is_everything():
    """``--since 999999w`` was a year out of range, and a traceback (an operator review)."""
    assert runlog.parse_since("999999w", now=1_000_000.0) == 0.0
    assert runlog.iso(runlog.parse_since("999999w")) == "1970-01-01T00:00:00.000Z"


def test_since_dates():
    assert runlog.parse_since("2025-06-01T08:00:00+00:00") == 1748764800.0
    assert runlog.parse_since("2025-06-01T08:00Z") == 1748764800.0
    local = runlog.parse_since("2025-06-01 08:00")
    import datetime as dt

    assert local == dt.datetime(2025, 6, 1, 8, 0).timestamp()
    assert runlog.parse_since("2025-06-01") == dt.datetime(2025, 6, 1).timestamp()


@pytest.mark.parametrize("bad", ["", "1", "h", "1x", "-1h", "yesterday", "1h-", "2025-13-01"])
def test_since_bad_values_say_what_is_accepted(bad):
    with pytest.raises(KBError, match=r"--since .*expected a duration .*30m, 1h, 2d.*2025-06-01"):
        runlog.parse_since(bad)


# ---------------------------------------------------------------------------- many writers


WRITER = textwrap.dedent("""
    import sys, threading
    from kb import log as runlog
    runlog.MAX_BYTES = 60_000   # roll over often while both processes write
    runlog.BACKUPS = 1000       # and keep everything, so every record can be counted
    home, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def run(thread):
        for i in range(n):
            # some records longer than PIPE_BUF (4 KiB) and the 8 KiB buffer of a text stream
            runlog.write(home, "search", tag=tag, thread=thread, seq=i, pad=("é" if i % 2 else "x") * (i % 7) * 1500)
    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
""")


def test_two_processes_with_threads_write_whole_lines(tmp_path):
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag, str(n)], cwd=ROOT)
             for tag in ("a", "b")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    files = runlog.JsonlLog(runlog.log_dir(tmp_path), backups=1000).files()
    assert len(files) > 5, "the test should make both processes roll the file over"
    records = []
    for f in files:
        for raw in f.read_bytes().splitlines():
            records.append(json.loads(raw))  # every line is one whole JSON object
    seen = sorted((r["tag"], r["thread"], r["seq"]) for r in records)
    assert seen == sorted((t, th, i) for t in "ab" for th in range(3) for i in range(n)), "none lost, none twice"
    assert {r["pid"] for r in records} == {p.pid for p in procs}


# ---------------------------------------------------------------------------- a failing disk


def test_a_failing_disk_is_one_warning_and_no_error(tmp_path, caplog):
    home = tmp_path / "home"
    home.mkdir()
    (home / "logs").write_text("not a folder")  # every open under it fails, as on a read-only disk
    with caplog.at_level(logging.WARNING, logger="kb.log"):
        assert runlog.write(home, "search", x=1) is False
        assert runlog.log_search(Settings(home=home), "q", NS(mode="dense", k=1), [], 1.0) is False
        runlog.log_answer(home, {"seconds": 1})
        try:
            raise RuntimeError("x")
        except RuntimeError as exc:
            assert runlog.log_error(home, exc) is False
    warnings = [r for r in caplog.records if r.name == "kb.log"]
    assert len(warnings) == 1 and "cannot write the log" in warnings[0].getMessage()


def test_a_failing_write_is_swallowed(tmp_path, monkeypatch, caplog):
    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog.os, "write", full_disk)
    with caplog.at_level(logging.WARNING, logger="kb.log"):
        for _ in range(3):
            assert runlog.write(tmp_path, "sync", sources=[]) is False
    assert len([r for r in caplog.records if r.name == "kb.log"]) == 1


# ---------------------------------------------------------------------------- from the knowledge base


def test_jobs_and_searches_are_logged_by_the_kb(tiny_kb, corpus, caplog):
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions

    home = tiny_kb.settings.home
    report = add_bundle(tiny_kb, corpus, "lagent")
    tiny_kb.sync(["lagent"], dry_run=True)  # writes nothing, not even a log line
    with pytest.raises(KBError):
        tiny_kb.sync(["nope"])
    engine = SearchEngine(tiny_kb)
    hits = engine.search("agent action", SearchOptions(k=3, mode="bm25"))
    tiny_kb.verify()  # a check alone is not logged
    tiny_kb.verify(repair=True)
    recs = runlog.read(home)
    assert [r["kind"] for r in recs] == ["add", "sync", "sync", "search", "verify"]
    added, sync, failed, search, verify = recs
    assert (added["source"], added["source_kind"]) == ("lagent", "git")
    assert added["branch"] == tiny_kb.source("lagent").branch
    assert runlog.describe(added).endswith(f"source lagent added (git, {added['url']}, branch {added['branch']})")
    rep = sync["sources"][0]
    contract = ["name", "commit_before", "commit_after", "files_added", "files_modified", "files_deleted",
                "chunks_embedded", "chunks_reused", "chunks_deleted", "seconds"]
    assert all(k in rep for k in contract) and rep["chunks_embedded"] == report.chunks_embedded > 0
    assert rep["dry_run"] is False and sync["wall_seconds"] > 0
    assert "no source named" in failed["error"] and failed["type"].endswith("KBError")
    assert search["mode"] == "bm25" and search["k"] == 3 and search["hits"] == len(hits) == 3
    assert search["top_source"] == "lagent" and search["top_path"] == hits[0].path and search["latency_ms"] > 0
    assert "query" not in search
    assert verify["healthy"] is True and verify["repaired"] in (True, False)

    act = tiny_kb.activity(24)
    assert act["searches"] == 1 and act["last_sync"]["lagent"]["chunks_embedded"] == report.chunks_embedded
    assert act["failed_jobs"][0]["kind"] == "sync" and act["search_p95_ms"] == search["latency_ms"]

    # a disk that refuses the log changes nothing for the search
    logs = home / "logs"
    shutil.rmtree(logs)  # the records, and the (empty) folder of markers of jobs under way
    logs.write_text("in the way")
    with caplog.at_level(logging.WARNING, logger="kb.log"):
        again = engine.search("agent action", SearchOptions(k=3, mode="bm25"))
        engine.search("agent", SearchOptions(k=3, mode="bm25"))
    assert [h.id for h in again] == [h.id for h in hits]
    assert len([r for r in caplog.records if r.name == "kb.log"]) == 1


def test_glance_numbers(tmp_path):
    now = time.time()
    s = Settings(home=tmp_path)
    for ms in range(1, 101):  # 1..100 ms: nearest-rank p95 is 95
        runlog.log_search(s, "q", NS(mode="hybrid", k=5), [], float(ms))
    for ttft in (1.0, 2.0, 30.0):
        runlog.log_answer(s, {"first_token_seconds": ttft, "seconds": ttft + 1, "cited": [1]})
    first = runlog.log_answer(s, {"seconds": 1}, feedback={"score": 1, "comment": "great", "at": 1.0})
    runlog.log_feedback(s, first, {"score": 0, "comment": "no, wrong after all"})  # the latest verdict counts
    runlog.log_feedback(s, runlog.log_answer(s, {"seconds": 1}), 1)
    runlog.log_answer(s, {"seconds": 1}, feedback="down")
    assert "great" not in (tmp_path / "logs" / "kb.jsonl").read_text(), "a comment is the user's words"
    runlog.log_job(s, "upload", {"sources": [{"name": "notes", "files_added": 2, "chunks_embedded": 5,
                                              "seconds": 0.5, "error": ""}]})
    runlog.log_job(s, "sync", {"sources": [{"name": "x", "error": "cannot fetch", "dry_run": False}]})
    runlog.log_job(s, "rechunk", {"error": "no sources", "type": "KBError"})
    g = runlog.glance(tmp_path, 24, now=now + 1)
    assert g["searches"] == 100 and g["questions"] == 6 and g["search_p95_ms"] == 95.0
    assert g["feedback"] == {"up": 1, "down": 2}
    assert g["search_p50_ms"] == 50.5 and g["ttft_p95_s"] == 30.0 and g["errors"] == 0
    assert g["last_sync"]["notes"]["job"] == "upload" and g["last_sync"]["notes"]["files_changed"] == 2
    assert g["last_sync"]["x"]["error"] == "cannot fetch"
    assert [(f["kind"], f["source"]) for f in g["failed_jobs"]] == [("sync", "x"), ("rechunk", None)]
    assert sum(b["searches"] for b in g["per_hour"]) == 100 and len(g["per_hour"]) in (24, 25)
    assert g["per_hour"][-1]["search_p95_ms"] == 95.0
    assert runlog.glance(tmp_path, 24, now=now + 2 * 86400)["searches"] == 0
    assert runlog.p95([]) is None and runlog.p95([3.0]) == 3.0


# ---------------------------------------------------------------------------- the command line


def kb_cli(home, *args, env_extra=None):
    env = {**os.environ, "KB_HOME": str(home), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kb", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_kb_log_command(tmp_path):
    home = tmp_path / "home"
    proc = kb_cli(home, "log", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["records"] == []
    s = Settings(home=home)
    runlog.log_search(s, "q", NS(mode="hybrid", k=5), [NS(source="lagent", path="README.md")], 12.5)
    runlog.log_job(s, "sync", {"sources": [{"name": "lagent", "commit_before": None, "commit_after": "abcdef1234567",
                                            "files_added": 3, "files_modified": 0, "files_deleted": 0,
                                            "chunks_embedded": 10, "seconds": 1.5}]})
    try:
        raise RuntimeError("kaputt")
    except RuntimeError as exc:
        runlog.log_error(s, exc, origin="test")

    proc = kb_cli(home, "log")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and "search" in lines[0] and "12.5 ms" in lines[0] and "lagent/README.md" in lines[0]
    assert "lagent none -> abcdef1234" in lines[1] and "RuntimeError: kaputt" in lines[2]
    out = json.loads(kb_cli(home, "log", "--kind", "sync", "--kind", "error", "--since", "1h", "--json").stdout)
    assert [r["kind"] for r in out["records"]] == ["sync", "error"] and out["n"] == 2 and out["since"]
    out = json.loads(kb_cli(home, "log", "--limit", "1", "--json").stdout)
    assert [r["kind"] for r in out["records"]] == ["error"]
    proc = kb_cli(home, "log", "--since", "2999-01-01")
    assert proc.returncode == 0 and proc.stdout == "" and "nothing logged" in proc.stderr

    for args in (["--since", "yesterday"], ["--since", "5"]):
        proc = kb_cli(home, "log", *args)
        assert proc.returncode == 1 and proc.stderr.startswith("error: --since") and "Traceback" not in proc.stderr
        proc = kb_cli(home, "log", "--json", *args)
        assert proc.returncode == 1 and "expected a duration" in json.loads(proc.stdout)["error"]
    proc = kb_cli(home, "log", "--kind", "nonsense")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_cli_logs_unexpected_errors(tmp_path, monkeypatch):
    from kb import cli

    def broken(args):
        raise RuntimeError("a bug in stats")

    monkeypatch.setenv("KB_HOME", str(tmp_path))
    monkeypatch.setattr(cli, "cmd_stats", broken)
    with pytest.raises(RuntimeError):
        cli.main(["stats"])
    assert cli.main(["log", "--since", "nope"]) == 1  # an expected error: a message, not an error record
    (err,) = runlog.read(tmp_path)
    assert err["kind"] == "error" and err["origin"] == "kb stats" and err["message"] == "a bug in stats"
    assert "in broken" in err["traceback"]


def test_a_job_stopped_with_ctrl_c_is_logged_as_cancelled(tiny_kb, monkeypatch):
    """A `kb sync` stopped with Ctrl-C printed "interrupted" and left nothing in the log (a review)."""
    from kb.service import KnowledgeBase

    tiny_kb.upload({"notes.md": b"# Notes\n\nSomething to sync.\n"}, "notes")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(KnowledgeBase, "_sync_locked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_kb.sync()
    last = runlog.read(tiny_kb.settings, kinds=["sync"])[-1]
    assert last["cancelled"] is True and last["note"] == "interrupted (Ctrl-C)" and "error" not in last


def test_a_marker_whose_pid_now_names_another_process_is_logged_as_dead(tmp_path):
    """A pid is reused: a dead job's marker whose pid belongs to a later process was taken as still running, its
    death never logged (noted at the forty-ninth stop). The marker records when its process began."""
    import socket

    from kb import pids

    settings = Settings(home=tmp_path)
    markers = tmp_path / "logs" / runlog.RUNNING
    markers.mkdir(parents=True)
    other = os.getppid()  # alive, and not the writer of either marker below
    assert pids.started(other) is not None and pids.alive(other, pids.started(other))
    for name, start in (("reused", "1"), ("same", pids.started(other))):
        (markers / f"{other}-sync-{name}.json").write_text(json.dumps(
            {"kind": "sync", "pid": other, "pid_start": start, "host": socket.gethostname(),
             "started": "2000-01-01T00:00:00.000Z"}))
    assert runlog.reap(settings) == [(other, "sync")]  # the reused pid's, once
    assert [p.name for p in markers.iterdir()] == [f"{other}-sync-same.json"]  # its own process still runs
    with runlog.running(settings, "sync"):
        (mine,) = [json.loads(p.read_text()) for p in markers.iterdir() if p.name.startswith(f"{os.getpid()}-")]
        assert mine["pid_start"] == pids.started(os.getpid()) and runlog.reap(settings) == []


def test_a_progress_bar_times_only_the_work_it_saw(capsys):
    """Work reported done at once (reused vectors) set the bar's rate, and a stage run again (chunks, then their
    passages) counted down from the first run's end: both gave a wrong rate and ETA (noted at the forty-ninth stop)."""
    from kb.progress import TqdmProgress

    bars = TqdmProgress(enabled=True)
    bars("store", 900, 1000)
    bar = bars._bars["store"]
    assert bar.n == 900 and bar.initial == 900  # the 900 are not timed
    bars("store", 1000, 1000)
    bars("store", 10, 50)  # the passages' round
    assert bar.n == 10 and bar.total == 50 and bar.initial == 10 and bar.format_dict["elapsed"] < 5
    bars.close()
    assert "store" in capsys.readouterr().err
