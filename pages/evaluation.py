"""Evaluation (admin): retrieval (hit@1, hit@k, MRR per mode) and answers (facts, gold cited, declined, timings) on a
question set, with past runs of each; and the chat's rated answers, a thumbs-down one saved as a question."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from pages import _resources as resources
from core.llm import describe_llm
from kb.citations import hit_link, location, parse_lines
from kb.evaluate import (FEEDBACK_LABEL, answerable, load_questions, question_set, run_label, run_time, shipped_sets,
                         unindexed)
from kb.feedback import parse_facts
from kb.markdown import escape_markdown
from kb.search.hits import MODES, SearchOptions
from pages._jobs import ended_jobs, jobs_panel, track
from pages._common import expected_errors, kb_or_stop, require_admin, show_error, when

st.title(":material/analytics: Evaluation")
s = require_admin()
kb = kb_or_stop(s)
UPLOAD = "Upload a JSONL file"
RETRIEVAL, ANSWERS, RATED = "Retrieval", "Answers", "Rated answers"
ANSWER_METRICS = {"facts": "key facts stated", "gold_cited": "gold lines cited", "gold_retrieved": "gold lines retrieved",
                  "facts_shown": "key facts in the excerpts", "declined": "unanswerable declined",
                  "coverage": "sentences cited"}
CONTEXT_METRICS = ("gold_retrieved", "facts_shown")  # what the model was given, not what it wrote


def esc_list(items) -> str:
    return escape_markdown(", ".join(items))


def share(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def past_set_picker(runs: list[dict], questions_name: str, key: str) -> tuple[list[dict], str]:
    """Runs on one question set (scores compare only within one), picked in a select box."""
    sets = sorted({question_set(r) for r in runs} | {questions_name})
    shown = st.selectbox("Question set", sets, index=sets.index(questions_name), key=f"{key}:{questions_name}",
                         help="Scores compare only within one question set.")
    return [r for r in runs if question_set(r) == shown], shown


def over_runs(runs: list[dict], metrics: dict[str, str], color: str, title: str) -> alt.Chart:
    """Scores of saved runs, one x position per run labelled with when it ran (and its mode and k)."""
    labels = [run_label(r) for r in runs]
    rows = [{"run": run_label(r), "mode": r.get("mode"), "metric": metrics[metric], "value": r.get(metric),
             "chunking": (r.get("config") or {}).get("chunk_config", "")}
            for r in runs for metric in metrics if r.get(metric) is not None]
    return (
        alt.Chart(pd.DataFrame(rows, columns=["run", "mode", "metric", "value", "chunking"]))
        .mark_line(point=True)
        .encode(
            x=alt.X("run:N", title="run (when · mode · k)", sort=labels,
                    axis=alt.Axis(labelAngle=-25, labelLimit=240, labelOverlap=False)),
            y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title=None),
            color=alt.Color(f"{color}:N", sort=list(MODES) if color == "mode" else list(metrics.values())),
            **({"strokeDash": alt.StrokeDash("metric:N", sort=list(metrics.values())),
                "shape": alt.Shape("metric:N", sort=list(metrics.values()))} if color == "mode" else {}),
            tooltip=["run", "mode", "metric", "value", "chunking"],
        )
        .properties(height=340, title=title)  # the run labels, slanted, take about 100 px of it
    )


def not_indexed_table(report: dict) -> None:
    left = report.get("not_indexed") or []
    if left:
        with st.expander(f"{len(left)} question(s) not indexed here, left out of the scores", icon=":material/block:"):
            st.dataframe([{"id": r["id"], "repo": r["repo"], "question": r["question"], "gold lines": r["gold"]}
                          for r in left], hide_index=True, width="stretch")


# ---------------------------------------------------------------------------- rated answers (the chat's feedback)


def rated_answers_section() -> None:
    st.caption("Answers rated in the Chat, newest first. Save a thumbs-down answer as a question with the lines that "
               f"should answer it: it goes to `KB_HOME/questions/feedback.jsonl`, offered as the **{FEEDBACK_LABEL}** "
               "question set for the next retrieval or answer evaluation.")
    rated = kb.rated_answers()
    if not rated:
        st.info("No rated answers yet: rate an answer in the Chat (thumbs up or down) and it is listed here.")
        return
    st.dataframe(
        [{"when": when(r["when"]), "rating": "👍 up" if r["score"] else "👎 down", "question": r["question"],
          "answer": r["answer"][:300], "comment": r["comment"], "conversation": r["conversation"]} for r in rated],
        hide_index=True, width="stretch",
    )
    downs = [r for r in rated if r["score"] == 0]
    if not downs:
        st.caption("No thumbs-down answer to turn into a question.")
        return
    st.markdown("#### Save a thumbs-down answer as a question")
    pick = st.selectbox("Answer", range(len(downs)), key="fb_pick",
                        format_func=lambda i: f"{when(downs[i]['when'])} · {downs[i]['question'][:90]}")
    r = downs[int(pick)]
    ident = f"{r['conversation']}:{r['message']}"
    with st.container(border=True):
        st.markdown(f"**Question:** {escape_markdown(r['question'])}")
        if r["searched"] != r["question"]:
            st.markdown(f"**Searched as:** {escape_markdown(r['searched'])} (a follow-up, rewritten to stand alone)")
        st.markdown(f"**Answer:** {escape_markdown(r['answer']) or '*empty*'}")
        if r["comment"]:
            st.markdown(f"**Comment:** {escape_markdown(r['comment'])}")
    sources = r["sources"]
    labels = {n: f"[{n}] {location(h.get('source', '?'), h.get('path', '?'), h.get('line_start', 0), h.get('line_end', 0))}"
                 + (" · cited" if n in r["cited"] else "") for n, h in enumerate(sources, 1)}
    if sources:
        st.markdown("Its sources: " + " · ".join(
            f"[{escape_markdown(labels[n])}]({hit_link(h)})"
            for n, h in enumerate(sources, 1) if {"source", "path", "line_start", "line_end"} <= set(h)))
    question = st.text_area("Question", value=r["searched"], key=f"fb_question:{ident}", height=80,
                            help="as it was searched: a follow-up is saved rewritten, so that it means something alone")
    gold = st.multiselect("Gold lines from its sources", list(labels), format_func=labels.get, key=f"fb_gold:{ident}",
                          help="the sources whose lines answer the question (all in one source)")
    st.caption("…or type a location (the file's path in its source, and lines like `3-9`):")
    names = sorted({str(h.get("source")) for h in sources if h.get("source")} | {x.name for x in kb.sources()})
    c1, c2, c3 = st.columns([1, 2, 1])
    typed_source = c1.selectbox("Source", names or ["(none)"], key=f"fb_source:{ident}")
    typed_path = c2.text_input("Path", key=f"fb_path:{ident}", placeholder="docs/en/get_started/installation.md")
    typed_lines = c3.text_input("Lines", key=f"fb_lines:{ident}", placeholder="3-9")
    facts_text = st.text_area("Key facts a good answer states (optional)", key=f"fb_facts:{ident}", height=80,
                              help="one fact per line; alternatives on one line separated by |, e.g. `0.05 | 5%`")
    if st.button("Save as a question", type="primary", key="fb_save"):
        locations = [{"source": sources[n - 1]["source"], "path": sources[n - 1]["path"],
                      "line_start": sources[n - 1]["line_start"], "line_end": sources[n - 1]["line_end"]} for n in gold]
        if typed_path.strip() or typed_lines.strip():
            span = parse_lines(typed_lines)
            if span is None:
                show_error(Exception(f"lines {typed_lines!r}: give a line range like 3-9 (or one line, like 7)"))
                return
            locations.append({"source": typed_source, "path": typed_path.strip(), "line_start": span[0],
                              "line_end": span[1]})
        try:
            path = kb.add_feedback_question(question, locations, parse_facts(facts_text),
                                            answer="", conversation=r["conversation"])
        except expected_errors() as exc:
            show_error(exc)
            return
        st.success(f"Saved to `{path}`: pick **{FEEDBACK_LABEL}** under Questions to evaluate on it.",
                   icon=":material/playlist_add_check:")


# ---------------------------------------------------------------------------- question sets


def pick_questions() -> tuple[list[dict], str] | None:
    sets = shipped_sets(s.corpus, s.home)
    origin = st.selectbox("Questions", [*sets, UPLOAD], key="eval_origin",
                          help="The shared dev set is what retrieval was tuned on; the held-out and blind sets were "
                               f"written apart from it. {FEEDBACK_LABEL}: the questions saved from rated chat answers.")
    try:
        if origin in sets:
            st.caption(f"`{sets[origin]}`")
            return load_questions(sets[origin]), sets[origin].name
        up = st.file_uploader("Question file (JSONL: id, question, repo, path, line_start, line_end)",
                              type=["jsonl", "json", "txt"], key="eval_upload")
        if up is None:
            return None
        return load_questions(up.name, text=up.getvalue().decode("utf-8", "replace")), up.name
    except expected_errors() as exc:
        show_error(exc)
        return None


def coverage(questions: list[dict]) -> tuple[bool, int]:
    """Say which repos are not indexed here; returns whether to score only the questions on indexed ones, and how
    many questions a run then scores."""
    missing, n_missing = unindexed(questions, kb.indexed_sources())
    st.markdown(f"{len(questions)} questions over {esc_list(sorted({q['repo'] for q in questions}))}.")
    if not missing:
        return False, len(questions)
    only = st.toggle("Score only the questions on indexed sources", value=True, key="eval_only_indexed",
                     help="off: every question is scored, and those on sources not indexed here can only miss")
    if only:
        st.warning(f"Not indexed here: {esc_list(missing)}. Their {n_missing} question(s) are left out of the scores "
                   "and listed as not indexed.")
    else:
        st.warning(f"Not indexed here: {esc_list(missing)}. Their {n_missing} question(s) can only miss.")
    return only, (len(questions) - n_missing if only else len(questions))


# ---------------------------------------------------------------------------- this session's evaluation jobs


def not_kept(*reports: dict) -> None:
    """Say so when a finished run could not be saved: it is shown here, but not among the past runs below."""
    reason = next((r["not_saved"] for r in reports if r.get("not_saved")), None)
    if reason:
        st.warning(f"This run is shown, but not kept: {reason}.", icon=":material/save:")


def take_ended_runs(queue) -> None:
    """Keep the report of each evaluation job of this session that ended, whichever mode is shown now.

    Both modes read here because :func:`ended_jobs` hands each ended job out
    once: a retrieval run that ends while the Answers mode is shown must not
    be dropped.
    """
    for rec, prefix in ended_jobs(queue):
        rep = rec.get("report") or {}
        if prefix == "eval" and rep:
            st.session_state["eval_reports"] = {r["mode"]: r for r in rep.get("runs", [])}
        elif prefix == "eval_ans" and rec["state"] == "done" and "rows" in rep:
            st.session_state["eval_answer_report"] = rep
        elif prefix == "eval_ans" and rec["state"] == "cancelled":
            st.info(f"Answer evaluation cancelled after {rep.get('answered', 0)} of {rep.get('of', '?')} questions: "
                    "a run is saved only once every question is answered.", icon=":material/cancel:")
        if prefix in ("eval", "eval_ans") and rec.get("error"):
            what = "answer evaluation" if prefix == "eval_ans" else "evaluation"
            show_error(Exception(f"{what} {rec['state']}: {rec['error']}"))


# ---------------------------------------------------------------------------- retrieval


def retrieval_section(questions: list[dict], questions_name: str, only_indexed: bool) -> None:
    st.caption("A question is a hit at rank r when the r-th hit comes from the source named in its `repo`, has the "
               "same `path`, and overlaps the gold line range. Each run is saved in KB_HOME/evals with the config it "
               "measured.")
    c1, c2 = st.columns([3, 1])
    modes = c1.multiselect("Modes", MODES, default=list(MODES), key="eval_modes")
    k = c2.slider("k", 1, 20, min(max(s.top_k, 1), 20), key="eval_k")
    queue = resources.job_queue(s)
    scorable = any(answerable(q) for q in questions)
    if not scorable:
        st.info("This set holds only unanswerable questions, with no gold lines to find: run it under *Answers*.",
                icon=":material/info:")
    if st.button("Run evaluation", type="primary", disabled=not modes or not scorable, key="eval_run"):
        try:  # a job in the server's worker, with live progress: it goes on if the admin leaves this page
            track(queue.submit_evaluation(resources.search_engine(s), questions,
                                          [SearchOptions(k=k, mode=m) for m in modes], questions_name,
                                          only_indexed=only_indexed), "eval")
        except expected_errors() as exc:
            show_error(exc)
    take_ended_runs(queue)
    jobs_panel(queue, recent=3)

    reports = st.session_state.get("eval_reports") or {}
    if reports:
        st.subheader("This run")
        not_kept(*reports.values())
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
                {"id": row["id"], "question": row["question"], "gold": row["gold"],
                 "gold passage": row.get("gold_text", ""),
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
        not_indexed_table(first)

    st.subheader("Past runs")
    runs, shown = past_set_picker(kb.past_evaluations("retrieval"), questions_name, "eval_past_set")
    if not runs:
        st.caption("No saved runs on this question set yet.")
        return
    st.altair_chart(over_runs(runs, {"hit@1": "hit@1", "hit@k": "hit@k", "mrr": "MRR"}, "mode",
                              f"Past runs on {shown}"), width="stretch")
    st.dataframe(
        pd.DataFrame([
            {"run": run_label(r), "mode": r.get("mode"), "k": r.get("k"), "n": r.get("n"), "hit@1": r.get("hit@1"),
             "hit@k": r.get("hit@k"), "mrr": r.get("mrr"), "not indexed": len(r.get("not_indexed") or []),
             "chunking": (r.get("config") or {}).get("chunk_config", ""),
             "collection": (r.get("config") or {}).get("collection", "")}
            for r in sorted(runs, key=run_time, reverse=True)
        ]),
        hide_index=True, width="stretch",
    )


# ---------------------------------------------------------------------------- answers


def answers_report(report: dict) -> None:
    """One answer run: its figures (as ``kb eval --answers`` prints them), a chart, and a row per question."""
    m = st.columns(4)
    m[0].metric("Questions", report["n"], border=True)
    m[1].metric("Key facts stated", share(report.get("facts")), border=True,
                help="answerable questions with facts: every fact group appears in the answer")
    m[2].metric("Gold lines cited", share(report.get("gold_cited")), border=True,
                help="answerable questions: a [n] marker points at a source overlapping the gold lines")
    m[3].metric("Unanswerable declined", share(report.get("declined")), border=True,
                help="questions marked answerable: false whose answer says the sources don't hold it")
    st.caption(f"Median time to the first token **{report.get('ttft_median')} s**, whole answer "
               f"**{report.get('seconds_median')} s** · k = {report.get('k')}, {report.get('mode')}"
               + (f" · gold lines retrieved {share(report.get('gold_retrieved'))}"
                  if report.get("gold_retrieved") is not None else "")
               + (f" · key facts in the excerpts {share(report.get('facts_shown'))}"
                  if report.get("facts_shown") is not None else "")
               + (f" · answers withheld (nothing in them found in the sources) {share(report.get('withheld'))},"
                  f" {report.get('withheld_right', 0)} of them stating the facts" if report.get("withheld") else ""))
    bars = [{"metric": label, "value": report[key]} for key, label in ANSWER_METRICS.items()
            if report.get(key) is not None]
    left, right = st.columns([2, 3])
    if bars:
        left.altair_chart(
            alt.Chart(pd.DataFrame(bars)).mark_bar()
            .encode(y=alt.Y("metric:N", title=None, sort=list(ANSWER_METRICS.values()), axis=alt.Axis(labelLimit=200)),
                    x=alt.X("value:Q", scale=alt.Scale(domain=[0, 1]), title="share of questions"),
                    color=alt.Color("metric:N", legend=None, sort=list(ANSWER_METRICS.values())),
                    tooltip=["metric", "value"])
            .properties(height=alt.Step(34), title="This answer run"),
            width="stretch",
        )

    def mark(v):
        return "–" if v is None else ("yes" if v else "no")

    rows = []
    for r in report.get("rows") or []:
        sources = r.get("sources") or []
        cited = [f"[{n}] {sources[n - 1]}" for n in r.get("cited") or [] if 1 <= n <= len(sources)]
        rows.append({
            "id": r["id"], "question": r["question"], "answer": r["answer"], "citations": "\n".join(cited),
            "withheld answer": r.get("withheld", ""),
            "gold lines": r.get("gold") or ("(unanswerable)" if not r.get("answerable", True) else ""),
            "facts": mark(r.get("facts")), "facts in excerpts": mark(r.get("facts_shown")),
            "gold cited": mark(r.get("gold_cited")), "declined": mark(r.get("declined")),
            "first token s": r.get("ttft_s"), "seconds": r.get("seconds"),
        })
    right.dataframe(
        pd.DataFrame([{"id": x["id"], "facts": x["facts"], "gold cited": x["gold cited"], "declined": x["declined"],
                       "first token s": x["first token s"]} for x in rows]),
        hide_index=True, width="stretch",
    )
    st.markdown("**Per question**: the answer, the sources it cites, and the gold lines")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"answer": st.column_config.TextColumn("answer", width="large"),
                                "citations": st.column_config.TextColumn("citations", width="medium")})
    not_indexed_table(report)


def answers_section(questions: list[dict], questions_name: str, only_indexed: bool, n_scored: int) -> None:
    st.caption(f"Asks the language model (`{describe_llm(s)}`) every question through the answer chain, as "
               "`python -m kb eval FILE --answers` does: key facts stated, a citation at the gold lines, unanswerable "
               "questions declined, time to the first token and in all. Each answer takes the model seconds: the "
               "run is a background job (you can leave this page; Cancel stops it between two questions), saved in "
               "KB_HOME/evals/answers once every question is answered.")
    c1, c2, c3 = st.columns([1, 1, 1])
    mode = c1.selectbox("Retrieval", MODES, index=MODES.index(s.retrieval_mode) if s.retrieval_mode in MODES else 2,
                        key="eval_ans_mode")
    k = c2.slider("Sources per answer (k)", 1, 10, min(max(s.top_k, 1), 10), key="eval_ans_k")
    n_scored = max(n_scored, 1)
    limit = c3.number_input("Questions to ask", 1, n_scored, n_scored, key=f"eval_ans_limit:{questions_name}:{n_scored}",
                            help="the first so many of the questions scored; fewer for a quick look")
    queue = resources.job_queue(s)
    if st.button("Run answer evaluation", type="primary", key="eval_ans_run"):
        try:  # a job in the server's worker, with live progress: it goes on (and is saved) if the admin leaves
            engine = resources.search_engine(s)
            resources.embeddings(s)  # load here, under a spinner, not silently in the job's first question
            track(queue.submit_answer_evaluation(
                resources.chat_model(s), engine, questions, SearchOptions(k=k, mode=mode), questions_name,
                only_indexed=only_indexed, limit=int(limit) if int(limit) < n_scored else None), "eval_ans")
        except expected_errors() as exc:
            show_error(exc)
    take_ended_runs(queue)
    jobs_panel(queue, recent=3)
    report = st.session_state.get("eval_answer_report")
    if report:
        st.subheader("This run")
        not_kept(report)
        answers_report(report)

    st.subheader("Past answer runs")
    runs, shown = past_set_picker(kb.past_evaluations("answers"), questions_name, "eval_ans_past_set")
    if not runs:
        st.caption("No saved answer runs on this question set yet.")
        return
    st.altair_chart(over_runs(runs, {m: v for m, v in ANSWER_METRICS.items() if m not in CONTEXT_METRICS}, "metric",
                              f"Past answer runs on {shown}"), width="stretch")
    past = sorted(runs, key=run_time, reverse=True)
    st.dataframe(
        pd.DataFrame([
            {"run": run_label(r), "mode": r.get("mode"), "k": r.get("k"), "n": r.get("n"), "facts": r.get("facts"),
             "gold cited": r.get("gold_cited"), "declined": r.get("declined"), "sentences cited": r.get("coverage"),
             "ttft median s": r.get("ttft_median"), "seconds median": r.get("seconds_median"),
             "llm": (r.get("config") or {}).get("llm", ""), "chunking": (r.get("config") or {}).get("chunk_config", "")}
            for r in past
        ]),
        hide_index=True, width="stretch",
    )
    labels = [run_label(r) for r in past]
    pick = st.selectbox("Open a past answer run", range(len(past)), format_func=labels.__getitem__,
                        key=f"eval_ans_open:{shown}")
    with st.expander(f"Answers of {labels[int(pick)]}", expanded=not report):
        answers_report(past[int(pick)])


# ---------------------------------------------------------------------------- the page

kind = st.radio("Evaluate", [RETRIEVAL, ANSWERS, RATED], horizontal=True, key="eval_kind",
                help="Retrieval: does search find the gold lines. Answers: does the LLM state the facts and cite the "
                     "gold lines. Rated answers: the Chat's thumbs up and down.")
if kind == RATED:
    rated_answers_section()
    st.stop()
picked = pick_questions()
if picked is None:
    st.stop()
questions, questions_name = picked
only_indexed, n_scored = coverage(questions)
if kind == RETRIEVAL:
    retrieval_section(questions, questions_name, only_indexed)
else:
    answers_section(questions, questions_name, only_indexed, n_scored)
