"""Collections (admin): every Chroma collection, a page of its records (click one to open it), look-up by id,
switch or delete; snapshots of the knowledge base, exported and imported."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from kb.errors import KBError
from kb.markdown import code_span, counted, escape_markdown
from pages import _resources as resources
from pages._common import (expected_errors, kb_or_stop, require_admin, run_with_status, show_error,
                           snapshot_schedule_line)
from pages._jobs import ended_jobs, jobs_panel, track

st.title(":material/database: Collections")
settings = require_admin()
kb = kb_or_stop(settings)


def show_record(rec: dict) -> None:
    """One record: where it comes from, its text, its vector's summary and its metadata."""
    meta = rec["metadata"]
    l, r = st.columns([3, 2])
    with l:
        st.markdown(f"**{escape_markdown(str(meta.get('source')))}/{escape_markdown(str(meta.get('path')))}:"
                    f"{meta.get('line_start')}-{meta.get('line_end')}** @ `{str(meta.get('commit', ''))[:8]}`"
                    + (f" · [permalink]({meta['url']})" if meta.get("url") else ""))
        st.code(rec["text"], language="markdown", wrap_lines=True)
    with r:
        st.markdown(f"Embedding: {rec['dimension']} dimensions, norm {rec['norm']:.4f}")
        st.code(", ".join(f"{x:+.4f}" for x in rec["head"]) + ", …", language=None)
        if "bm25" in meta:
            meta["bm25"] = meta["bm25"][:200] + ("…" if len(meta["bm25"]) > 200 else "")
        st.json(meta)


def export_column(has_live: bool) -> None:
    """Write a snapshot as a background job, then offer every snapshot on this server for download.

    A job, so that closing the tab neither stops it nor loses the file: any admin session finds it listed here.
    """
    st.markdown("**Export**")
    st.caption("The manifest, the live collection with its passages and vectors, the chunk config, and "
               "optionally every source's clone, each part with its sha256. Written in the background to "
               "`snapshots/` in the data folder, then offered for download (CLI: `kb export FILE.tar.gz "
               "[--with-repos]`).")
    with_repos = st.checkbox("Include the clones", key="snap_with_repos", disabled=not has_live,
                             help="without them, an import clones each git source again from its URL")
    try:
        st.caption(snapshot_schedule_line(kb.snapshot_schedule()))
    except expected_errors() as exc:  # KB_HOME/snapshots can't be read: said here, the export then fails alike
        show_error(exc)
    queue = resources.job_queue(settings)
    if st.button("Write snapshot", key="snap_export_btn", disabled=not has_live,
                 help=None if has_live else "nothing to export: no live collection yet"):
        try:
            track(queue.submit_export(with_repos=with_repos), "snap")
        except expected_errors() as exc:
            show_error(exc)
    for rec, prefix in ended_jobs(queue):
        if prefix == "snap" and rec["state"] == "done" and rec.get("report"):
            st.session_state["snap_written"] = rec["report"]
            # the picker keeps its choice across runs: without this, Download gave the archive picked before the
            # one just written (a browser review)
            st.session_state["snap_pick"] = Path(rec["report"]["path"]).name
        elif prefix == "snap" and rec["state"] == "failed":
            show_error(Exception(f"snapshot export failed: {rec.get('error')}"))
    jobs_panel(queue, recent=3)
    written = st.session_state.get("snap_written")
    if written and Path(written["path"]).is_file():
        st.success(f"Wrote a snapshot of {written['bytes'] / 2**20:.1f} MiB: {counted(written['sources'], 'source')}, "
                   f"{counted(written['chunks'], 'chunk')}, {counted(written['passages'], 'passage')}"
                   + (f", {counted(len(written['repos']), 'clone')}" if written["with_repos"] else "")
                   + ", on this server at:")
        st.code(written["path"], language=None)
    try:
        files = kb.snapshots()
    except expected_errors() as exc:
        show_error(exc)
        return
    if not files:
        return
    names = [f["name"] for f in files]
    if st.session_state.get("snap_pick") not in names:  # none picked yet, or removed meanwhile (pruned)
        written_name = Path(written["path"]).name if written else ""
        st.session_state["snap_pick"] = written_name if written_name in names else names[0]
    chosen = st.selectbox(f"Snapshots on this server ({len(files)})", names, key="snap_pick",
                          format_func=lambda n: snapshot_label(files[names.index(n)]))
    path = Path(files[names.index(chosen)]["path"])
    st.download_button("Download", data=lambda: path.read_bytes(), file_name=path.name,
                       mime="application/gzip", key="snap_download", icon=":material/download:")


def snapshot_label(f: dict) -> str:
    import datetime as dt

    when = dt.datetime.fromtimestamp(f["modified"]).strftime("%Y-%m-%d %H:%M")
    return f"{f['name']} · {f['bytes'] / 2**20:.1f} MiB · {when}"


def snapshot_panel(has_live: bool) -> None:
    """Export the knowledge base to a checked archive (then download it), or import one into an empty one."""
    ex, im = st.columns(2)
    with ex:
        export_column(has_live)
    with im:
        st.markdown("**Import**")
        try:
            problem = kb.snapshot_target_problem()
        except expected_errors() as exc:
            show_error(exc)
            return
        st.caption("Loads a snapshot into an empty knowledge base: all of it or nothing, every part checked "
                   "against its checksum first (CLI: `kb import FILE.tar.gz`)."
                   + (f" Not here: {escape_markdown(problem)}." if problem else ""))
        upload = st.file_uploader("Snapshot archive (.tar.gz)", type=["gz"], key="snap_upload", disabled=bool(problem))
        server_path = st.text_input("…or its path on this server", key="snap_path", disabled=bool(problem),
                                    placeholder="/backups/kb-snapshot.tar.gz").strip()
        if st.button("Import", type="primary", key="snap_import_btn",
                     disabled=bool(problem) or not (upload or server_path)):
            def run(progress):
                if upload is None:
                    return kb.import_snapshot(server_path, progress=progress)
                with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
                    try:
                        tmp.write(upload.getbuffer())
                        tmp.flush()
                    except OSError as exc:  # a full /tmp was a traceback; nothing is imported yet
                        raise KBError(f"the uploaded archive could not be written to {tmp.name} for reading: "
                                      f"{exc}") from None
                    return kb.import_snapshot(tmp.name, progress=progress)

            out, err = run_with_status("Importing snapshot", run)
            if err is None:
                missing = ", ".join(m["name"] for m in out["clones"]["missing"])
                st.session_state["coll_msg"] = (
                    f"Imported `{out['collection']}`: {out['sources']} sources, {out['chunks']:,} chunks, "
                    f"{out['passages']:,} passages." + (f" No clone of: {missing}." if missing else ""))
                st.rerun()


try:
    colls = kb.collections()
except expected_errors() as exc:
    show_error(exc)
    st.stop()
if not colls:
    msg = st.session_state.pop("coll_msg", None)
    if msg:
        st.success(msg)
    st.info("No collections yet: the first sync creates the live one, or import a snapshot.")
    st.subheader("Snapshots")
    snapshot_panel(has_live=False)
    st.stop()

st.dataframe(
    [
        {"live": "● live" if c["live"] else "", "name": c["name"], "records": c["count"], "passages": c["passages"],
         "dimension": c["dimension"], "embedding model": c["embed_model"], "chunk config": c["chunk_config_label"], "status": c["status"]}
        for c in colls
    ],
    hide_index=True,
    width="stretch",
)
names = [c["name"] for c in colls]
live = next((c["name"] for c in colls if c["live"]), names[0])
picked = st.selectbox("Collection", names, index=names.index(live), key="coll_pick",
                      format_func=lambda n: f"{n}  (live)" if n == live else n)
info = next(c for c in colls if c["name"] == picked)

# ---------------------------------------------------------------------------- actions

a1, a2, _ = st.columns([1, 1, 3])
if info["live"]:
    a1.button("Make live", disabled=True, key="coll_live_btn", help="already the live collection")
    a2.button("Delete…", disabled=True, key="coll_delete_btn", help="the live collection can't be deleted")
elif info["status"] != "ready":
    a1.button("Make live", disabled=True, key="coll_live_btn",
              help=f"incomplete ({info['status']}): re-chunk again to build it whole, or delete it")
    if a2.button("Delete…", key="coll_delete_btn"):
        st.session_state["coll_delete_pending"] = picked
else:
    if a1.button("Make live", type="primary", key="coll_live_btn",
                 help="search and chat use it from now on; every source must be synced into it"):
        _, err = run_with_status(f"Switching to {picked}", lambda p: kb.set_live(picked))
        if err is None:
            st.session_state["coll_msg"] = f"`{picked}` is now the live collection."
            st.rerun()
    if a2.button("Delete…", key="coll_delete_btn"):
        st.session_state["coll_delete_pending"] = picked
pending = st.session_state.get("coll_delete_pending")
if pending == picked and not info["live"]:
    st.warning(f"Delete collection `{picked}` and its {info['count']} records? This can't be undone.", icon=":material/warning:")
    d1, d2, _ = st.columns([1, 1, 4])
    if d1.button("Delete permanently", type="primary", key="coll_delete_confirm"):
        st.session_state.pop("coll_delete_pending", None)
        _, err = run_with_status(f"Deleting {picked}", lambda p: kb.drop_collection(picked))
        if err is None:
            st.session_state["coll_msg"] = f"Deleted `{picked}`."
            st.rerun()
    if d2.button("Cancel", key="coll_delete_cancel"):
        st.session_state.pop("coll_delete_pending", None)
        st.rerun()
msg = st.session_state.pop("coll_msg", None)
if msg:
    st.success(msg)

records_tab, lookup_tab, snapshot_tab = st.tabs(["Records", "Look up by id", "Snapshots"])

# ---------------------------------------------------------------------------- records

with records_tab:
    f1, f2, f3, f4 = st.columns([1, 2, 0.7, 0.7])
    sources = [r.name for r in kb.sources()]
    src = f1.selectbox("Source", ["any", *sources], key="coll_source")
    path = f2.text_input("Path (exact, or a prefix ending in /)", key="coll_path",
                         placeholder="docs/zh_cn/  or  README.md")
    size = f3.selectbox("Per page", [25, 50, 100, 250], index=1, key="coll_size")
    source = None if src == "any" else src
    try:
        pages = kb.records(picked, source, path, page=1, size=int(size))["pages"]
        page = f4.number_input(f"Page (of {pages})", 1, pages, 1, key="coll_page")
        got = kb.records(picked, source, path, page=int(page), size=int(size))
    except expected_errors() as exc:
        show_error(exc)
        st.stop()
    where = got["where"]
    if got.get("nothing_under"):
        st.caption(f"0 record(s) match: no indexed document's path starts with {code_span(got['nothing_under'])}.")
    else:
        st.caption(f"{got['total']:,} record(s) match"
                   + (f" {code_span('where=' + json.dumps(where, ensure_ascii=False))}" if where else "")
                   + f" · showing {len(got['rows'])}")
    table = pd.DataFrame(
        [
            {"id": m["id"], "source": m.get("source"), "path": m.get("path"),
             "lines": f"{m.get('line_start')}-{m.get('line_end')}", "tokens": m.get("n_tokens"),
             "heading": m.get("heading", ""), "commit": str(m.get("commit", ""))[:8],
             "text": m["text"][:160].replace("\n", " ")}
            for m in got["rows"]
        ],
        columns=["id", "source", "path", "lines", "tokens", "heading", "commit", "text"],
    )
    # one selection per table shown: another collection, filter or page starts with nothing selected
    shown = hashlib.sha256(json.dumps([picked, source, path, got["page"], int(size)]).encode()).hexdigest()[:10]
    event = st.dataframe(table, hide_index=True, width="stretch", height=420, key=f"coll_records_{shown}",
                         on_select="rerun", selection_mode="single-row")
    chosen = [i for i in event.selection.rows if 0 <= i < len(table)]
    if not chosen:
        st.caption("Click a row to open its record.")
    else:
        try:
            rec = kb.record(picked, str(table.iloc[chosen[0]]["id"]))
        except expected_errors() as exc:
            show_error(exc)
            st.stop()
        if rec is None:
            st.warning("That record is gone (a sync changed the collection): pick another.")
        else:
            with st.container(border=True):
                show_record(rec)

# ---------------------------------------------------------------------------- by id

with lookup_tab:
    rid = st.text_input("Record id", key="coll_id", placeholder="32 hex characters (or click a row in the Records tab)")
    if rid.strip():
        try:
            rec = kb.record(picked, rid)
        except expected_errors() as exc:
            show_error(exc)
            st.stop()
        if rec is None:
            st.warning(f"No record with id {code_span(rid.strip())} in {code_span(picked)}.")
        else:
            show_record(rec)

# ---------------------------------------------------------------------------- snapshots

with snapshot_tab:
    snapshot_panel(has_live=any(c["live"] for c in colls))
