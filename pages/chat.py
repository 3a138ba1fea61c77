"""Chat: streamed answers tied sentence by sentence to their lines, RAG on/off, side by side, saved conversations.

The page shows the stages as they happen (the model loading, the search, the
sources, then the answer), keeps the conversation's id in the URL so a reload
reopens it, stops a generation on request, and asks for a verdict on each answer.
"""

from __future__ import annotations

import time

import streamlit as st

from pages import _resources as resources
from core.llm import describe_llm
from core.settings import TRANSLATE_MODES
from kb import log as kb_log
from kb.answer.chain import MAX_QUESTION_CHARS, Answer, Answerer
from kb.answer.render import answer_markdown, support_summary
from kb.citations import hit_link, location
from kb.conversations import ConversationStore, answer_fields, chat_history, rating
from kb.markdown import escape_markdown, no_images, plain_message, safe_url, streamed_without_images
from kb.search.hits import MODES, SearchOptions
from pages._common import expected_errors, kb_or_stop, rerun_requested, settings_or_stop, show_error, when

TRANSLATE_LABELS = {"off": "Off", "auto": "When BM25 and dense disagree", "always": "Always"}
PARTIAL = "chat_partial"  # an answer being streamed; kept if the user stops it (the script run is cut short)

st.title(":material/chat: Chat")
s = settings_or_stop()
kb = kb_or_stop(s)
store = ConversationStore(s.home)


def open_from_url() -> None:
    """A reload (or a shared link) reopens the conversation named by ``?c=`` in the URL."""
    wanted = st.query_params.get("c")
    current = st.session_state.get("chat_conv")
    if wanted and (current is None or current["id"] != wanted):
        try:
            st.session_state["chat_conv"] = store.load(wanted)
        except expected_errors() as exc:
            st.warning(f"{plain_message(str(exc))}: starting a new conversation.", icon=":material/link_off:")
            del st.query_params["c"]
    if "chat_conv" not in st.session_state:
        st.session_state["chat_conv"] = store.new()


def save(conv: dict) -> None:
    try:
        store.save(conv)
        st.query_params["c"] = conv["id"]
    except expected_errors() as exc:
        show_error(exc)


def keep_stopped(conv: dict) -> None:
    """An answer cut short by Stop (or by leaving) is kept, marked as stopped, in its conversation."""
    partial = st.session_state.pop(PARTIAL, None)
    if not partial or partial["conv"] != conv["id"]:
        return
    msg = partial["msg"]
    msg.update(content=partial["text"].strip(), stopped=True)
    conv["messages"].append(msg)
    save(conv)


open_from_url()
conv = st.session_state["chat_conv"]
keep_stopped(conv)

with st.sidebar:
    st.subheader("Answering")
    rag = st.toggle("Answer from the knowledge base (RAG)", value=True, key="chat_rag")
    compare = st.toggle("Compare RAG and no-RAG side by side", value=False, key="chat_compare")
    k = st.slider("Sources per answer (k)", 1, 10, min(max(s.top_k, 1), 10), key="chat_k", disabled=not (rag or compare))
    mode = st.selectbox("Retrieval", MODES, index=MODES.index(s.retrieval_mode) if s.retrieval_mode in MODES else 2,
                        key="chat_mode", disabled=not (rag or compare))
    translate = st.selectbox("Also search in the other language", TRANSLATE_MODES,
                             index=TRANSLATE_MODES.index(s.translate_questions), key="chat_translate",
                             format_func=TRANSLATE_LABELS.get, disabled=not (rag or compare) or mode != "hybrid",
                             help="the model first translates the question (Chinese ↔ English) and hybrid search "
                                  "looks for both: finds pages written only in the other language, for a few seconds "
                                  "more before the first word. \"When BM25 and dense disagree\": only when their "
                                  "first five hits share nothing, as they do when the answer is in the other language")
    if st.button(":material/delete_sweep: Clear: new conversation", key="chat_clear", width="stretch",
                 help="start a new conversation; this one stays in the saved list"):
        st.session_state["chat_conv"] = conv = store.new()
        st.query_params.pop("c", None)
        st.rerun()
    st.caption(f"LLM `{describe_llm(s)}`")


# ---------------------------------------------------------------------------- rendering

ASK_AGAIN = "_chat_ask_again"  # a question to ask once more, as if typed: set by the button under an unanswered one


def unanswered(messages: list[dict], i: int) -> None:
    """Say so under a question that has no answer after it, with a button that asks it again.

    A reload while an answer streamed, or a second question sent before the first's first word, left the question
    bare in the conversation and in its saved copy, with nothing to say what had happened (a browser review).
    """
    if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
        return
    st.caption(":material/block: Not answered: interrupted (a reload, or another question sent while it was being "
               "answered), or still being answered in another tab.")
    if st.button("Ask again", key=f"chat_again_{i}", icon=":material/replay:"):
        st.session_state[ASK_AGAIN] = messages[i]["content"]
        st.rerun()


def render_sources(msg: dict) -> None:
    sources = msg.get("sources") or []
    if not msg.get("rag", True) or msg.get("error"):
        return
    if not sources:
        st.caption("Stopped before its sources were found." if msg.get("stopped") and "sources" not in msg
                   else "No sources: nothing in the knowledge base passed the retrieval threshold.")
        return
    cited = set(msg.get("cited") or [])
    st.caption(f"Sources: {len(sources)} read by the model, {len(cited)} cited in the answer")
    for i, h in enumerate(sources, 1):
        loc = location(h["source"], h["path"], h["line_start"], h["line_end"], str(h.get("commit", "")))
        label = f"\\[{i}\\] {escape_markdown(loc)}" + (" · cited" if i in cited else "")
        with st.expander(label, icon=":material/task_alt:" if i in cited else ":material/article:"):
            links = [f"[Open in Documents, lines {h['line_start']}–{h['line_end']} highlighted]"
                     f"({safe_url(hit_link(h))})"]
            if h.get("url"):
                links.append(f"[permalink at {str(h.get('commit', ''))[:8]}]({safe_url(h['url'])})")
            st.markdown(" · ".join(links))
            if h.get("heading"):
                st.caption(escape_markdown(h["heading"]))
            st.code(h.get("text", ""), language="markdown", wrap_lines=True, line_numbers=False)
            ranks = " · ".join(f"{m} #{r}" for m, r in (h.get("ranks") or {}).items())
            st.caption(f"score {float(h.get('score', 0)):.4f} ({h.get('mode', '')}, higher is better)"
                       + (f" · found by {ranks}" if ranks else ""))


def render_answer(msg: dict) -> None:
    if not msg.get("rag", True):
        st.caption(":material/psychology: Model alone, without the knowledge base: nothing here is checked "
                   "against the sources.")
    if msg.get("content"):
        st.markdown(answer_markdown(msg) if msg.get("rag", True) else no_images(msg["content"]))
    if msg.get("unverified"):
        with st.expander("What the model wrote, none of which was found in the sources", icon=":material/help:"):
            st.caption("Not given as the answer: no sentence of it matches the lines it was shown.")
            st.markdown(escape_markdown(msg["unverified"]))
    if msg.get("stopped"):
        st.caption(":material/stop_circle: Stopped before the end.")
    if msg.get("error"):
        show_error(Exception(msg["error"]))
    render_sources(msg)
    facts = []
    if msg.get("standalone") and msg["standalone"].strip() != msg.get("question", "").strip():
        facts.append(f"searched for: {escape_markdown(msg['standalone'])}")
    if msg.get("also_as"):
        facts.append(f"also searched as: {escape_markdown(msg['also_as'])}")
    facts += support_summary([x for x in msg.get("sentences") or [] if x.get("claim")], msg.get("content") or "")
    if msg.get("first_token_seconds") is not None:
        facts.append(f"first word {msg['first_token_seconds']:.1f} s after asking"
                     + (f" ({msg['waited_seconds']:.1f} s of it loading the model)" if msg.get("waited_seconds") else ""))
    if msg.get("seconds"):
        facts.append(f"{msg['seconds']:.1f} s in all")
    if facts:
        st.caption(" · ".join(facts))


def render_feedback(msg: dict, index: int) -> None:
    """Thumbs and an optional comment, saved with the conversation (and logged)."""
    if msg.get("error") or not msg.get("content"):
        return
    key = f"chat_fb_{conv['id']}_{index}"
    saved = msg.get("feedback") or {}

    def changed() -> None:
        score = st.session_state.get(key)
        comment = st.session_state.get(key + "_comment", saved.get("comment", ""))
        msg["feedback"] = rating(score, comment)
        save(conv)
        if msg.get("log_id"):
            kb_log.log_feedback(s, msg["log_id"], msg["feedback"])

    cols = st.columns([1, 5], vertical_alignment="center")
    with cols[0]:
        st.feedback("thumbs", key=key, default=saved.get("score"), on_change=changed)
    if saved.get("score") is not None:
        cols[1].text_input("Comment (optional)", value=saved.get("comment", ""), key=key + "_comment",
                           on_change=changed, label_visibility="collapsed",
                           placeholder="What was wrong or right? (optional, saved with the answer)")


def render_assistant(msg: dict, index: int) -> None:
    if msg.get("plain") is not None:
        left, right = st.columns(2, gap="medium")
        with left:
            st.markdown("**With the knowledge base (RAG)**")
            render_answer(msg)
        with right:
            st.markdown("**Model alone (no RAG)**")
            render_answer(msg["plain"])
    else:
        render_answer(msg)
    render_feedback(msg, index)


# ---------------------------------------------------------------------------- answering


def stage_reporter(status, result: Answer, use_rag: bool, msg: dict):
    """``Answerer.stream``'s ``on_stage``: the status box says what is happening, and lists the sources at once.

    The sources also go into the message as soon as they are found, so that an answer stopped while the model
    writes keeps the sources it was written from (``keep_stopped``).
    """

    def on_stage(stage: str, res: Answer) -> None:
        if stage == "rewriting":
            status.update(label="Rewriting the follow-up as a standalone question…")
        elif stage == "searching":
            if res.standalone_question and res.standalone_question != res.question:
                status.write(f"Searching for: *{escape_markdown(res.standalone_question)}*")
            status.update(label="Searching the knowledge base…")
        elif stage == "translated":
            status.write(f"Also searching as: *{escape_markdown(res.also_as)}*")
        elif stage == "sources":
            msg.update(sources=[h.as_dict() for h in res.sources], standalone=res.standalone_question,
                       also_as=res.also_as)
            for i, h in enumerate(res.sources, 1):
                status.markdown(f"\\[{i}\\] {escape_markdown(h.citation)}")
            status.update(label=f"Found {len(res.sources)} sources · writing the answer…" if res.sources
                          else "Nothing relevant found")
        elif stage == "answering" and not use_rag:
            status.update(label="Writing the answer (model alone)…")

    return on_stage


def stream_one(answerer: Answerer, question: str, history: list, use_rag: bool, opts: SearchOptions,
               asked_at: float, waited: float) -> dict:
    """Stream one answer into the page, then redraw it with its sentences' citations and its sources.

    The model answers one question at a time; a question that must wait says how many are ahead of it.
    """
    result = Answer(question=question, answer="")
    msg: dict = {"role": "assistant", "question": question, "rag": use_rag, "mode": opts.mode}
    lag = time.perf_counter() - asked_at  # the user's wait before the answer could start (loading included)
    slot = st.empty()
    with slot.container():
        ahead = getattr(answerer.llm, "queue_length", lambda: 0)()
        status = st.status("Searching the knowledge base…" if use_rag else "Thinking…", expanded=True)
        if ahead:
            status.write(f"{ahead} question{'s' if ahead != 1 else ''} ahead of yours: the model answers one at a time.")
        stop_slot = st.empty()
        stop_slot.button("Stop", icon=":material/stop:", key=f"chat_stop_{len(conv['messages'])}_{use_rag}",
                         help="end the answer here; what was written so far is kept")
        partial = st.session_state[PARTIAL] = {"conv": conv["id"], "msg": msg, "text": ""}
        stopped = rerun_requested()  # read by the model while it reads the prompt, before any st call could end it

        def pieces():
            for piece in answerer.stream(question, history, rag=use_rag, options=opts, result=result,
                                         on_stage=stage_reporter(status, result, use_rag, msg), stop_requested=stopped):
                partial["text"] += piece
                yield piece

        try:
            st.write_stream(streamed_without_images(pieces()))
            status.update(label="Answered", state="complete", expanded=False)
        except expected_errors() as exc:
            msg["error"] = str(exc)
            status.update(label="Failed", state="error")
        stop_slot.empty()
    st.session_state.pop(PARTIAL, None)
    first = None if result.first_token_seconds is None else round(result.first_token_seconds + lag, 3)
    msg.update(answer_fields(result, seconds=time.perf_counter() - asked_at, first_token_seconds=first,
                             waited_seconds=waited))
    msg["log_id"] = kb_log.log_answer(s, msg)
    with slot.container():
        render_answer(msg)
    return msg


def load_model(asked_at: float):
    """The shared LLM; it starts loading when the server does, so a first question usually finds it ready."""
    if resources.loaded(s)["llm"]:
        return resources.chat_model(s), 0.0
    with st.spinner("Loading the language model (once per server)…", show_time=True):
        llm = resources.chat_model(s, spinner=False)
    return llm, time.perf_counter() - asked_at


def answer_turn(question: str, history: list) -> dict:
    opts = SearchOptions(k=k, mode=mode)
    asked_at = time.perf_counter()
    try:
        engine = None
        if rag or compare:
            engine = resources.search_engine(s)
            resources.embeddings(s)  # load here, under a spinner: chain steps run in worker threads
        llm, waited = load_model(asked_at)
    except expected_errors() as exc:
        show_error(exc)
        return {"role": "assistant", "question": question, "content": "", "error": str(exc), "rag": rag}
    answerer = Answerer(llm, engine, opts, translate=translate if mode == "hybrid" else "off")
    if compare:
        left, right = st.columns(2, gap="medium")
        with left:
            st.markdown("**With the knowledge base (RAG)**")
            msg = stream_one(answerer, question, history, True, opts, asked_at, waited)
        with right:
            st.markdown("**Model alone (no RAG)**")
            msg["plain"] = stream_one(answerer, question, history, False, opts, time.perf_counter(), 0.0)
        return msg
    return stream_one(answerer, question, history, rag, opts, asked_at, waited)


# ---------------------------------------------------------------------------- saved conversations


def saved_conversations() -> None:
    """The sidebar's saved conversations, drawn once per run after the question is saved: drawn at the end of the
    run, the list went on showing the last run's while an answer streamed, without the question just asked (a browser
    review)."""
    with st.sidebar:
        st.divider()
        st.subheader("Saved conversations")
        saved_list = store.list()
        if not saved_list:
            st.caption("None yet: a conversation is saved as each question is asked.")
        else:
            titles = {c["id"]: c for c in saved_list}
            ids = list(titles)
            pick = st.selectbox(
                "Conversation", ids, index=ids.index(conv["id"]) if conv["id"] in titles else 0,
                key=f"chat_saved_{len(ids)}_{ids[0]}",  # a new save re-selects the newest (or the current) one
                format_func=lambda i: f"{titles[i]['title']} · {titles[i]['turns']} q · {when(titles[i]['updated'])}",
            )
            c1, c2 = st.columns(2)
            if c1.button("Open", key="chat_open", width="stretch"):
                try:
                    st.session_state["chat_conv"] = store.load(pick)
                    st.query_params["c"] = pick
                    st.rerun()
                except expected_errors() as exc:
                    show_error(exc)
            if c2.button("Delete", key="chat_delete", width="stretch"):
                try:
                    store.delete(pick)
                except expected_errors() as exc:
                    show_error(exc)
                else:
                    if conv.get("id") == pick:
                        st.session_state["chat_conv"] = store.new()
                        st.query_params.pop("c", None)
                    st.rerun()


# one slot whether or not there is an intro, so every message keeps its place in the page between reruns: Streamlit
# greys out and keeps the last run's elements until they are redrawn, so a shift left the previous answer's thumbs
# and sources greyed under the user's follow-up while it was being answered
intro = st.empty()
if not conv["messages"]:
    intro.caption("Ask about the indexed documentation. Each sentence of an answer links to the lines that support it "
                  "(or says it found none); open a source below the answer to read it, with file, lines and commit.")
for i, m in enumerate(conv["messages"]):
    with st.chat_message(m["role"]):
        if m["role"] == "user":
            st.markdown(escape_markdown(m["content"]))  # as typed: a shared conversation's link carries no markup
            unanswered(conv["messages"], i)
        else:
            render_assistant(m, i)

question = st.chat_input("Ask about the documentation…", key="chat_input", max_chars=MAX_QUESTION_CHARS) or st.session_state.pop(ASK_AGAIN, None)
if question and question.strip():
    history = chat_history(conv["messages"])
    conv["messages"].append({"role": "user", "content": question})
    save(conv)  # before the answer: a reload while it streams keeps the question (``?c=`` is set now; a review lost it)
    saved_conversations()
    with st.chat_message("user"):
        st.markdown(escape_markdown(question))
    with st.chat_message("assistant"):
        msg = answer_turn(question, history)
        conv["messages"].append(msg)
        render_feedback(msg, len(conv["messages"]) - 1)
    save(conv)
else:
    saved_conversations()
