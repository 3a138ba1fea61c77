"""The dashboard's entry point: navigation, and the Home page (state at a glance)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages import _resources as resources

st.set_page_config(page_title="KB dashboard", page_icon="📚", layout="wide")


def home() -> None:
    from core import auth
    from core.errors import UserError
    from core.llm import describe_llm
    from pages._common import is_admin, kb_or_stop, run_with_status, settings_or_stop, when

    st.title(":material/hub: Knowledge base")
    s = settings_or_stop()
    kb = kb_or_stop(s)
    stats = kb.stats()
    live_name, live_cfg = kb.live()
    rows = kb.source_overview()

    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Sources", stats["sources"], border=True)
    c2.metric("Documents indexed", stats["documents"], border=True)
    c3.metric("Chunks (live collection)", f"{stats['chunks']:,}", border=True)
    c4.metric("Files skipped", stats["skipped"], border=True, help="binary, empty, too large, not UTF-8, or data files")

    loaded = resources.loaded(s)
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
                       else ":gray[not loaded yet: loads on the first search or sync]"))
    with m3.container(border=True):
        st.markdown("**:material/smart_toy: Language model**")
        st.markdown(f"`{describe_llm(s)}`  \n"
                    + (f":green[loaded] in {loaded['llm']['seconds']} s" if loaded["llm"]
                       else ":gray[not loaded yet: loads on the first question]"))
    st.caption(
        f"Retrieval default: {s.retrieval_mode}, top {s.top_k}"
        + (f", reranker `{Path(s.reranker_path).name}`" if s.reranker_path else "")
        + f" · KB_HOME `{s.home.resolve()}` · admin pages "
        + ("locked by a password" if auth.admin_locked(s) else "**open** (no password set)")
    )

    st.subheader("Sources")
    if not rows:
        st.info("No sources yet. Add one on the **Sources** page, or run `python -m kb add NAME URL_OR_PATH`.")
    else:
        st.dataframe(
            [
                {
                    "source": r["name"],
                    "indexed commit": (r["indexed_commit"] or "")[:12] or "not synced",
                    "last sync": when(r["last_synced"]),
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
    problems = kb.health()
    for p in problems:
        if p["kind"] == "not_live":
            st.info(f"{p['message']} Inspect, switch to or delete it on the Collections page.")
        else:
            st.warning(f"{p['message']} Sync it on the Sources page.")
    if not problems and rows:
        st.success("Nothing stale: every source is indexed in the live collection, with its chunk config and model.")
    elif not rows:
        st.caption("Nothing indexed yet.")

    st.subheader("Consistency")
    consistency(kb, s, is_admin, run_with_status)


def consistency(kb, s, is_admin, run_with_status) -> None:
    """``kb verify`` at a glance: healthy, or each kind of problem with examples, and a repair button for admins."""
    from kb.verify import KINDS

    report = kb.verify()
    if report["healthy"]:
        st.success("Healthy: the manifest, the live collection, its passages and the clones agree.")
        return
    st.error("The knowledge base is not consistent: search may miss documents until it is repaired.",
             icon=":material/report:")
    st.dataframe(
        [{"problem": KINDS[p["kind"]], "source": p["source"], "document": p["path"], "count": p["count"]}
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
st.navigation(pages).run()
