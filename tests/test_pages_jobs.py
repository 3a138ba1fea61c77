"""The Sources page's background jobs (AppTest): buttons enqueue, the jobs panel fragment shows progress and the
place in line, cancel buttons work, every page's sidebar says what runs; plus the §6 fixes of the Sources page.

A job that holds the worker (``hold``) makes the page's own jobs wait in line, so what the page shows while a
job is queued or running is checked without racing the worker.
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time

import pytest

from conftest import ROOT
from page_helpers import frame_with, ok, texts

EVIL_FREE_DOC = b"# Notes\n\nBackground jobs index uploads too.\n"


def queue():
    from pages import _resources as resources

    return resources.job_queue()


def finish(at, timeout: float = 300):
    """Let the queue's jobs end, then rerun the page (as the panel's fragment does when a job ends)."""
    assert queue().wait_idle(timeout), "jobs still running"
    return ok(at.run())


def open_tab(at) -> int:
    """The index of the tab the Sources page opens on."""
    containers = [b for b in at.main if getattr(b, "type", "") == "tab_container"]
    assert len(containers) == 1, containers
    return containers[0].proto.tab_container.default_tab_index


@pytest.fixture
def hold():
    """``hold()`` puts a job at the head of the queue that waits until the test ends or ``release()``s it."""
    released = threading.Event()
    made: list[str] = []

    def work(kb, ctl):
        while not released.is_set():
            ctl.checkpoint()
            time.sleep(0.02)
        return {}

    def start() -> dict:
        started = threading.Event()

        def run(kb, ctl):
            started.set()
            return work(kb, ctl)

        job = queue().submit("test", {}, run, label="Holding the worker", writes=False)
        made.append(job["id"])
        assert started.wait(30)
        return job

    start.release = released.set  # type: ignore[attr-defined]
    yield start
    released.set()


def add_lagent(at, corpus, sync: bool):
    at.text_input(key="add_name").input("lagent")
    at.text_input(key="add_url").input(str(corpus / "lagent.bundle"))
    at.text_input(key="add_web").input("https://gitee.com/InternLM/lagent")
    if not sync:
        at.checkbox(key="add_sync").uncheck()
    at.button(key="add_btn").click().run()
    return ok(at)


def test_empty_sources_open_on_add_and_the_empty_box_goes_when_a_source_is_added(page_env, corpus, open_page):
    at = ok(open_page("sources"))
    assert [t.label for t in at.tabs][open_tab(at)].endswith("Add a source")
    assert "No sources yet" in texts(at.info)
    assert "No jobs yet" in texts(at.caption)
    add_lagent(at, corpus, sync=False)
    assert "Added **lagent**" in texts(at.success)
    assert "No sources yet" not in texts(at.info) + texts(at.markdown)
    assert frame_with(at, "indexed commit").loc[0, "source"] == "lagent"
    assert open_tab(at) == 0  # with a source, the Sync tab comes first again


def test_add_and_sync_runs_as_a_job_shown_in_line_then_with_its_report(page_env, corpus, open_page, shared_kb, hold):
    first = hold()
    at = ok(open_page("sources"))
    add_lagent(at, corpus, sync=True)
    assert "Its sync is queued" in texts(at.info)
    body = texts(at.markdown)
    assert "**Holding the worker** · running" in body and "**Sync lagent** · queued, 1 job(s) ahead" in body
    assert at.button(key=f"job_cancel_{first['id']}")
    assert shared_kb().manifest.source("lagent").indexed_commit is None, "the page did not sync inline"
    hold.release()
    finish(at)
    assert "Added **lagent**" in texts(at.success) and "1 source(s) synced" in texts(at.success)
    done = frame_with(at, "chunks embedded")
    assert done.loc[0, "source"] == "lagent" and done.loc[0, "chunks embedded"] > 0 and not done.loc[0, "error"]
    assert frame_with(at, "indexed commit").loc[0, "indexed commit"] == shared_kb().manifest.source("lagent").indexed_commit[:12]
    recent = frame_with(at, "took")
    assert list(recent["job"][:2]) == ["Sync lagent", "Holding the worker"] and recent.loc[0, "state"] == "done"
    assert "1 source(s) synced" in recent.loc[0, "result"]
    # the sync report fits the page: few columns, counts narrow (skipped files and long chunks are in the details)
    assert len(done.columns) <= 11 and "skipped" not in done.columns and "over window" not in done.columns


def test_cancel_buttons_for_a_queued_and_a_running_job(page_env, corpus, open_page, shared_kb, hold):
    shared_kb().add_source("lagent", str(corpus / "lagent.bundle"))
    first = hold()
    at = ok(open_page("sources"))
    at.button(key="sync_now_btn").click().run()
    ok(at)
    queued = next(j for j in queue().active() if j["kind"] == "sync")
    assert queued["ahead"] == 1 and "Sync of all sources queued" in texts(at.info)
    at.button(key=f"job_cancel_{queued['id']}").click().run()
    ok(at)
    assert queue().get(queued["id"])["state"] == "cancelled"
    assert "was cancelled" in texts(at.warning) and "0 source(s) finished" in texts(at.warning)
    at.button(key=f"job_cancel_{first['id']}").click().run()
    assert queue().wait(first["id"], 30)["state"] == "cancelled"
    finish(at)
    recent = frame_with(at, "took")
    assert set(recent["state"][:2]) == {"cancelled"} and not queue().active()
    assert shared_kb().manifest.source("lagent").indexed_commit is None and shared_kb().verify()["healthy"]


def test_the_sidebar_shows_running_jobs(page_env, open_page, hold):
    """Home.py draws it beside the navigation. (AppTest runs a file page without Home.py whenever a pages/ folder
    exists, so file pages are checked in a real browser below.)"""
    at = ok(open_page())
    assert not at.sidebar.get("progress")
    hold()
    queue().submit("test", {}, lambda kb, ctl: {}, label="Next in line", writes=False)
    at = ok(open_page())
    side = texts(at.sidebar.caption)
    assert "Holding the worker" in side and "1 more job(s) waiting" in side
    assert at.sidebar.get("progress") and at.sidebar.get("page_link")
    hold.release()
    assert queue().wait_idle(30)
    at.run()
    assert "Holding the worker" not in texts(ok(at).sidebar.caption) and not at.sidebar.get("progress")


def test_every_page_shows_a_running_job_and_drops_it_when_it_ends_in_a_browser(tmp_path, tiny_st_dir):
    """A real server and chromium: the sidebar line is on file pages too, and its fragment redraws on its own.

    The job is another process's (this test's, alive): the dashboard reads it from KB_HOME/jobs like a ``kb watch``
    run, and drops it when its record says it ended.
    """
    import json
    import os
    import shutil
    import socket
    import sys
    from pathlib import Path

    from page_fixtures import BASE_ENV
    from servers import free_port, stop, wait_for_http
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True)
    now = time.time()
    rec = {"id": "20990101-000000000-abcdef", "kind": "scheduled", "label": "Scheduled sync (browser test)",
           "origin": "cli", "state": "running", "pid": os.getpid(), "host": socket.gethostname(), "created": now,
           "started": now, "stage": "embed", "stage_done": 10, "stage_total": 40, "source": "lagent"}
    record = home / "jobs" / f"{rec['id']}.json"
    record.write_text(json.dumps(rec))
    port = free_port()
    env = {**os.environ, **BASE_ENV, "KB_HOME": str(home), "KB_EMBED_MODEL": str(tiny_st_dir)}
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    log = tmp_path / "streamlit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([streamlit, "run", "Home.py", "--server.port", str(port), "--server.headless", "true",
                                 "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/_stcore/health", proc, log, timeout=180)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(60_000)
                sidebar = page.locator('[data-testid="stSidebar"]')
                page.goto(base, wait_until="domcontentloaded")
                page.get_by_role("heading", name="Knowledge base").wait_for(timeout=180_000)
                sidebar.get_by_text("Scheduled sync (browser test)").wait_for()
                for link, heading in (("Chat", "Chat"), ("Sources", "Sources")):
                    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=link).click()
                    page.get_by_role("heading", name=heading).first.wait_for()
                    sidebar.get_by_text("Scheduled sync (browser test)").wait_for()
                    assert "10 / 40" in sidebar.inner_text()
                # the job ends: the fragment drops the line without any click
                record.write_text(json.dumps({**rec, "state": "done", "finished": time.time(),
                                              "report": {"sources": []}}))
                sidebar.get_by_text("Scheduled sync (browser test)").wait_for(state="detached", timeout=30_000)
                # and the Sources page's jobs panel lists it among the recent jobs
                page.get_by_text("Scheduled sync (browser test)").first.wait_for(state="attached", timeout=30_000)
            finally:
                browser.close()
    finally:
        stop(proc)


def upload(at, files: list[tuple[str, bytes]], source: str = "notes", finished: bool = True):
    at.text_input(key="upload_source").input(source)
    at.file_uploader(key="upload_files").set_value([(name, data, "text/markdown") for name, data in files])
    at.run()
    at.button(key="upload_btn").click().run()
    return finish(at) if finished else ok(at)


def test_upload_is_a_job_and_the_widget_limit_follows_the_setting(page_env, open_page, shared_kb, monkeypatch):
    at = ok(open_page("sources"))
    assert at.file_uploader(key="upload_files").proto.max_upload_size_mb == math.ceil(20_000_000 / 2**20) == 20
    at.text_input(key="upload_source").input("notes")
    at.file_uploader(key="upload_files").set_value([("notes.md", EVIL_FREE_DOC, "text/markdown")])
    at.run()
    at.button(key="upload_btn").click().run()
    ok(at)
    assert "is queued" in texts(at.info)
    finish(at)
    assert re.search(r"Uploaded 1 file\(s\) to \*\*notes\*\* at \w{8}: 1 new; \d+ chunks embedded", texts(at.success)), \
        texts(at.success) + texts(at.error) + texts(at.warning)
    assert shared_kb().manifest.source("notes").kind == "files"
    assert frame_with(at, "took").loc[0, "job"] == "Upload 1 file(s) to notes"

    # the review's uploads: a skipped file is said to be skipped, not "indexed"; every file skipped is an error
    upload(at, [("notes.md", EVIL_FREE_DOC), ("binary.md", b"\x00\x01\x02 binary")])
    assert "1 unchanged, 1 skipped, not indexed" in texts(at.warning), texts(at.success) + texts(at.warning)
    upload(at, [("latin.md", b"\xff\xfe caf\xe9")])
    assert "1 skipped, not indexed" in texts(at.error) and not texts(at.success)
    upload(at, [("binary.md", b"\x00\x01\x02 binary")])  # sent again unchanged: still skipped, not "unchanged"
    assert "1 skipped, not indexed" in texts(at.error) and "unchanged" not in texts(at.error)
    # two files of one name, and a bad source name: refused at once, nothing queued
    jobs = [j["id"] for j in queue().jobs()]
    upload(at, [("a.md", b"# One\n\nfirst"), ("a.md", b"# Two\n\nsecond")], finished=False)
    assert "two files named 'a.md' in one upload" in texts(at.error) and "is queued" not in texts(at.info)
    upload(at, [("c.md", b"# C\n\ntext")], source="bad name!", finished=False)
    assert "invalid source name 'bad name!'" in texts(at.error)
    assert [j["id"] for j in queue().jobs()] == jobs

    monkeypatch.setenv("KB_UPLOAD_MAX_BYTES", "5000000")
    small = ok(open_page("sources"))
    assert small.file_uploader(key="upload_files").proto.max_upload_size_mb == 5
    assert "at most 5 MB a file" in texts(small.caption)


def test_make_run_sets_streamlit_upload_limit_from_kb_upload_max_bytes(monkeypatch):
    """The Makefile's run target passes --server.maxUploadSize from the same setting, in MiB rounded up, never below
    Streamlit's default 200 (the snapshot import takes larger files than KB_UPLOAD_MAX_BYTES)."""
    make = (ROOT / "Makefile").read_text()
    assert "--server.maxUploadSize" in re.search(r"^run:.*?(?=^\S)", make, re.S | re.M).group(0)
    snippet = re.search(r"^UPLOAD_MB = (.*)$", make, re.M).group(1).replace("$(BIN)", str(ROOT / ".venv" / "bin"))
    for raw, want in (("20000000", "200"), ("500000000", "477"), ("not-a-number", "200")):
        out = subprocess.run(["bash", "-c", snippet], cwd=ROOT, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "KB_UPLOAD_MAX_BYTES": raw})
        assert out.stdout.strip() == want, (raw, out.stdout, out.stderr)


def test_when_a_job_ended_fits_its_column():
    """A browser review: "2026-12-06 20:12:05" was cut to "2026-12-06" in the half-width panels, hiding the time."""
    import datetime as dt

    from pages._jobs import ended_at

    now = dt.datetime(2026, 12, 6, 20, 30).timestamp()
    assert ended_at(dt.datetime(2026, 12, 6, 20, 12, 5).timestamp(), now) == "20:12:05"
    assert ended_at(dt.datetime(2026, 12, 5, 9, 1).timestamp(), now) == "12-05 09:01"
    assert ended_at(None, now) == ""
