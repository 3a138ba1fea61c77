"""Chat: streamed answers with citations, RAG on/off, RAG vs no-RAG side by side, saved conversations."""

from __future__ import annotations

import streamlit as st

from pages import _resources as resources
from core.llm import describe_llm
from kb.answer.chain import Answer, Answerer
from kb.conversations import ConversationStore
from kb.citations import link_markers, location
from kb.markdown import escape_markdown
from kb.search.hits import MODES, SearchOptions
from pages._common import expected_errors, kb_or_stop, settings_or_stop, show_error, when

st.title(":material/chat: Chat")
s = settings_or_stop()
kb = kb_or_stop(s)
store = ConversationStore(s.home)
if "chat_conv" not in st.session_state:
    st.session_state["chat_conv"] = store.new()
conv = st.session_state["chat_conv"]

with st.sidebar:
    st.subheader("Answering")
    rag = st.toggle("Answer from the knowledge base (RAG)", value=True, key="chat_rag")
    compare = st.toggle("Compare RAG and no-RAG side by side", value=False, key="chat_compare")
    k = st.slider("Sources per answer (k)", 1, 10, min(max(s.top_k, 1), 10), key="chat_k", disabled=not (rag or compare))
    mode = st.selectbox("Retrieval", MODES, index=MODES.index(s.retrieval_mode) if s.retrieval_mode in MODES else 2,
                        key="chat_mode", disabled=not (rag or compare))
    if st.button(":material/delete_sweep: Clear: new conversation", key="chat_clear", width="stretch",
                 help="start a new conversation; this one stays in the saved list"):
        st.session_state["chat_conv"] = conv = store.new()
        st.rerun()
    st.caption(f"LLM `{describe_llm(s)}`")


# ---------------------------------------------------------------------------- rendering


def render_sources(msg: dict) -> None:
    sources = msg.get("sources") or []
    if not msg.get("rag", True) or msg.get("error"):
        return
    if not sources:
        st.caption("No sources: nothing in the knowledge base passed the retrieval threshold.")
        return
    cited = set(msg.get("cited") or [])
    st.caption(f"Sources: {len(sources)} retrieved, {len(cited)} cited in the answer")
    for i, h in enumerate(sources, 1):
        loc = location(h["source"], h["path"], h["line_start"], h["line_end"], str(h.get("commit", "")))
        label = f"\\[{i}\\] {escape_markdown(loc)}" + (" · cited" if i in cited else "")
        with st.expander(label, icon=":material/task_alt:" if i in cited else ":material/article:"):
            if h.get("url"):
                st.markdown(f"[Permalink: {escape_markdown(h['path'])} lines {h['line_start']}–{h['line_end']} "
                            f"at {str(h.get('commit', ''))[:8]}]({h['url']})")
            if h.get("heading"):
                st.caption(escape_markdown(h["heading"]))
            st.code(h.get("text", ""), language="markdown", wrap_lines=True)
            ranks = " · ".join(f"{m} #{r}" for m, r in (h.get("ranks") or {}).items())
            st.caption(f"score {float(h.get('score', 0)):.4f} ({h.get('mode', '')}, higher is better)"
                       + (f" · found by {ranks}" if ranks else ""))


def render_answer(msg: dict) -> None:
    urls = [h.get("url", "") for h in msg.get("sources") or []]
    if msg.get("content"):
        st.markdown(link_markers(msg["content"], urls) if msg.get("rag", True) else msg["content"])
    if msg.get("error"):
        show_error(Exception(msg["error"]))
    render_sources(msg)
    facts = []
    if msg.get("standalone") and msg["standalone"].strip() != msg.get("question", "").strip():
        facts.append(f"searched for: {escape_markdown(msg['standalone'])}")
    if msg.get("first_token_seconds") is not None:
        facts.append(f"first token {msg['first_token_seconds']:.1f} s")
    if msg.get("seconds"):
        facts.append(f"{msg['seconds']:.1f} s in all")
    if facts:
        st.caption(" · ".join(facts))


def render_assistant(msg: dict) -> None:
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


# ---------------------------------------------------------------------------- answering


def stream_one(answerer: Answerer, question: str, history: list, use_rag: bool, opts: SearchOptions) -> dict:
    """Stream one answer into the page, then redraw it with linked markers and its sources.

    The model answers one question at a time; a question that must wait says how many are ahead of it.
    """
    result = Answer(question=question, answer="")
    msg: dict = {"role": "assistant", "question": question, "rag": use_rag, "mode": opts.mode}
    slot = st.empty()
    with slot.container():
        note = st.empty()
        ahead = getattr(answerer.llm, "queue_length", lambda: 0)()
        waiting = (f" {ahead} question{'s' if ahead != 1 else ''} ahead of yours: the model answers one at a "
                   "time." if ahead else "")
        note.caption((":material/search: Searching the knowledge base and reading the sources…" if use_rag
                      else ":material/psychology: Thinking…") + waiting)

        def pieces():
            first = True
            for piece in answerer.stream(question, history, rag=use_rag, options=opts, result=result):
                if first:
                    note.empty()
                    first = False
                yield piece

        try:
            st.write_stream(pieces())
        except expected_errors() as exc:
            msg["error"] = str(exc)
    msg.update(
        content=result.answer, sources=[h.as_dict() for h in result.sources], cited=result.cited,
        standalone=result.standalone_question, seconds=result.seconds, first_token_seconds=result.first_token_seconds,
    )
    with slot.container():
        render_answer(msg)
    return msg


def answer_turn(question: str, history: list) -> dict:
    opts = SearchOptions(k=k, mode=mode)
    try:
        engine = None
        if rag or compare:
            engine = resources.search_engine(s)
            resources.embeddings(s)  # load here, under a spinner: chain steps run in worker threads
        llm = resources.chat_model(s)
    except expected_errors() as exc:
        show_error(exc)
        return {"role": "assistant", "question": question, "content": "", "error": str(exc), "rag": rag}
    answerer = Answerer(llm, engine, opts)
    if compare:
        left, right = st.columns(2, gap="medium")
        with left:
            st.markdown("**With the knowledge base (RAG)**")
            msg = stream_one(answerer, question, history, True, opts)
        with right:
            st.markdown("**Model alone (no RAG)**")
            msg["plain"] = stream_one(answerer, question, history, False, opts)
        return msg
    return stream_one(answerer, question, history, rag, opts)


if not conv["messages"]:
    st.caption("Ask about the indexed documentation. Answers cite their sources as [n]; open a source below the "
               "answer to read the chunk, with its file, lines, commit and permalink.")
for m in conv["messages"]:
    with st.chat_message(m["role"]):
        if m["role"] == "user":
            st.markdown(m["content"])
        else:
            render_assistant(m)

question = st.chat_input("Ask about the documentation…", key="chat_input")
if question and question.strip():
    history = [(m["role"], m["content"]) for m in conv["messages"] if m.get("content") and not m.get("error")]
    conv["messages"].append({"role": "user", "content": question})
    with st.chat_message("user"):
        st.markdown(question)
    with st.chat_message("assistant"):
        conv["messages"].append(answer_turn(question, history))
    try:
        store.save(conv)
    except (OSError, expected_errors()) as exc:
        show_error(Exception(f"the conversation could not be saved: {exc}"))

# ---------------------------------------------------------------------------- saved conversations (after any save)

with st.sidebar:
    st.divider()
    st.subheader("Saved conversations")
    saved = store.list()
    if not saved:
        st.caption("None yet: a conversation is saved after each answer.")
    else:
        titles = {c["id"]: c for c in saved}
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
                st.rerun()
            except expected_errors() as exc:
                show_error(exc)
        if c2.button("Delete", key="chat_delete", width="stretch"):
            store.delete(pick)
            if conv.get("id") == pick:
                st.session_state["chat_conv"] = store.new()
            st.rerun()
