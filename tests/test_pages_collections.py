"""The Collections page (AppTest): a record opens when its row is clicked; snapshots are written, downloaded and
imported from the page, through the same KnowledgeBase facade as the CLI.

Tiny sentence-transformers model for indexing, like the other page tests (``page_env``, ``lagent_env``).
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import add_bundle
from kb import snapshot
from page_helpers import finish_jobs, ok, texts


def records_frame(at):
    """The records table (the dataframe with a heading column) and its widget key."""
    for df in at.dataframe:
        if "heading" in df.value.columns:
            return df, df.key
    raise AssertionError("no records table")


def select_row(at, key: str, row: int | None):
    at.session_state[key] = {"selection": {"rows": [] if row is None else [row], "columns": []}}
    return ok(at.run())


# ---------------------------------------------------------------------------- records: click to open


def test_clicking_a_record_opens_it(lagent_env, open_page, shared_kb):
    kb = shared_kb()
    at = ok(open_page("collections"))
    df, key = records_frame(at)
    assert key.startswith("coll_records_") and len(df.value) > 2
    assert "Click a row to open its record." in texts(at.caption) and not at.json

    at = select_row(at, key, 2)
    rid = df.value.loc[2, "id"]
    rec = kb.record(kb.live()[0], rid)
    assert "32 dimensions" in texts(at.markdown) and at.json
    assert at.json[0].value and rec["metadata"]["path"] in texts(at.markdown)
    assert any(c.value == rec["text"] for c in at.code)  # the record's whole text, not the table's snippet
    assert at.text_input(key="coll_id").value == ""  # opened in place: nothing copied into the look-up tab

    at = select_row(at, key, 0)  # another row opens another record
    first = kb.record(kb.live()[0], df.value.loc[0, "id"])
    assert any(c.value == first["text"] for c in at.code) and not any(c.value == rec["text"] for c in at.code)

    at = select_row(at, key, None)  # deselected: nothing open
    assert not at.json and "Click a row to open its record." in texts(at.caption)

    at = select_row(at, key, 1)  # another filter shows another table, with nothing selected
    at.text_input(key="coll_path").input(df.value.loc[0, "path"]).run()
    ok(at)
    _, key2 = records_frame(at)
    assert key2 != key and not at.json and "Click a row to open its record." in texts(at.caption)


# ---------------------------------------------------------------------------- snapshots


def test_write_a_snapshot_and_download_it(lagent_env, open_page, shared_kb):
    kb = shared_kb()
    at = ok(open_page("collections"))
    assert not at.download_button  # nothing written yet
    assert at.button(key="snap_import_btn").disabled  # not an empty knowledge base
    assert "already holds 1 source" in texts(at.caption)
    assert "No scheduled snapshots: set `KB_SNAPSHOT_EVERY`" in texts(at.caption)
    at.checkbox(key="snap_with_repos").check()
    at.button(key="snap_export_btn").click().run()
    ok(at)
    at = ok(finish_jobs(at))  # a background job: it goes on if the tab closes
    assert not at.error, texts(at.error)
    assert "Wrote" in texts(at.success)
    written = list((lagent_env / "snapshots").glob("kb-snapshot-*.tar.gz"))
    assert len(written) == 1 and str(written[0]) in texts(at.code)
    index = snapshot.read_index(written[0])
    assert index["with_repos"] is True and index["repos"] == ["lagent"]
    assert index["counts"]["chunks"] == kb.stats()["chunks"]
    download = at.download_button(key="snap_download")
    assert download.label == "Download" and not download.disabled
    assert not list((lagent_env / "snapshots").glob(".*"))  # no temporary file left beside it
    jobs = at.dataframe[-1].value.set_index("job")  # the jobs panel, with what each job did
    assert jobs.loc["Snapshot export with the clones", "result"].endswith(f"MiB written to {written[0]}")
    assert "1 source," in texts(at.success) and "1 clone," in texts(at.success)  # it said "1 sources", "1 clones"
    # a second one: the picker follows it (it kept the archive picked before, and Download gave that one)
    time.sleep(1.1)  # archive names carry the second
    at.button(key="snap_export_btn").click().run()
    at = ok(finish_jobs(at))
    newest = sorted((lagent_env / "snapshots").glob("kb-snapshot-*.tar.gz"))[-1]
    assert newest != written[0] and at.selectbox(key="snap_pick").value == newest.name


def test_a_snapshot_outlives_the_session_that_asked_for_it(lagent_env, open_page, shared_kb):
    # the export runs in the server's job queue: a session opened afterwards (another tab, a reload) lists the file
    at = ok(open_page("collections"))
    at.button(key="snap_export_btn").click().run()
    from pages import _resources as resources

    assert resources.job_queue().wait_idle(300)
    later = ok(open_page("collections"))
    assert "Wrote" not in texts(later.success)  # not this session's job
    written = sorted((lagent_env / "snapshots").glob("kb-snapshot-*.tar.gz"))
    pick = later.selectbox(key="snap_pick")
    assert written[-1].name in str(pick.value) and pick.index == 0  # newest first
    assert later.download_button(key="snap_download").label == "Download"


def test_the_snapshots_tab_shows_the_schedule_and_its_archives(lagent_env, open_page, monkeypatch):
    monkeypatch.setenv("KB_SNAPSHOT_EVERY", "1d")
    monkeypatch.setenv("KB_SNAPSHOT_KEEP", "3")
    at = ok(open_page("collections"))
    caption = texts(at.caption)
    assert "a snapshot with the clones every 1 d (`KB_SNAPSHOT_EVERY`), the newest 3 kept" in caption
    from pages import _resources as resources

    assert resources.job_queue().snapshot_every == 86400
    written = wait_for_file(lagent_env / "snapshots", "kb-snapshot-auto-*.tar.gz")  # the first is due at once
    assert resources.job_queue().wait_idle(120)
    at = ok(open_page("collections"))
    assert "(`KB_SNAPSHOT_KEEP`; 1 now" in texts(at.caption) and "(in 24 h)." in texts(at.caption)
    assert written.name in str(at.selectbox(key="snap_pick").value)


def wait_for_file(folder: Path, pattern: str, timeout: float = 120) -> Path:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} in {folder}")


def test_import_an_uploaded_snapshot_into_an_empty_kb(page_env, tmp_path, monkeypatch, corpus, shared_kb, open_page):
    # a snapshot of another knowledge base, made with the same settings
    monkeypatch.setenv("KB_HOME", str(tmp_path / "source"))
    source = shared_kb()
    add_bundle(source, corpus, "lagent")
    archive = Path(source.export_snapshot(tmp_path / "lagent.tar.gz")["path"])
    chunks = source.stats()["chunks"]
    monkeypatch.setenv("KB_HOME", str(page_env))

    at = ok(open_page("collections"))
    assert "import a snapshot" in texts(at.info)
    assert at.button(key="snap_export_btn").disabled  # nothing to export
    assert at.button(key="snap_import_btn").disabled  # nothing chosen yet

    # a broken upload is refused with its reason, and nothing is written
    at.file_uploader(key="snap_upload").upload("broken.tar.gz", archive.read_bytes()[:5000], "application/gzip")
    at.run()
    at.button(key="snap_import_btn").click().run()
    ok(at)
    assert "truncated" in texts(at.error)
    kb = shared_kb()
    assert not kb.sources() and kb.snapshot_target_problem() is None

    at.file_uploader(key="snap_upload").clear()
    at.file_uploader(key="snap_upload").upload("lagent.tar.gz", archive.read_bytes(), "application/gzip")
    at.run()
    at.button(key="snap_import_btn").click().run()
    ok(at)
    assert not at.error, texts(at.error)
    assert "Imported" in texts(at.success)
    assert kb.stats()["chunks"] == chunks and [s.name for s in kb.sources()] == ["lagent"]
    assert kb.verify()["healthy"]
    records_frame(at)  # the page now shows the imported collection
    assert at.button(key="snap_import_btn").disabled and "already holds 1 source" in texts(at.caption)


def test_import_from_a_path_on_the_server(page_env, tmp_path, monkeypatch, corpus, shared_kb, open_page):
    monkeypatch.setenv("KB_HOME", str(tmp_path / "source"))
    source = shared_kb()
    add_bundle(source, corpus, "lagent")
    archive = source.export_snapshot(tmp_path / "lagent.tar.gz")["path"]
    monkeypatch.setenv("KB_HOME", str(page_env))

    at = ok(open_page("collections"))
    at.text_input(key="snap_path").input(str(tmp_path / "missing.tar.gz")).run()
    at.button(key="snap_import_btn").click().run()
    ok(at)
    assert "no such file" in texts(at.error)
    at.text_input(key="snap_path").input(archive).run()
    at.button(key="snap_import_btn").click().run()
    ok(at)
    assert "Imported" in texts(at.success) and shared_kb().verify()["healthy"]


def test_a_path_prefix_matching_nothing_says_so(lagent_env, open_page):
    """Not the filter that matches nothing (``{"path": {"$in": ["\\u0000"]}}``, an implementation detail)."""
    at = ok(open_page("collections"))
    at.text_input(key="coll_path").input("no/such/").run()
    ok(at)
    caption = texts(at.caption)
    assert "no indexed document's path starts with `no/such/`" in caption
    assert "$in" not in caption and "u0000" not in caption
