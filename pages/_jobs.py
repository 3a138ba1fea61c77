"""Background jobs in the UI: the running-jobs line in every page's sidebar, and the jobs panel of the Sources page.

Not a page (st.navigation lists the pages explicitly in Home.py). The jobs run
in the server's job queue (``kb/jobs.py``, made once per process by
``pages/_resources.job_queue``); what is shown here is read from it and redrawn
by fragments (``st.fragment(run_every=...)``), so an admin can leave a page
while a sync runs and find its progress, or its report, on coming back.
"""

from __future__ import annotations

import time

import streamlit as st

from core.errors import UserError
from kb.markdown import escape_markdown
from kb.ingest.sync import totals
from kb.progress import STAGE_LABELS
from pages import _resources as resources

PANEL_EVERY = 1.5  # seconds between redraws of the Sources page's jobs panel
SIDEBAR_EVERY = 3.0  # and of the sidebar line on every page
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
_MINE = "_jobs_mine"  # this session's jobs: id -> text to put before its outcome
_SEEN = "_jobs_active_seen"
_FULL = "_jobs_full_run"


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value < 60:
        return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
    if value < 3600:
        return f"{value // 60:.0f} min {value % 60:02.0f} s"
    return f"{value // 3600:.0f} h {value % 3600 // 60:02.0f} min"


def stage_text(job: dict) -> str:
    """Where a running job stands: source, stage with its counts, files, chunks, elapsed and ETA."""
    parts = []
    if job.get("sources_total", 0) > 1:
        parts.append(f"source {min(job['sources_done'] + 1, job['sources_total'])} of {job['sources_total']}: "
                     f"{job.get('source', '')}")
    elif job.get("source"):
        parts.append(job["source"])
    stage = job.get("stage") or ""
    if stage:
        label = STAGE_LABELS.get(stage, stage)
        total = job.get("stage_total")
        parts.append(f"{label} {job.get('stage_done', 0):,.0f} / {total:,.0f}" if total else label)
    if job.get("files_total"):
        parts.append(f"files {job['files_done']:,} / {job['files_total']:,}")
    if job.get("chunks_embedded") or job.get("passages_embedded"):
        parts.append(f"{job.get('chunks_embedded', 0):,} chunks and {job.get('passages_embedded', 0):,} passages embedded")
    parts.append(f"{seconds(job.get('elapsed'))} elapsed")
    if job.get("eta") is not None:
        parts.append(f"about {seconds(job['eta'])} left in this stage")
    elif job.get("state") == "running" and job.get("stage_total") and job.get("stage_done", 0) >= job["stage_total"]:
        parts.append("finishing this stage")  # it read "about 0.0 s left" for 5-10 s (a browser review)
    return " · ".join(parts)


def stage_fraction(job: dict) -> float:
    total = job.get("stage_total")
    return min(1.0, max(0.0, float(job.get("stage_done") or 0) / total)) if total else 0.0


def summary(job: dict) -> str:
    """One line on how a job ended."""
    rep = job.get("report") or {}
    if job["state"] == "failed":
        return f"failed: {job.get('error') or 'unknown error'}"
    text = ""
    if job.get("kind") == "export":  # its "sources" is a count, not a sync's reports
        text = f"{rep['bytes'] / 2**20:.1f} MiB written to {rep['path']}" if "path" in rep else ""
    elif "sources" in rep:
        t = totals(rep["sources"])
        text = (f"{t['synced']} source(s) synced, {t['chunks_embedded']:,} chunks embedded"
                + (f", {len(t['failed'])} failed ({'; '.join(t['failed'])})" if t["failed"] else ""))
        if rep.get("unchanged"):
            text += f", {len(rep['unchanged'])} unchanged"
        if rep.get("backing_off"):
            text += f", {len(rep['backing_off'])} backing off"
    elif "collection" in rep:
        text = f"collection {rep['collection']}" + (f", {rep['chunks']:,} chunks" if "chunks" in rep else "")
    elif "runs" in rep:
        text = ", ".join(f"{r['mode']} hit@{r['k']} {r['hit@k']:.2f}" for r in rep["runs"] if "hit@k" in r)
    elif job.get("kind") == "answers":
        text = answers_summary(rep)
    if job["state"] == "cancelled":
        return "cancelled" + (f" ({text})" if text else "") + (f"; {rep['note']}" if rep.get("note") else "")
    return text or "done"


def answers_summary(rep: dict) -> str:
    """An answer evaluation's outcome: its main shares when it finished, how far it got when it stopped."""
    if "answered" in rep:
        return f"{rep['answered']} of {rep['of']} questions answered"
    shares = [(label, rep.get(key)) for key, label in (("facts", "facts"), ("gold_cited", "gold cited"),
                                                        ("declined", "declined"))]
    return ", ".join([f"{rep.get('n', 0)} answered"] + [f"{label} {v:.2f}" for label, v in shares if v is not None])


# ---------------------------------------------------------------------------- this session's jobs


def track(job: dict, prefix: str = "") -> None:
    """Remember that this session started ``job``, so its outcome is shown here when it ends."""
    st.session_state.setdefault(_MINE, {})[job["id"]] = prefix


def ended_jobs(queue) -> list[tuple[dict, str]]:
    """This session's jobs that have ended since the last look (each returned once), with their prefix."""
    mine: dict = st.session_state.setdefault(_MINE, {})
    out = []
    for job_id, prefix in list(mine.items()):
        rec = queue.get(job_id)
        if rec is None or rec["state"] in FINAL:
            mine.pop(job_id, None)
            if rec is not None:
                out.append((rec, prefix))
    return out


# ---------------------------------------------------------------------------- the Sources page's panel


def jobs_panel(queue, recent: int = 5) -> None:
    """Running and queued jobs with live progress and cancel buttons, then the last few that ended.

    Redrawn every ``PANEL_EVERY`` seconds on its own; when a job ends, the
    whole page reruns once so its tables (and this session's result) are fresh.
    """
    st.session_state[_FULL] = True
    _panel(queue, recent)


@st.fragment(run_every=PANEL_EVERY)
def _panel(queue, recent: int) -> None:
    jobs = queue.jobs(recent=recent)
    active = [j for j in jobs if j["state"] in ACTIVE]
    ended = [j for j in jobs if j["state"] in FINAL]
    now_active = {j["id"] for j in active}
    before = st.session_state.get(_SEEN, set())
    st.session_state[_SEEN] = now_active
    full = st.session_state.pop(_FULL, False)
    mine_ended = [i for i in st.session_state.get(_MINE, {}) if i not in now_active]
    if not full and (before - now_active or mine_ended):
        st.rerun()  # a job ended while only this panel was redrawn: refresh the page around it (and show it)

    st.markdown("**:material/pending_actions: Jobs**")
    if not jobs:
        st.caption("No jobs yet. Syncs and uploads run here in the background: you can leave this page while they run.")
        return
    for job in active:
        with st.container(border=True):
            c1, c2 = st.columns([6, 1], vertical_alignment="center")
            where = "" if job.get("local", True) else f" · in another process (pid {job.get('pid')})"
            if job["state"] == "running":
                c1.markdown(f"**{escape_markdown(job['label'])}** · running{where}")
                c1.progress(stage_fraction(job), text=stage_text(job))
            else:
                ahead = job.get("ahead")
                c1.markdown(f"**{escape_markdown(job['label'])}** · queued"
                            + (f", {ahead} job(s) ahead" if ahead else "") + where)
            if job.get("cancel_requested"):
                c1.caption(escape_markdown(job.get("message") or "cancelling…"))
            elif job.get("local", True):
                c2.button("Cancel", key=f"job_cancel_{job['id']}", icon=":material/cancel:",
                          on_click=queue.cancel, args=(job["id"],),  # before the redraw, which then shows it
                          help="Stops at a safe point: what is done is kept, nothing is half-written.")
    if ended:
        st.dataframe(
            [{"job": j["label"], "state": j["state"] + (" with errors" if (j.get("report") or {}).get("error") else ""),
              "by": j.get("origin", ""),
              "ended": ended_at(j.get("finished")),
              "took": seconds(j.get("elapsed")), "result": summary(j)} for j in ended],
            hide_index=True, width="stretch",
            column_config={"job": st.column_config.TextColumn(width="medium"),
                           "state": st.column_config.TextColumn(width="small"),
                           "by": st.column_config.TextColumn(width="small"),
                           "ended": st.column_config.TextColumn(width="small"),
                           "took": st.column_config.TextColumn(width="small"),
                           "result": st.column_config.TextColumn(width="large")},
        )


def ended_at(ts: float | None, now: float | None = None) -> str:
    """When a job ended, short enough for its narrow column: the time today, else the day and the time (the whole
    date and time was cut to "2026-12-06" in the half-width panels, a browser review)."""
    import datetime as dt

    if not ts:
        return ""
    at, today = dt.datetime.fromtimestamp(ts), dt.datetime.fromtimestamp(now or time.time()).date()
    return at.strftime("%H:%M:%S") if at.date() == today else at.strftime("%m-%d %H:%M")


# ---------------------------------------------------------------------------- every page's sidebar


def running_jobs_indicator() -> None:
    """A small line in the sidebar of every page while jobs run or wait, redrawn every few seconds."""
    try:
        queue = resources.job_queue()
    except (UserError, OSError):  # a bad KB_* value or an unusable KB_HOME: the page itself says so
        return
    _indicator(queue)


@st.fragment(run_every=SIDEBAR_EVERY)
def _indicator(queue) -> None:
    active = queue.active()
    if not active:
        return
    running = [j for j in active if j["state"] == "running"]
    waiting = len(active) - len(running)
    with st.container(border=True, key="jobs_indicator"):
        for job in running:
            st.caption(f":material/sync: **{escape_markdown(job['label'])}**")
            st.progress(stage_fraction(job), text=stage_text(job))
        if waiting:
            st.caption(f":material/hourglass_top: {waiting} more job(s) waiting")
        st.page_link("pages/sources.py", label="Jobs on the Sources page", icon=":material/pending_actions:")
