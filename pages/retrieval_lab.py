"""Retrieval lab: one question, dense, BM25 and hybrid hits side by side, with scores and why each came back."""

from __future__ import annotations

import time

import streamlit as st

from pages import _resources as resources
from kb.words import query_tokens
from kb.markdown import code_span, escape_markdown
from kb.search.hits import BM25_LEAD, IN_SOURCE, MODES, NEWS, OPENING, SCORE_NOTES, SearchOptions
from pages._common import expected_errors, kb_or_stop, settings_or_stop, render_hit, show_error

st.title(":material/manage_search: Retrieval lab")
s = settings_or_stop()
kb = kb_or_stop(s)

with st.sidebar:
    st.subheader("Search options")
    k = st.slider("Hits per retriever (k)", 1, 20, min(max(s.top_k, 1), 20), key="lab_k")
    mmr = st.toggle("MMR (diversify dense hits)", value=False, key="lab_mmr",
                    help="maximal marginal relevance on the dense retriever (also inside hybrid)")
    sources = [r.name for r in kb.sources()]
    source = st.selectbox("Source", ["any", *sources], key="lab_source")
    prefix = st.text_input("Path prefix", key="lab_prefix", placeholder="docs/zh_cn/")
    st.markdown("**Score thresholds** (hits below are dropped)")
    thresholds: dict[str, float | None] = {}
    for mode, default, step in (("dense", 0.3, 0.05), ("bm25", 5.0, 0.5), ("hybrid", 0.02, 0.002)):
        on = st.checkbox(f"{mode}", value=False, key=f"lab_th_on_{mode}", help=SCORE_NOTES[mode])
        thresholds[mode] = (st.number_input(f"{mode} minimum", value=default, step=step, format="%.3f",
                                            key=f"lab_th_{mode}", label_visibility="collapsed") if on else None)

query = st.text_input("Question", placeholder="e.g. xtuner是什么？  or  How do I fine-tune with QLoRA?", key="lab_query")
also_as = st.text_input("Also search as (hybrid only)", key="lab_also_as",
                        placeholder="the question in the other language: what a chat answer shows as “also searched as”",
                        help="hybrid adds a BM25 and a dense list on this text, as the chat does with "
                             "KB_TRANSLATE_QUESTIONS or its “Also search in the other language” toggle")
if not query.strip():
    st.caption("Ask something to see what each retriever returns. Scores are on each retriever's own scale. "
               f"Dense: {SCORE_NOTES['dense']}. BM25: {SCORE_NOTES['bm25']}. Hybrid: {SCORE_NOTES['hybrid']}; "
               f"when a question names one source, hybrid's BM25 lists rank that source's chunks only, "
               f"dense search within that source (\"{IN_SOURCE}\") and, for "
               f"what-is questions, its README's opening (\"{OPENING}\"), for what's-new questions, its README's "
               f"news (\"{NEWS}\") join the fusion as weighted lists too, "
               f"and so does BM25's first chunk when its score clearly leads the second's (\"{BM25_LEAD}\"). "
               "A hybrid hit that is only a heading, or that sits in a hidden folder (`.github/`, `.claude/`: "
               "contributors' tooling), counts half. Each hit says which lists found it, at which rank.")
    st.stop()

try:
    engine = resources.search_engine(s)
    searched = engine.searched_as(query)
    terms = query_tokens(searched)
    st.markdown("Query terms (BM25): " + (" ".join(code_span(t) for t in terms) if terms else "*none*"))
    if searched != query:
        st.caption(f"Searched as “{escape_markdown(searched)}”: a project name written as its docs write it.")
    results = {}
    filters = {"source": None if source == "any" else source, "path_prefix": prefix.strip() or None}
    with st.spinner("Searching…"):
        for mode in MODES:
            t0 = time.perf_counter()
            opts = SearchOptions(k=k, mode=mode, threshold=thresholds[mode], mmr=mmr, also_as=also_as.strip(),
                                 **filters)
            results[mode] = (engine.search(query, opts), (time.perf_counter() - t0) * 1000)
        # the gate of KB_TRANSLATE_QUESTIONS=auto, on the same filters (its own first five, no threshold)
        disagree = engine.retrievers_disagree(query, SearchOptions(**filters))
except expected_errors() as exc:
    show_error(exc)
    st.stop()

ids = {mode: {h.id for h in hits} for mode, (hits, _) in results.items()}
both = len(ids["dense"] & ids["bm25"])
gate = (" Their first five share no chunk: with `KB_TRANSLATE_QUESTIONS=auto` (the chat's “When BM25 and dense "
        "disagree”) an answer also searches the question's translation." if disagree else "")
st.caption(f"Dense and BM25 agree on {both} of their top {k}.{gate} Live collection `{kb.live()[0]}`.")
for col, mode in zip(st.columns(3, gap="medium"), MODES):
    hits, ms = results[mode]
    with col:
        st.subheader({"dense": "Dense", "bm25": "BM25", "hybrid": "Hybrid"}[mode], anchor=False)
        st.caption(f"{SCORE_NOTES[mode]} · {ms:.0f} ms")
        if not hits:
            st.info("No hits" + (" above the threshold." if thresholds[mode] is not None else "."))
        for h in hits:
            render_hit(h, terms)
