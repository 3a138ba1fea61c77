"""The Home page's "last 24 hours at a glance" (from KB_HOME/logs) and its first-run hints, through AppTest."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest

from core.settings import Settings
from kb import log as runlog
from page_helpers import frame_with, ok, texts


def metric(at, label: str):
    for m in at.metric:
        if m.label == label:
            return m
    raise AssertionError(f"no metric {label!r}: {[m.label for m in at.metric]}")


def charts(at) -> list:
    return [e for e in at.get("arrow_vega_lite_chart")] + [e for e in at.get("vega_lite_chart")]


def test_empty_home_links_sources_and_is_not_nothing_stale(page_env, open_page):
    at = ok(open_page())
    assert "Last 24 hours" in texts(at.subheader)
    assert metric(at, "Questions asked").value == "0" and metric(at, "Search p95").value == "–"
    assert metric(at, "First token p95").value == "–" and metric(at, "Errors").value == "0"
    assert "Nothing logged in the last 24 hours" in texts(at.caption) and not charts(at)
    assert "No sources yet" in texts(at.info)
    (link,) = at.page_link
    assert link.value.startswith("Sources") and "sources" in link.proto.page
    # no sources: nothing is stale, but nothing is indexed either; "Nothing stale" would be wrong
    assert "Nothing stale" not in texts(at.success) and "Nothing indexed yet." in texts(at.caption)


def test_home_glance_from_the_log(lagent_env, open_page, shared_kb):
    home = lagent_env
    s = Settings(home=home)
    opts = NS(mode="hybrid", k=3)
    for ms in range(10, 30):  # 20 searches: p95 by nearest rank is the 19th, 28 ms
        runlog.log_search(s, "q", opts, [NS(source="lagent", path="README.md")], float(ms))
    for ttft in (3.0, 4.0, 12.5):
        runlog.log_answer(s, {"first_token_seconds": ttft, "seconds": ttft + 2, "cited": [1], "sources": [{}]})
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        runlog.log_error(s, exc, origin="test")

    at = ok(open_page())
    assert metric(at, "Questions asked").value == "3"
    assert metric(at, "Search p95").value == "28 ms" and metric(at, "First token p95").value == "12.5 s"
    assert metric(at, "Errors").value == "1"
    assert "RuntimeError" in texts(at.caption) and "a bug" in texts(at.caption)
    (chart,) = charts(at)  # searches and answers per hour, side by side: on a time axis they were drawn over each other
    enc = json.loads(chart.proto.spec)["encoding"]
    assert enc["x"]["type"] == "ordinal" and enc["x"]["sort"] is None and enc["xOffset"]["field"], enc
    # the sync that lagent_env ran was logged by the knowledge base and shows as the last sync
    last = frame_with(at, "chunks embedded")
    assert last.loc[0, "source"] == "lagent" and last.loc[0, "result"] == "ok" and last.loc[0, "by"] == "sync"
    assert last.loc[0, "chunks embedded"] > 0
    assert not at.page_link, "the first-run link only shows without sources"
    assert "Nothing stale" in texts(at.success)
    # the backups' schedule beside the sync's (a browser review found it on the Collections page only)
    assert "No scheduled snapshots: set `KB_SNAPSHOT_EVERY`" in texts(at.caption)


def test_home_shows_failed_jobs(lagent_env, open_page, shared_kb):
    kb = shared_kb()
    reports = kb.sync(["lagent"])
    assert not reports[0].error
    from kb.errors import KBError

    with pytest.raises(KBError):
        kb.sync(["nope"])
    at = ok(open_page())
    assert metric(at, "Errors").value == "1"
    assert any("Sync failed" in w.value and "no source named" in w.value for w in at.warning)
    last = frame_with(at, "chunks embedded")
    assert last.loc[0, "chunks embedded"] == 0, "the latest sync of lagent, which had nothing to do"


def test_logging_errors_records_bugs_only(page_env):
    from kb.errors import KBError
    from pages._common import logging_errors

    with pytest.raises(RuntimeError):
        with logging_errors("a page"):
            raise RuntimeError("unexpected")
    with pytest.raises(KBError):
        with logging_errors("a page"):
            raise KBError("expected")
    (rec,) = runlog.read(page_env)
    assert rec["kind"] == "error" and rec["origin"] == "a page" and rec["message"] == "unexpected"


def test_home_shows_the_schedule_and_a_failing_fetch_without_nothing_stale(lagent_env, open_page, shared_kb):
    import time

    from kb.schedule import WatchState

    state = WatchState(lagent_env / "jobs" / "watch.json")
    now = time.time()
    state.ran(now - 600, 900.0, "cli")  # a `kb watch` pass ten minutes ago
    state.failed("lagent", "cannot reach the remote", now - 600, 700.0)  # its retry is due in 30 s (0.9 x 700 - 600)
    at = ok(open_page())
    line = next(c.value for c in at.caption if c.value.startswith("Scheduled sync"))
    assert "off in the dashboard" in line and "KB_SYNC_EVERY" in line and "(10 min ago) (`kb watch`)" in line
    (warning,) = [w.value for w in at.warning if "scheduled fetch failed" in w.value]
    assert "next try" in warning and "(in under 2 min)" in warning and "just now" not in warning
    # indexed as synced, but maybe behind its remote: not "Nothing stale" under a warning that says otherwise
    assert "Nothing stale" not in texts(at.success)
    assert "may be behind their remotes" in texts(at.caption)
    # a retry whose time has passed (no schedule running, `kb watch --once` only) waits for the next pass
    state._change(lambda d: d["sources"]["lagent"].update(next_try=now - 60))
    at = ok(open_page())
    assert any("next try at the next scheduled pass" in w.value for w in at.warning)


def test_a_failure_since_mended_is_shown_as_mended(lagent_env, open_page):
    s = Settings(home=lagent_env)
    failed = {"name": "lagent", "commit_before": "a" * 40, "commit_after": None, "error": "fetch failed: gone"}
    runlog.log_job(s, "fetch", {"sources": [failed]})
    back = {"name": "lagent", "commit_before": "a" * 40, "commit_after": "a" * 40, "error": ""}
    runlog.log_job(s, "fetch", {"sources": [back], "recovered": True})
    at = ok(open_page())
    assert not [w for w in at.warning if "Fetch failed" in w.value]
    assert any("Fetch failed" in i.value and "fetched fine since" in i.value for i in at.info)
    assert frame_with(at, "chunks embedded").loc[0, "result"] == "ok"


def test_intervals_and_times_to_come_read_as_a_person_writes_them():
    import time

    from pages._common import interval, when

    assert [interval(s) for s in (45, 900, 3600, 5400, 21600)] == ["45 s", "15 min", "60 min", "1.5 h", "6 h"]
    assert when(time.time() + 30).endswith("(in under 2 min)") and when(time.time() - 30).endswith("(just now)")
    assert when(time.time() + 1800).endswith("(in 30 min)")


def test_models_loading_in_the_background_say_so(page_env, open_page, monkeypatch):
    """A browser review: Home said "not loaded yet: loads on the first question" while the server's background load
    (``resources.preload``, started by the first page view) ran at full CPU."""
    from pages import _resources as resources

    monkeypatch.setenv("KB_LLM_GGUF", "/nonexistent/other.gguf")  # settings no other test has loaded a model for

    key = resources._key(resources.settings(), resources._LLM_FIELDS)
    at = ok(open_page())
    assert "not loaded yet: loads on the first question" in " ".join(m.value for m in at.markdown)
    resources._preloading.add(key)  # the state preload() records as it starts
    try:
        at = ok(open_page())
        shown = " ".join(m.value for m in at.markdown)
        assert "loading in the background" in shown and "not loaded yet" not in shown
    finally:
        resources._preloading.discard(key)
