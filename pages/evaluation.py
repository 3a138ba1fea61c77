"""Evaluation (admin): hit@1, hit@k and MRR of each retrieval mode on a question file, and past runs."""

from __future__ import annotations

import datetime as dt

import altair as alt
import pandas as pd
import streamlit as st

from pages import _resources as resources
from kb.evaluate import load_questions, past_runs, question_set, shipped_sets
from kb.search.hits import MODES, SearchOptions
from pages._common import expected_errors, kb_or_stop, require_admin, show_error

st.title(":material/analytics: Evaluation")
s = require_admin()
kb = kb_or_stop(s)
SHIPPED = shipped_sets(s.corpus)
UPLOAD = "Upload a JSONL file"

st.caption("A question is a hit at rank r when the r-th hit comes from the source named in its `repo`, has the same "
           "`path`, and overlaps the gold line range. Each run is saved in KB_HOME/evals with the config it measured.")
origin = st.radio("Questions", [*SHIPPED, UPLOAD], horizontal=True, key="eval_origin",
                  help="The shared dev set is what retrieval was tuned on; the held-out set was written apart from it.")
try:
    if origin in SHIPPED:
        st.caption(f"`{SHIPPED[origin]}`")
        questions, questions_name = load_questions(SHIPPED[origin]), SHIPPED[origin].name
    else:
        up = st.file_uploader("Question file (JSONL: id, question, repo, path, line_start, line_end)",
                              type=["jsonl", "json", "txt"], key="eval_upload")
        if up is None:
            st.stop()
        questions = load_questions(up.name, text=up.getvalue().decode("utf-8", "replace"))
        questions_name = up.name
except expected_errors() as exc:
    show_error(exc)
    st.stop()
repos = sorted({q["repo"] for q in questions})
indexed = {r.name for r in kb.sources() if r.indexed_commit}
missing = [r for r in repos if r not in indexed]
st.markdown(f"{len(questions)} questions over {', '.join(repos)}.")
if missing:
    st.warning(f"Not indexed here: {', '.join(missing)}. Their questions can only miss.")

c1, c2 = st.columns([3, 1])
modes = c1.multiselect("Modes", MODES, default=list(MODES), key="eval_modes")
k = c2.slider("k", 1, 20, min(max(s.top_k, 1), 20), key="eval_k")
if st.button("Run evaluation", type="primary", disabled=not modes, key="eval_run"):
    reports = {}
    try:
        engine = resources.search_engine(s)
        bar = st.progress(0.0, text="Evaluating…")
        for i, mode in enumerate(modes):
            bar.progress(i / len(modes), text=f"Evaluating {mode}…")
            reports[mode] = kb.run_and_save_evaluation(engine, questions, SearchOptions(k=k, mode=mode), questions_name)
        bar.empty()
    except expected_errors() as exc:
        show_error(exc)
    st.session_state["eval_reports"] = reports

reports = st.session_state.get("eval_reports") or {}
if reports:
    st.subheader("This run")
    score_rows = [{"mode": m, "metric": metric, "value": r[metric]}
                  for m, r in reports.items() for metric in ("hit@1", "hit@k", "mrr")]
    chart = (
        alt.Chart(pd.DataFrame(score_rows))
        .mark_bar()
        .encode(
            x=alt.X("metric:N", title=None, sort=["hit@1", "hit@k", "mrr"]),
            xOffset=alt.XOffset("mode:N", sort=list(MODES)),
            y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title=None),
            color=alt.Color("mode:N", sort=list(MODES)),
            tooltip=["mode", "metric", "value"],
        )
        .properties(height=260)
    )
    left, right = st.columns([2, 3])
    left.altair_chart(chart, width="stretch")
    right.dataframe(
        [{"mode": m, "n": r["n"], "k": r["k"], "hit@1": r["hit@1"], "hit@k": r["hit@k"], "mrr": r["mrr"],
          "misses": len(r["misses"]), "seconds": r["seconds"]} for m, r in reports.items()],
        hide_index=True, width="stretch",
    )
    by_cat = [{"mode": m, "category": cat, **vals} for m, r in reports.items()
              for cat, vals in (r.get("by_category") or {}).items()]
    if by_cat:
        st.markdown("**Per question category** (overview: what X is, install, requirements, capabilities; "
                    "cross-lingual: the question's language differs from the document's)")
        st.dataframe(by_cat, hide_index=True, width="stretch")
    first = next(iter(reports.values()))
    table = pd.DataFrame(
        [
            {"id": row["id"], "question": row["question"], "gold": row["gold"], "gold passage": row.get("gold_text", ""),
             **{f"rank {m}": reports[m]["results"][i]["rank"] for m in reports},
             **{col: val for m in reports for col, val in (
                 (f"top hit ({m})", reports[m]["results"][i]["top_hit"]),
                 (f"top passage ({m})", reports[m]["results"][i]["top_text"][:400]))}}
            for i, row in enumerate(first["results"])
        ]
    )
    rank_cols = [c for c in table.columns if c.startswith("rank ")]

    def miss_style(v):
        return "background-color: #fde2e1; color: #a4161a" if pd.isna(v) else ""

    st.markdown("**Per question** (a missing rank is a miss, highlighted)")
    st.dataframe(table.style.map(miss_style, subset=rank_cols), hide_index=True, width="stretch")

st.subheader("Past runs")
runs = past_runs(s.home)
sets = sorted({question_set(r) for r in runs} | {questions_name})
shown = st.selectbox("Question set", sets, index=sets.index(questions_name), key=f"eval_past_set:{questions_name}",
                     help="Scores compare only within one question set.")
runs = [r for r in runs if question_set(r) == shown]
if not runs:
    st.caption("No saved runs on this question set yet.")
else:
    past = pd.DataFrame(
        [
            {"time": dt.datetime.fromtimestamp(r.get("time", 0)), "mode": r.get("mode"), "k": r.get("k"), "n": r.get("n"),
             "hit@1": r.get("hit@1"), "hit@k": r.get("hit@k"), "mrr": r.get("mrr"),
             "chunking": (r.get("config") or {}).get("chunk_config", ""),
             "collection": (r.get("config") or {}).get("collection", "")}
            for r in runs
        ]
    ).sort_values("time", ascending=False)
    over_time = (
        alt.Chart(past.melt(id_vars=["time", "mode"], value_vars=["hit@1", "hit@k", "mrr"], var_name="metric"))
        .mark_line(point=True)
        .encode(x=alt.X("time:T", title=None), y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title=None),
                color=alt.Color("mode:N", sort=list(MODES)), strokeDash="metric:N",
                tooltip=["time", "mode", "metric", "value"])
        .properties(height=220, title=f"Past runs on {shown} over time")
    )
    st.altair_chart(over_time, width="stretch")
    st.dataframe(past, hide_index=True, width="stretch")
