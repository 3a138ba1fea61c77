"""Collections (admin): every Chroma collection, a page of its records, look-up by id, switch or delete."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from kb.markdown import escape_markdown
from pages._common import expected_errors, kb_or_stop, require_admin, run_with_status, show_error

st.title(":material/database: Collections")
kb = kb_or_stop(require_admin())


try:
    colls = kb.collections()
except expected_errors() as exc:
    show_error(exc)
    st.stop()
if not colls:
    st.info("No collections yet: the first sync creates the live one.")
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

records_tab, lookup_tab = st.tabs(["Records", "Look up by id"])

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
    st.caption(f"{got['total']:,} record(s) match" + (f" `where={json.dumps(where, ensure_ascii=False)}`" if where else "")
               + f" · showing {len(got['rows'])}")
    st.dataframe(
        pd.DataFrame(
            [
                {"id": m["id"], "source": m.get("source"), "path": m.get("path"),
                 "lines": f"{m.get('line_start')}-{m.get('line_end')}", "tokens": m.get("n_tokens"),
                 "heading": m.get("heading", ""), "commit": str(m.get("commit", ""))[:8],
                 "text": m["text"][:160].replace("\n", " ")}
                for m in got["rows"]
            ],
            columns=["id", "source", "path", "lines", "tokens", "heading", "commit", "text"],
        ),
        hide_index=True,
        width="stretch",
        height=420,
    )

# ---------------------------------------------------------------------------- by id

with lookup_tab:
    rid = st.text_input("Record id", key="coll_id", placeholder="32 hex characters, e.g. from the Records tab")
    if rid.strip():
        try:
            rec = kb.record(picked, rid)
        except expected_errors() as exc:
            show_error(exc)
            st.stop()
        if rec is None:
            st.warning(f"No record with id `{escape_markdown(rid.strip())}` in `{picked}`.")
        else:
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
