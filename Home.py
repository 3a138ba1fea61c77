"""The dashboard's entry point: navigation, and the Home page (state at a glance)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages import _resources as resources

st.set_page_config(page_title="KB dashboard", page_icon="📚", layout="wide")


def home() -> None:
    import datetime as dt
    import time

    from core import auth
    from core.errors import UserError
    from core.llm import describe_llm
    from kb.markdown import escape_markdown, plain_message
    from pages._common import (expected_errors, is_admin, kb_or_stop, logging_errors, run_with_status,
                               settings_or_stop, show_error, snapshot_schedule_line, when)

    st.title(":material/hub: Knowledge base")
    s = settings_or_stop()
    kb = kb_or_stop(s)
    with logging_errors("Home"):  # a bug on this page lands in KB_HOME/logs too
        stats = kb.stats()
        live_name, live_cfg = kb.live()
        rows = kb.source_overview()

        c1, c2, c3, c4 = st.columns(4)
        c1.metric("Sources", stats["sources"], border=True)
        c2.metric("Documents indexed", stats["documents"], border=True)
        c3.metric("Chunks (live collection)", f"{stats['chunks']:,}", border=True)
        c4.metric("Files skipped", stats["skipped"], border=True,
                  help="binary, empty, too large, not UTF-8, or data files")

        loaded = resources.loaded(s)
        pending = ":orange[loading in the background…]" if resources.preloading(s) else None
        try:
            n = kb.model_window()
            window = f"{n}-token window" if n else "no token window"
        except UserError as exc:
            window = f"({exc})"
        m1, m2, m3 = st.columns(3)
        with m1.container(border=True):
            st.markdown("**:material/database: Live collection**")
            st.markdown(f"`{live_name}`  \nchunking **{live_cfg.label()}**")
        with m2.container(border=True):
            st.markdown("**:material/scatter_plot: Embedding model**")
            st.markdown(f"`{kb.embed_model}`, {window}  \n"
                        + (f":green[loaded] in {loaded['embeddings']['seconds']} s" if loaded["embeddings"]
                           else pending or ":gray[not loaded yet: loads on the first search or sync]"))
        with m3.container(border=True):
            st.markdown("**:material/smart_toy: Language model**")
            st.markdown(f"`{describe_llm(s)}`  \n"
                        + (f":green[loaded] in {loaded['llm']['seconds']} s" if loaded["llm"]
                           else pending or ":gray[not loaded yet: loads on the first question]"))
        st.caption(
            f"Retrieval default: {s.retrieval_mode}, top {s.top_k}"
            + (f", reranker `{Path(s.reranker_path).name}`" if s.reranker_path else "")
            + f" · KB_HOME `{s.home.resolve()}` · admin pages "
            + ("locked by a password" if auth.admin_locked(s) else "**open** (no password set)")
        )

        # the last 24 hours at a glance, from the log (KB_HOME/logs, `python -m kb log`)
        st.subheader("Last 24 hours")
        act = kb.activity(24)
        hourly = act["per_hour"]
        failed = act["failed_jobs"]
        g1, g2, g3, g4 = st.columns(4)
        g1.metric("Questions asked", act["questions"], border=True,
                  help=f"answers given (chat and `kb ask`); {act['searches']} searches in all, evaluations included"
                       + "".join(f"; {n} rated {v}" for v, n in sorted(act["feedback"].items())),
                  chart_data=[b["answers"] for b in hourly], chart_type="bar")
        g2.metric("Search p95", "–" if act["search_p95_ms"] is None else f"{act['search_p95_ms']:.0f} ms",
                  border=True,
                  help=("no searches" if act["search_p50_ms"] is None else
                        f"median {act['search_p50_ms']:.0f} ms over {act['searches']} searches; "
                        "the line: p95 per hour"),
                  chart_data=[b["search_p95_ms"] for b in hourly if b["search_p95_ms"] is not None] or None)
        g3.metric("First token p95", "–" if act["ttft_p95_s"] is None else f"{act['ttft_p95_s']:.1f} s", border=True,
                  help="seconds from the question to the answer's first token, over the answers of the last 24 "
                       "hours; the line: p95 per hour",
                  chart_data=[b["ttft_p95_s"] for b in hourly if b["ttft_p95_s"] is not None] or None)
        g4.metric("Errors", act["errors"] + len(failed), border=True,
                  help=f"{act['errors']} unexpected (bugs, with a traceback in the log), {len(failed)} failed "
                       "sync/scheduled fetch/upload/re-chunk/repair jobs (those a stopped server interrupted "
                       "included); the unexpected ones: `python -m kb log --kind error --since 24h`, the jobs: "
                       "`python -m kb log --since 24h`")
        if act["searches"] or act["questions"]:
            import pandas as pd

            # hours as labels in their own order: on a time axis the two series' bars were drawn over each other
            # (a browser review), since Vega groups bars side by side only along a band of categories
            frame = pd.DataFrame(
                [{"hour": dt.datetime.fromtimestamp(b["start"]).strftime("%H:00"), "searches": b["searches"],
                  "answers": b["answers"]} for b in hourly]
            ).set_index("hour")
            st.bar_chart(frame, y_label="per hour", stack=False, sort=False, height=220)
        elif not act["records"]:
            st.caption("Nothing logged in the last 24 hours: questions, searches, syncs and errors show here as they "
                       "happen (`python -m kb log`).")
        if act["last_error"]:
            e = act["last_error"]
            st.caption(f"Last error {when(e['ts'])}: `{e['type']}`: {escape_markdown(str(e['message'])[:200])}")
        last = act["last_sync"]
        for f in failed[-3:]:
            text = (f"{f['kind'].capitalize()} failed {when(f['ts'])}" + (f" for {f['source']}" if f["source"] else "")
                    + f": {escape_markdown(str(f['error'])[:300])}")
            if done := f["fixed"]:
                st.info(f"{text}. It has {'fetched' if done['job'] == 'fetch' else 'synced'} fine since "
                        f"({when(done['ts'])}).", icon=":material/check_circle:")
            else:
                st.warning(text)
        if rows:
            st.dataframe([sync_row(r, last.get(r["name"])) for r in rows], hide_index=True, width="stretch")

        st.subheader("Sources")
        if not rows:
            st.info("No sources yet. Add a git repository or upload files on the Sources page, or run "
                    "`python -m kb add NAME URL_OR_PATH`.")
            st.page_link("pages/sources.py", label="Sources: add a repository or upload files",
                         icon=":material/source:")
        else:
            st.dataframe(
                [
                    {
                        "source": r["name"],
                        "indexed commit": (r["indexed_commit"] or "")[:12] or "not synced",
                        "indexed at": when(r["last_synced"]),  # a sync that finds nothing new leaves it
                        "documents": r["documents"], "chunks": r["chunks"], "skipped": r["skipped"],
                        "in live collection": r["in_live_collection"],
                        "kind": r["kind"], "branch": r["branch"], "url": r["url"],
                    }
                    for r in rows
                ],
                hide_index=True,
                width="stretch",
            )

        st.subheader("Stale")
        st.caption(schedule_line(kb.schedule_status()))
        try:  # the backups' schedule beside the sync's (a browser review found it on the Collections page only)
            st.caption(snapshot_schedule_line(kb.snapshot_schedule()))
        except expected_errors() as exc:
            show_error(exc)
        failures = kb.sync_failures()
        for f in failures:  # scheduled sync: a remote that can't be reached never touches the index
            st.warning(f"**{f['source']}**: the scheduled fetch failed {f['failures']} time(s), last {when(f['last_failure'])}"
                       f" ({plain_message(f['last_error'])}); next try "
                       + (when(f["next_try"]) if (f["next_try"] or 0) > time.time() else "at the next scheduled pass")
                       + ". The index keeps the last good sync.",
                       icon=":material/cloud_off:")
        problems = kb.health()
        for p in problems:
            if p["kind"] == "not_live":
                st.info(f"{p['message']} Inspect, switch to or delete it on the Collections page.")
            else:
                st.warning(f"{p['message']} Sync it on the Sources page.")
        if not rows:  # nothing to be stale about is not "nothing stale"
            st.caption("Nothing indexed yet.")
        elif not problems and failures:  # indexed as synced, but a remote could not be asked whether it moved
            st.caption("Every source is indexed in the live collection; the sources above may be behind their remotes.")
        elif not problems:
            st.success("Nothing stale: every source is indexed in the live collection, with its chunk config and "
                       "model.")

        st.subheader("Consistency")
        consistency(kb, s, is_admin, run_with_status)


def sync_row(source: dict, last: dict | None) -> dict:
    """A source's row in the last 24 hours' syncs: its last sync's outcome, or when it was last indexed."""
    from pages._common import when

    if last is None:
        return {"source": source["name"], "last sync": when(source["last_synced"]), "result": "no sync in 24 h",
                "by": "", "files changed": None, "chunks embedded": None, "seconds": None}
    return {"source": source["name"], "last sync": when(last["ts"]),
            "result": f"error: {last['error']}" if last["error"] else "ok", "by": last["job"],
            "files changed": last["files_changed"], "chunks embedded": last["chunks_embedded"],
            "seconds": last["seconds"]}


def schedule_line(sched: dict) -> str:
    """The scheduled sync in one line: its interval and its last and next pass, or how to turn it on."""
    from pages._common import interval, when

    last = (f"last pass {when(sched['last_run'])}" + (" (`kb watch`)" if sched["origin"] == "cli" else "")
            if sched["last_run"] else "no pass yet")
    if sched["every"]:
        return (f"Scheduled sync every {interval(sched['every'])} (`KB_SYNC_EVERY`): {last}"
                + (f", next {when(sched['next_run'])}." if sched["next_run"] else "."))
    return (f"Scheduled sync is off in the dashboard (set `KB_SYNC_EVERY`, e.g. 15m, or run `python -m kb watch`): "
            f"{last}.")


def consistency(kb, s, is_admin, run_with_status) -> None:
    """``kb verify`` at a glance: healthy, or each kind of problem with examples, and a repair button for admins."""
    from kb.verify import KINDS

    if st.session_state.pop("home_removed", None):
        st.success(f"Removed what the interrupted import left: {st.session_state.pop('home_removed_what', '')}.")
    report = kb.verify()
    if report["healthy"]:
        st.success("Healthy: the manifest, the live collection, its passages and the clones agree.")
        leftovers(kb, report["import_leftovers"], is_admin(s), run_with_status)
        return
    leftovers(kb, report["import_leftovers"], False, run_with_status)  # the repair below removes them too
    st.error("The knowledge base is not consistent: search may miss documents until it is repaired.",
             icon=":material/report:")
    st.dataframe(
        [{"problem": KINDS[p["kind"]], "source": p["source"], "document": p["path"] or None,
          "commit": p["commit"] or None, "count": p["count"]}
         for p in report["problems"][:200]],
        hide_index=True, width="stretch",
    )
    if is_admin(s):
        if st.button("Repair: re-index only what is inconsistent", type="primary", key="home_repair"):
            out, err = run_with_status("Repairing", lambda p: kb.verify(repair=True, progress=p))
            if out is not None:
                (st.success if out["healthy"] else st.warning)(
                    "Repaired: healthy." if out["healthy"] else f"Still not consistent: {out['totals']}")
    else:
        st.caption("An admin can repair it here (sign in on an admin page), or run `python -m kb verify --repair`.")


def leftovers(kb, left: list[str], can_remove: bool, run_with_status) -> None:
    """What a killed snapshot import left, named, with a button that removes it (``kb verify --repair``)."""
    if not left:
        return
    them = "them" if len(left) > 1 else "it"
    st.info(f"A snapshot import was interrupted and left {'; '.join(left)}. A repair (`python -m kb verify --repair`) "
            f"or the next import removes {them}.", icon=":material/info:")
    if can_remove and st.button(f"Remove {them}", key="home_leftovers"):
        out, _ = run_with_status("Removing", lambda p: kb.verify(repair=True, progress=p))
        if out is not None and not out["import_leftovers"]:
            # shown after the rerun: on this run the note above still named what is gone (a browser review)
            st.session_state["home_removed"], st.session_state["home_removed_what"] = True, "; ".join(left)
            st.rerun()


PAGES = Path(__file__).parent / "pages"
pages = {
    "": [st.Page(home, title="Home", icon=":material/home:", default=True)],
    "Ask": [
        st.Page(PAGES / "chat.py", title="Chat", icon=":material/chat:"),
        st.Page(PAGES / "retrieval_lab.py", title="Retrieval lab", icon=":material/manage_search:"),
    ],
    "Admin": [
        st.Page(PAGES / "sources.py", title="Sources", icon=":material/source:"),
        st.Page(PAGES / "documents.py", title="Documents", icon=":material/description:"),
        st.Page(PAGES / "collections.py", title="Collections", icon=":material/database:"),
        st.Page(PAGES / "evaluation.py", title="Evaluation", icon=":material/analytics:"),
    ],
}
from pages._common import logging_errors  # noqa: E402  (after set_page_config)

resources.preload()  # the LLM starts loading with the server's first page view, not with the first question
navigation = st.navigation(pages)
with st.sidebar:  # every page: a line while background jobs run or wait (pages/_jobs.py)
    from pages._jobs import running_jobs_indicator

    running_jobs_indicator()
with logging_errors("page"):  # an unexpected error on any page goes to the log, then to Streamlit as before
    navigation.run()
