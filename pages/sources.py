"""Sources (admin): add git repositories, bundles or uploads; sync with a dry-run preview; delete.

Syncs and upload indexing run as background jobs in the server's job queue
(kb/jobs.py): the buttons enqueue them, the jobs panel shows their progress
and lets them be cancelled, and a job's report is shown here when it ends,
even if the admin went to another page meanwhile.
"""

from __future__ import annotations

import math

import streamlit as st

from kb.markdown import escape_markdown, plain_message
from core.settings import split_list
from pages import _resources as resources
from kb.errors import KBError
from kb.ingest.sources import named_files, outcome_text, upload_outcome
from kb.ingest.sync import totals
from pages._common import kb_or_stop, require_admin, run_with_status, show_error, when
from pages._jobs import ended_jobs, jobs_panel, track

st.title(":material/source: Sources")
s = require_admin()
kb = kb_or_stop(s)
queue = resources.job_queue(s)
ADD_TAB = ":material/add: Add a source"


def report_table(reports: list[dict]) -> list[dict]:
    """The sync report as a table narrow enough for the page: skipped files and long chunks are in the details."""
    return [
        {
            "source": r["name"], "commit": f"{(r['commit_before'] or '—')[:7]} → {(r['commit_after'] or '—')[:7]}",
            "files +": r["files_added"], "files ~": r["files_modified"], "files −": r["files_deleted"],
            ("chunks to embed" if r["dry_run"] else "chunks embedded"): r["chunks_embedded"],
            "chunks reused": r["chunks_reused"],
            ("chunks to delete" if r["dry_run"] else "chunks deleted"): r["chunks_deleted"],
            ("passages to embed" if r["dry_run"] else "passages embedded"): r["passages_embedded"],
            "seconds": r["seconds"], "error": r["error"],
        }
        for r in reports
    ]


def report_columns(table: list[dict]) -> dict:
    """Widths that keep the report inside the page: counts are narrow, the error text is cut (it is shown below)."""
    wide = {"source": "medium", "commit": "medium", "error": "medium"}
    return {c: st.column_config.Column(width=wide.get(c, "small")) for c in (table[0] if table else {})}


def show_reports(reports: list[dict]) -> None:
    table = report_table(reports)
    st.dataframe(table, hide_index=True, width="stretch", column_config=report_columns(table))
    for r in reports:
        if r["error"]:
            st.error(f"**{r['name']}**: {plain_message(r['error'])}", icon=":material/error:")
            continue
        if (r["commit_before"] and r["commit_before"] == r["commit_after"]
                and not (r["added"] or r["modified"] or r["deleted"] or r["skipped"])):
            st.caption(f"{r['name']}: up to date at {r['commit_after'][:8]}, nothing to do.")
            continue
        over = f", {len(r['chunks_overlong'])} chunks over the window" if r["chunks_overlong"] else ""
        with st.expander(f"{r['name']}: {len(r['added'])} added, {len(r['modified'])} modified, "
                         f"{len(r['deleted'])} deleted, {len(r['skipped'])} skipped files{over}"):
            for label, paths in (("Added", r["added"]), ("Modified", r["modified"]), ("Deleted", r["deleted"])):
                if paths:
                    st.markdown(f"**{label}** ({len(paths)})")
                    st.code("\n".join(paths), language=None, height=min(300, 24 * len(paths) + 20))
            if r["skipped"]:
                st.markdown("**Skipped**")
                st.dataframe(r["skipped"], hide_index=True, width="stretch")
            if r["chunks_overlong"]:
                st.markdown(f"**Chunks longer than the embedding window** ({len(r['chunks_overlong'])}): "
                            "their tail is never embedded; re-chunk with a smaller size or in tokens.")
                st.dataframe(r["chunks_overlong"], hide_index=True, width="stretch")


def remember(kind: str, text: str, reports: list[dict] | None = None, rows: list[dict] | None = None,
             errors: list[str] | None = None) -> None:
    """Keep the outcome of an action for the next run (the page reruns to refresh its tables)."""
    st.session_state["sources_last"] = {"kind": kind, "text": text, "reports": reports or [], "rows": rows or [],
                                        "errors": errors or []}


def sync_summary(reports: list[dict]) -> tuple[str, str]:
    t = totals(reports)
    text = (f"{t['synced']} source(s) synced" + (f", {len(t['failed'])} failed" if t["failed"] else "") + ": "
            f"{t['chunks_embedded']} chunks embedded, {t['chunks_reused']} reused, {t['chunks_deleted']} deleted, "
            f"{t['passages_embedded']} passages embedded.")
    return ("warning" if t["failed"] else "success"), text


def upload_summary(r: dict, given: int) -> tuple[str, str]:
    """What an upload did with each file (``kb.ingest.sources.upload_outcome``); skipped files make it a warning,
    all of them skipped an error (``kb upload`` then exits 1)."""
    counts = upload_outcome(r, given)
    text = (f"Uploaded {given} file(s) to **{escape_markdown(r['name'])}** at {(r['commit_after'] or '')[:8]}: "
            f"{outcome_text(counts)}" + (" (reasons below)" if counts["skipped"] else "")
            + f"; {r['chunks_embedded']} chunks embedded.")
    kind = "error" if counts["skipped"] >= given else "warning" if counts["skipped"] else "success"
    return kind, text


def remember_job(job: dict, prefix: str = "") -> None:
    """A job of this session has ended: keep its outcome for the message box."""
    rep = job.get("report") or {}
    reports = rep.get("sources") or []
    lead = f"{prefix} " if prefix else ""
    if job["state"] == "failed":
        remember("error", f"{lead}{escape_markdown(job['label'])} failed: {escape_markdown(job.get('error') or '')}",
                 reports)
    elif job["state"] == "cancelled":
        remember("warning", f"{lead}{escape_markdown(job['label'])} was cancelled at a safe point: "
                            f"{len(reports)} source(s) finished before it stopped, nothing is half-written."
                            + (f" Note: {escape_markdown(rep['note'])}." if rep.get("note") else ""), reports)
    elif job["kind"] == "upload" and reports:
        r = reports[0]
        if r["error"]:
            remember("error", r["error"], reports)
        else:
            kind, text = upload_summary(r, len(job["args"].get("files", [])))
            remember(kind, text, reports)
    else:
        kind, text = sync_summary(reports)
        remember(kind, lead + text, reports)


def enqueued(job: dict, text: str, prefix: str = "") -> None:
    """A job was queued from this page: say so, and rerun so the jobs panel shows it."""
    track(job, prefix)
    remember("info", f"{text} Its progress is under **Jobs** below; you can leave this page meanwhile.")
    st.rerun()


for _job, _prefix in ended_jobs(queue):  # jobs of this session that ended since the last run
    remember_job(_job, _prefix)

overview = kb.source_overview()
rows = kb.sources()
names = [r.name for r in rows]

# ---------------------------------------------------------------------------- the sources

overview_box = st.empty()  # emptied the moment a source is being added, so "No sources yet" never lingers
if overview:
    overview_box.dataframe(
        [
            {
                "source": r["name"], "indexed commit": (r["indexed_commit"] or "")[:12] or "not synced",
                "indexed at": when(r["last_synced"]), "documents": r["documents"], "skipped": r["skipped"],
                "kind": r["kind"], "branch": r["branch"], "url": r["url"], "web URL": r["web_url"],
                "extensions": ", ".join(r["extensions"]),
            }
            for r in overview
        ],
        hide_index=True,
        width="stretch",
        column_config={"web URL": st.column_config.LinkColumn("web URL")},
    )
else:
    overview_box.info("No sources yet: add a git repository, a local repository or a `.bundle` file, or upload files "
                      "(the **Add a source** and **Upload files** tabs below).")

last = st.session_state.get("sources_last")
if last:
    getattr(st, last["kind"])(last["text"])
    for err in last["errors"]:
        st.error(plain_message(err), icon=":material/error:")
    if last["rows"]:
        st.dataframe(last["rows"], hide_index=True, width="stretch")
    if last["reports"]:
        show_reports(last["reports"])

jobs_panel(queue)

# with no sources yet, there is nothing to sync: open on adding one
sync_tab, add_tab, upload_tab, delete_tab = st.tabs(
    [":material/sync: Sync", ADD_TAB, ":material/upload: Upload files", ":material/delete: Delete"],
    key="sources_tabs", default=None if rows else ADD_TAB,
)

# ---------------------------------------------------------------------------- sync

with sync_tab:
    if not rows:
        st.caption("Nothing to sync yet.")
    else:
        target = st.selectbox("Source to sync", ["All sources", *names], key="sync_target")
        picked = None if target == "All sources" else [target]
        st.caption("A sync fetches, diffs the indexed commit against the new one, reloads only changed files and "
                   "embeds only chunk texts not stored yet. Preview it first with a dry run (nothing is written).")
        b1, b2, _ = st.columns([2, 1, 2])  # the preview's label whole (it read "Preview changes (dry r…")
        preview_clicked = b1.button("Preview changes (dry run)", key="sync_preview_btn", width="stretch")
        sync_clicked = b2.button("Sync now", type="primary", key="sync_now_btn")
        if preview_clicked:
            reports, err = run_with_status("Dry run", lambda p: kb.sync(picked, dry_run=True, progress=p))
            st.session_state["sync_preview"] = (
                {"target": target, "reports": [r.as_dict() for r in reports]} if reports is not None else None
            )
        preview = st.session_state.get("sync_preview")
        if preview and preview["target"] == target:
            st.markdown(f"#### Dry run: what a sync of *{escape_markdown(target)}* would do")
            show_reports(preview["reports"])
            todo = any(r["files_added"] or r["files_modified"] or r["files_deleted"] for r in preview["reports"])
            st.caption("Applying syncs to the newest commit at that moment (it may have moved since the preview).")
            if st.button("Apply this sync" if todo else "Sync anyway", type="primary", key="sync_apply_btn"):
                sync_clicked = True
        if sync_clicked:
            st.session_state.pop("sync_preview", None)
            job = queue.submit_sync(picked)
            enqueued(job, f"Sync of {escape_markdown(target.lower() if picked is None else target)} queued.")

# ---------------------------------------------------------------------------- add

with add_tab:
    with st.form("add_source", clear_on_submit=False):
        c1, c2 = st.columns([1, 2])
        name = c1.text_input("Name", key="add_name", placeholder="xtuner", help="1–64 letters, digits, '-', '_' or '.'")
        url = c2.text_input("Git URL, local repository or .bundle file", key="add_url",
                            placeholder="https://gitee.com/InternLM/xtuner.git  ·  /path/to/repo  ·  /path/xtuner.bundle")
        c3, c4, c5 = st.columns([1, 2, 1])
        branch = c3.text_input("Branch (optional)", key="add_branch", placeholder="default branch")
        web_url = c4.text_input("Web URL for permalinks (optional)", key="add_web", placeholder="https://gitee.com/InternLM/xtuner",
                                help="Derived from gitee/github/gitlab URLs; set it for bundles and local paths.")
        exts = c5.text_input("Extensions", value=",".join(s.extensions), key="add_exts")
        sync_after = st.checkbox("Sync right after adding", value=True, key="add_sync")
        add_clicked = st.form_submit_button("Add source", type="primary", key="add_btn")
    if add_clicked:
        overview_box.empty()
        extensions = split_list(exts) or None
        row, err = run_with_status(
            f"Adding {name or '(no name)'}",
            lambda p: kb.add_source(name.strip(), url.strip(), branch.strip() or None, web_url.strip() or None,
                                    extensions, progress=p),
        )
        if row is not None:
            added = f"Added **{escape_markdown(row.name)}** ({escape_markdown(row.url)}, branch {escape_markdown(row.branch)})."
            remember("success", added)
            if sync_after:
                enqueued(queue.submit_sync([row.name]), f"{added} Its sync is queued.", prefix=added)
            st.rerun()
    st.divider()
    st.markdown("**The tutorial's six repositories** (InternLM, xtuner, lmdeploy, opencompass, lagent, "
                "InternLM-XComposer on gitee). Each one is cloned; one failing doesn't stop the others.")
    if st.button("Register the six default repositories", key="add_defaults_btn"):
        results, err = run_with_status("Registering the default repositories", lambda p: kb.add_defaults(p))
        if results is not None:
            cloned = [r["name"] for r in results if r["ok"] and r["message"] == "cloned"]
            already = [r["name"] for r in results if r["ok"] and r["message"] != "cloned"]
            errors = [f"**{r['name']}**: {r['message']}" for r in results if not r["ok"]]
            text = (f"Default repositories: {len(cloned)} cloned" + (f", {len(already)} already registered" if already else "")
                    + (f", {len(errors)} failed" if errors else "") + "."
                    + (" Sync the new ones on the Sync tab." if cloned else ""))
            table = [{"name": r["name"], "url": r["url"], "ok": r["ok"],
                      "result": r["message"] if r["ok"] else "failed (see above)"} for r in results]
            remember("warning" if errors else "success", text, rows=table, errors=errors)
            st.rerun()

# ---------------------------------------------------------------------------- upload

with upload_tab:
    files_sources = [r.name for r in rows if r.kind == "files"]
    limit_mb = max(1, math.ceil(s.upload_max_bytes / 2**20))  # the uploader's unit: MiB, rounded up
    st.caption(f"Files go to a files-only source (created on first upload): each upload is a commit, so it syncs, "
               f"diffs and cites like a repository. Allowed: {', '.join(s.upload_extensions)}; "
               f"at most {s.upload_max_bytes / 1e6:.0f} MB a file (`KB_UPLOAD_MAX_BYTES`).")
    target_src = st.text_input("Files-only source", value=files_sources[0] if files_sources else "uploads",
                               help="Existing: " + (", ".join(files_sources) or "none yet"), key="upload_source")
    uploaded = st.file_uploader("Files", type=list(s.upload_extensions), accept_multiple_files=True, key="upload_files",
                                max_upload_size=limit_mb)
    if st.button("Upload and index", type="primary", disabled=not uploaded, key="upload_btn"):
        try:
            files = named_files((f.name, f.getvalue()) for f in uploaded)
            job = queue.submit_upload(files, target_src.strip())
        except KBError as exc:
            show_error(exc)
        else:
            enqueued(job, f"Indexing {len(files)} file(s) into **{escape_markdown(target_src.strip())}** is queued.")

# ---------------------------------------------------------------------------- delete

with delete_tab:
    if not rows:
        st.caption("Nothing to delete.")
    else:
        victim = st.selectbox("Source", names, key="delete_source")
        if st.button("Delete this source…", key="delete_btn"):
            st.session_state["delete_pending"] = victim
        pending = st.session_state.get("delete_pending")
        if pending and pending in names:
            n_docs = next((r["documents"] for r in overview if r["name"] == pending), 0)
            st.warning(f"Delete **{escape_markdown(pending)}**? Its {n_docs} documents, its chunks in every collection "
                       "and its local clone are removed. This can't be undone.", icon=":material/error:")
            typed = st.text_input(f"Type {pending} to confirm", key="delete_typed")
            c1, c2, _ = st.columns([1, 1, 4])
            if c1.button("Delete permanently", type="primary", disabled=typed.strip() != pending, key="delete_confirm_btn"):
                st.session_state.pop("delete_pending", None)
                removed, err = run_with_status(f"Deleting {pending}", lambda p: kb.remove_source(pending))
                if removed is not None:
                    remember("success", f"Deleted {escape_markdown(pending)}: {removed} chunks removed.")
                    st.session_state.pop("sync_preview", None)
                    st.rerun()
            if c2.button("Cancel", key="delete_cancel_btn"):
                st.session_state.pop("delete_pending", None)
                st.rerun()
