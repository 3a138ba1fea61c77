"""Documents (admin): browse each source's files, view one with its chunks, preview and apply a re-chunk.

Deep links: ``documents?source=S&path=P&lines=A-B&commit=C`` (``kb.citations.viewer_link``,
how the chat links each citation) opens that file with lines A..B highlighted
and scrolled into view. The URL follows the file on show, so a reload opens it
again; a link to an unknown source or file, or with malformed lines, says so
and leaves the page working. A link made at another commit than the one indexed
now highlights the cited lines where they stand now, or shows them as they were.
Without admin rights (an admin password is set and this session is not signed
in), a link shows only the cited lines, read-only: whoever may chat may check
what an answer cites.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from kb.ingest.chunking import SPLITTERS, UNITS
from kb.ingest.preview import annotated_lines, length_histogram, over_window, preview_chunks
from kb.markdown import code_span, escape_markdown
from kb.citations import file_url as web_file_url, parse_lines, relocate
from pages import _resources as resources
from pages._common import expected_errors, is_admin, kb_or_stop, require_admin, settings_or_stop, show_error
from pages._highlight import HIGHLIGHT, highlighted, scroll_to_highlight
from pages._jobs import ended_jobs, jobs_panel, track

MAX_VIEW_LINES = 1500
CITED_CONTEXT = 15  # lines shown around the cited ones in the read-only view
LINK = "_docs_link"  # (source, path, lines, commit) of the URL last applied or written: a new one is a link to open
# A link that names no document here: kept in the URL, with the file first shown, until another file is picked,
# so that a reload (or the link shared again) warns again instead of opening that unrelated file
BAD_LINK = "_docs_bad_link"
# A link made at another commit, as opened: (source, path, span shown). While that file and span are on show the URL
# stays the link's own, commit and all, so that a reload (or the address shared) says again which version it cites
OLD_LINK = "_docs_old_link"
SCROLL = "_docs_scroll"  # scroll the highlighted lines into view on this run (once per opened link)


def open_link(kb, names: list[str]) -> None:
    """Select the file a new URL names and remember its lines; warn (and open nothing) when it names none."""
    qp = st.query_params
    link = (qp.get("source", ""), qp.get("path", ""), qp.get("lines", ""), qp.get("commit", ""))
    if not any(link) or link == st.session_state.get(LINK):
        return
    st.session_state[LINK] = link
    st.session_state[BAD_LINK] = {"link": link, "shown": None}  # until it is found to name a document
    source, path, lines, commit = link
    shown = code_span(f"{source}/{path}")
    if not source or not path:
        st.warning("This link does not name a document: it needs a source and a path "
                   "(`documents?source=S&path=P&lines=A-B`).", icon=":material/link_off:")
        return
    if source not in names:
        st.warning(f"The link names the source {code_span(source)}, which this knowledge base does not have "
                   f"(sources: {escape_markdown(', '.join(names))}). Pick a document below.",
                   icon=":material/link_off:")
        return
    doc = kb.document(source, path)
    if doc is None:
        st.warning(f"The link names {shown}, which is not a document of {escape_markdown(source)} here: it may have "
                   "been renamed or deleted since. Pick a document below.", icon=":material/link_off:")
        return
    if doc.status != "indexed":
        st.warning(f"The link names {shown}, which is not indexed ({escape_markdown(doc.reason or doc.status)}).",
                   icon=":material/link_off:")
        return
    del st.session_state[BAD_LINK]
    span = parse_lines(lines) if lines else None
    if lines and span is None:
        st.warning(f"The link's lines {code_span(lines)} are not a line range like `3-9`: {shown} opens "
                   "without highlighted lines.", icon=":material/link_off:")
    stale = bool(span) and at_other_commit(doc, commit)
    span = cited_span(kb, doc, span, commit)
    st.session_state[OLD_LINK] = (source, path, span) if stale else None
    st.session_state["docs_source"] = source
    if st.session_state.get("docs_status") == "skipped":
        st.session_state["docs_status"] = "all"
    if st.session_state.get("docs_filter", "").strip().lower() not in path.lower():
        st.session_state["docs_filter"] = ""
    st.session_state["docs_open"] = f"{source}/{path}"
    st.session_state[HIGHLIGHT] = {"key": f"{source}/{path}", "lines": span} if span else None
    st.session_state[SCROLL] = bool(span)


def at_other_commit(doc, commit: str) -> bool:
    """Whether a link names a commit (a prefix of it) other than the one its document is indexed at now."""
    return bool(commit) and not doc.commit.startswith(commit)


def cited_span(kb, doc, span: tuple[int, int] | None, commit: str) -> tuple[int, int] | None:
    """The link's lines in the version indexed now, saying so when the link was made at another commit.

    An answer cited before a sync links lines of the old version: highlighted by their numbers alone, they were
    an empty line in the new one (a browser review). Found unchanged elsewhere, they are highlighted there;
    changed, they are shown as they were, and nothing is highlighted.
    """
    if not span or not at_other_commit(doc, commit):
        return span
    shown, then_at, now_at = code_span(f"{doc.source}/{doc.path}"), f"`{commit[:8]}`", f"`{doc.commit[:8]}`"
    then = kb.lines_at(doc.source, doc.path, commit)
    if then is None:
        st.warning(f"This link cites {shown} at commit {then_at}, which its clone doesn't hold: lines {span[0]}–"
                   f"{span[1]} are highlighted as numbered at {now_at}, and may not be the cited ones.",
                   icon=":material/history:")
        return span
    moved = relocate(then, span[0], span[1], kb.lines_at(doc.source, doc.path, doc.commit) or [])
    if moved is None:
        st.warning(f"This link cites {shown} at commit {then_at}; the file has changed since (indexed at {now_at}) "
                   f"and the cited lines are no longer in it. At {then_at}, lines {span[0]}–{span[1]} read:",
                   icon=":material/history:")
        st.code("\n".join(then[span[0] - 1:span[1]]), language=None, wrap_lines=True)
        return None
    where = "the same lines" if moved == span else f"lines {moved[0]}–{moved[1]}"
    st.info(f"This link cites {shown} at commit {then_at}; it is indexed at {now_at} now, where the cited lines "
            f"are {where} (highlighted).", icon=":material/history:")
    return moved


def cited_view(kb) -> None:
    """A link's cited lines, read-only, for a session without admin rights (the chat's users)."""
    qp = st.query_params
    source, path, commit = qp.get("source", ""), qp.get("path", ""), qp.get("commit", "")
    doc = kb.document(source, path) if source in {r.name for r in kb.sources()} else None
    if doc is None or doc.status != "indexed":
        st.warning(f"The link names {code_span(f'{source}/{path}')}, which is not an indexed document here.",
                   icon=":material/link_off:")
        return
    try:
        lines = kb.read_document(source, path).text.split("\n")
    except expected_errors() as exc:
        show_error(exc)
        return
    span = cited_span(kb, doc, parse_lines(qp.get("lines", "")), commit)
    st.subheader(escape_markdown(f"{source}/{path}"), anchor=False)
    st.caption(f"commit `{doc.commit[:12]}` · {len(lines)} lines · read-only: the lines an answer cites")
    if span is None or span[0] > len(lines):
        return
    a, b = span[0], min(span[1], len(lines))
    first, last = max(1, a - CITED_CONTEXT), min(len(lines), b + CITED_CONTEXT)
    highlighted([f"{i:>5} │ {lines[i - 1]}" for i in range(first, last + 1)], first, a, b)
    scroll_to_highlight()


def follow_in_url(source: str, path: str, span: tuple[int, int] | None) -> None:
    """Keep the URL in step with the file on show (and its highlighted lines), so a reload opens it again; a link
    that named no document, or lines of another commit, stays until another file or span is on show."""
    bad = st.session_state.get(BAD_LINK)
    if bad is not None:
        if bad["shown"] in (None, (source, path)):
            bad["shown"] = (source, path)
            return
        del st.session_state[BAD_LINK]
    if st.session_state.get(OLD_LINK) == (source, path, span):
        return  # still the old commit's lines as the link opened them: its own address keeps its note on a reload
    st.session_state[OLD_LINK] = None
    want = {"source": source, "path": path, **({"lines": f"{span[0]}-{span[1]}"} if span else {})}
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)
    st.session_state[LINK] = (source, path, want.get("lines", ""), "")  # lines of the version on show: no commit


def shared_histogram(series: dict[str, list[int]], window: int | None) -> list[dict]:
    """Chunk counts of each config on one set of bins, wide enough for the longest chunk of any of them."""
    bins = length_histogram([t for tokens in series.values() for t in tokens], window)
    return [dict(h, config=name, count=sum(1 for t in tokens if h["start"] <= t < h["end"]))
            for name, tokens in series.items() for h in bins]

st.title(":material/description: Documents")
if st.query_params.get("source") and not is_admin(settings_or_stop()):
    cited_view(kb_or_stop())
    st.divider()
s = require_admin()
kb = kb_or_stop(s)
rows = kb.sources()
if not rows:
    st.info("No sources yet: add one on the Sources page.")
    st.stop()
live_name, live_cfg = kb.live()
try:
    window = kb.model_window()
except expected_errors() as exc:
    show_error(exc)
    st.stop()
window_text = f"{window}-token window (text past it is never embedded)" if window else "input (it has no window: nothing is cut)"

# ---------------------------------------------------------------------------- browse

open_link(kb, [r.name for r in rows])
c1, c2, c3 = st.columns([1, 1, 2])
source = c1.selectbox("Source", ["All sources", *[r.name for r in rows]], key="docs_source")
status = c2.selectbox("Status", ["all", "indexed", "skipped"], key="docs_status")
needle = c3.text_input("Filter by path", placeholder="e.g. docs/zh_cn or .rst", key="docs_filter")
docs = kb.documents(None if source == "All sources" else source, None if status == "all" else status, needle)
st.dataframe(
    pd.DataFrame(
        [
            {"source": d.source, "path": d.path, "size": d.size, "language": d.language, "loader": d.loader,
             "chunks": d.chunks, "status": d.status, "reason": d.reason, "commit": d.commit[:8]}
            for d in docs
        ],
        columns=["source", "path", "size", "language", "loader", "chunks", "status", "reason", "commit"],
    ),
    hide_index=True,
    width="stretch",
    height=min(300, 35 * (len(docs) + 1) + 3),
    column_config={"size": st.column_config.NumberColumn("size (bytes)", format="%d")},
)
indexed = [d for d in docs if d.status == "indexed"]
st.caption(f"{len(docs)} file(s) shown, {len(indexed)} indexed.")
if not indexed:
    st.stop()

by_key = {f"{d.source}/{d.path}": d for d in indexed}
picked = st.selectbox(
    "Open a document", list(by_key), format_func=lambda k: f"{k}  ({by_key[k].chunks} chunks)", key="docs_open",
)
choice = by_key[picked]
try:
    doc = kb.read_document(choice.source, choice.path)
    chunks = kb.chunks_of(choice.source, choice.path)
except expected_errors() as exc:
    show_error(exc)
    st.stop()
src = kb.source(choice.source)
lines = doc.text.split("\n")
spans = [(c["line_start"], c["line_end"]) for c in chunks]

highlight = st.session_state.get(HIGHLIGHT)
span = highlight["lines"] if highlight and highlight["key"] == picked else None
if highlight and span is None:
    st.session_state[HIGHLIGHT] = None  # another file was picked: its highlight goes
if span and span[0] > len(lines):
    st.warning(f"The link's lines {span[0]}–{span[1]} are past the end of this file ({len(lines)} lines): it may "
               "have changed since the link was made.", icon=":material/link_off:")
    span = st.session_state[HIGHLIGHT] = None
elif span and span[1] > len(lines):
    span = (span[0], len(lines))
    st.session_state[HIGHLIGHT] = {"key": picked, "lines": span}
follow_in_url(choice.source, choice.path, span)

st.subheader(escape_markdown(f"{choice.source}/{choice.path}"), anchor=False)
m = st.columns(4)
m[0].metric("Lines", len(lines), border=True)
m[1].metric("Size", f"{doc.size:,} B", border=True)
m[2].metric("Chunks (live)", len(chunks), border=True)
m[3].metric("Over the window", sum(1 for c in chunks if over_window(int(c.get("n_tokens") or 0), window)), border=True,
            help=f"chunks longer than the embedding model's {window_text}")
file_url = web_file_url(src.web_url, choice.commit, choice.path)
st.caption(
    f"language **{doc.language}** · loader **{doc.loader}** · commit `{choice.commit[:12]}` · "
    f"sha256 `{doc.sha256[:16]}…` · collection `{live_name}` ({escape_markdown(live_cfg.label())})"
    + (f" · [open on the web]({file_url})" if file_url else "")
)

view_tab, chunks_tab, rendered_tab, rechunk_tab = st.tabs(
    ["Lines and chunks", "Chunks", "Rendered", "Re-chunk preview"]
)

with view_tab:
    first, last = 1, len(lines)
    if len(lines) > MAX_VIEW_LINES:
        if span and st.session_state.get(SCROLL):
            st.session_state["docs_first"] = max(1, span[0] - 20)  # open the window at the linked lines
        first = int(st.number_input("From line", 1, len(lines), step=100, key="docs_first"))
        last = min(len(lines), first + MAX_VIEW_LINES - 1)
        st.caption(f"Showing lines {first}–{last} of {len(lines)}.")
    st.caption("Gutter: line number in the file (as git counts them) │ chunk(s) covering the line (two numbers where "
               "chunks overlap; · none). Long lines wrap.")
    gutter = annotated_lines(doc.text, spans, first, last).split("\n")
    if span and first <= span[0] <= last:
        highlighted(gutter, first, span[0], min(span[1], last), clear=True)
        if st.session_state.pop(SCROLL, False):
            scroll_to_highlight()
    else:
        if span:
            st.caption(f"Lines {span[0]}–{span[1]} are outside the lines shown: start the view at line {span[0]}.")
        st.code("\n".join(gutter), language=None, wrap_lines=True)
    if chunks:
        chart_rows = [
            {"chunk": f"#{i} · {c['line_start']}–{c['line_end']}", "n": i, "start": c["line_start"],
             "end": c["line_end"] + 1, "tokens": int(c.get("n_tokens") or 0),
             "over window": over_window(int(c.get("n_tokens") or 0), window), "heading": c.get("heading", "")}
            for i, c in enumerate(chunks, 1)
        ]
        x = alt.X("start:Q", title="line", scale=alt.Scale(domain=[1, len(lines) + 1], nice=False),
                  axis=alt.Axis(format="d", tickMinStep=1, orient="top"))
        bars = (
            alt.Chart(pd.DataFrame(chart_rows))
            .mark_bar(cornerRadius=2)
            .encode(
                x=x, x2="end:Q",
                y=alt.Y("chunk:N", title=None, sort=alt.SortField("n"), axis=alt.Axis(labelLimit=220)),
                color=alt.Color("over window:N", scale=alt.Scale(domain=[False, True], range=["#4c78a8", "#e45756"]),
                                legend=alt.Legend(orient="top", title=f"over the {window_text}") if window else None),
                tooltip=["chunk", "start", "end", "tokens", "heading"],
            )
        )
        if span:  # the linked lines, as a band across every chunk's row
            band = (alt.Chart(pd.DataFrame([{"start": span[0], "end": span[1] + 1}]))
                    .mark_rect(color="#ffbd45", opacity=0.35).encode(x=x, x2="end:Q"))
            bars = band + bars
        chart = bars.properties(title="Chunks by line range, one row per chunk", height=alt.Step(20))
        with st.container(height=520 if len(chart_rows) > 22 else "content", border=False):
            st.altair_chart(chart, width="stretch")

with chunks_tab:
    if not chunks:
        st.caption("No chunks in the live collection for this document (sync the source).")
    else:
        st.dataframe(
            [
                {"#": i, "lines": f"{c['line_start']}-{c['line_end']}", "tokens": c.get("n_tokens"),
                 "heading": c.get("heading", ""), "id": c["id"], "permalink": c.get("url", "")}
                for i, c in enumerate(chunks, 1)
            ],
            hide_index=True,
            width="stretch",
            column_config={"permalink": st.column_config.LinkColumn("permalink", display_text="open")},
        )
        n = st.number_input("Show chunk", 1, len(chunks), 1, key="docs_chunk_n")
        c = chunks[int(n) - 1]
        st.markdown(f"**Chunk {int(n)}** · lines {c['line_start']}–{c['line_end']} · {c.get('n_tokens')} tokens"
                    + (f" · {escape_markdown(c['heading'])}" if c.get("heading") else ""))
        st.code(c["text"], language="markdown", wrap_lines=True)

with rendered_tab:
    st.caption("Rendered as Markdown. HTML in a document is shown as text, never run.")
    if choice.path.lower().endswith((".md", ".markdown")):
        st.markdown(doc.text)
    else:
        st.text(doc.text[:200_000])

# ---------------------------------------------------------------------------- re-chunk

with rechunk_tab:
    st.caption(f"Try another chunking on this document; lengths are measured in `{kb.embed_model}` tokens against its "
               f"{window_text}. The live collection uses {live_cfg.label()}.")
    c1, c2, c3, c4, c5 = st.columns([1.2, 1, 1, 1, 1.2])
    splitter = c1.selectbox("Splitter", SPLITTERS, index=SPLITTERS.index(live_cfg.splitter), key="rc_splitter")
    unit = c2.selectbox("Unit", UNITS, index=UNITS.index(live_cfg.unit), key="rc_unit")
    size = c3.number_input("Size", 20, 100_000, live_cfg.size, step=10, key="rc_size")
    overlap = c4.number_input("Overlap", 0, 100_000, live_cfg.overlap, step=10, key="rc_overlap")
    heading_prefix = c5.checkbox("Prefix heading path", value=live_cfg.heading_prefix, key="rc_heading",
                                 help="embed each chunk with its Markdown heading path in front")
    try:
        config = kb.rechunk_config(splitter=splitter, size=int(size), overlap=int(overlap), unit=unit,
                                   heading_prefix=heading_prefix)
        with st.spinner("Splitting and counting tokens…"):
            common = dict(source=choice.source, commit=choice.commit, web_url=src.web_url, embed_model=kb.embed_model)
            cand = preview_chunks(doc, config, s, **common)
            live = preview_chunks(doc, live_cfg, s, **common)
    except expected_errors() as exc:
        show_error(exc)
        st.stop()
    a, b = cand.summary(), live.summary()
    m = st.columns(5)
    m[0].metric("Chunks", a["chunks"], delta=a["chunks"] - b["chunks"], delta_color="off")
    m[1].metric("Over the window", a["over_window"], delta=a["over_window"] - b["over_window"], delta_color="inverse")
    m[2].metric("Tokens never embedded", a["tokens_lost"], delta=a["tokens_lost"] - b["tokens_lost"],
                delta_color="inverse")
    m[3].metric("Median tokens", a["median_tokens"])
    m[4].metric("Max tokens", a["max_tokens"])
    hist = shared_histogram({f"candidate: {config.label()}": cand.tokens, f"live: {live_cfg.label()}": live.tokens},
                            window)
    if hist:
        data = pd.DataFrame(hist)
        top = max(h["end"] for h in hist)  # both configs' longest chunk is on the axis
        bars = (
            alt.Chart(data)
            .mark_bar(opacity=0.6, binSpacing=0)
            .encode(
                x=alt.X("start:Q", title="chunk length (tokens)", bin="binned",
                        scale=alt.Scale(domain=[0, top], nice=False)),
                x2="end:Q",
                y=alt.Y("count:Q", title="chunks", stack=None),
                color=alt.Color("config:N", legend=alt.Legend(orient="top", title=None, labelLimit=500)),
                tooltip=["config", "label", "count"],
            )
        )
        if window:
            rule = alt.Chart(pd.DataFrame({"x": [window]})).mark_rule(color="#e45756", strokeDash=[6, 3], size=2).encode(x="x:Q")
            text = (
                alt.Chart(pd.DataFrame({"x": [window], "t": [f"window {window}"]}))
                .mark_text(align="left", dx=4, dy=-6, color="#e45756")
                .encode(x="x:Q", y=alt.value(8), text="t:N")
            )
            bars = bars + rule + text
        st.altair_chart(bars.properties(height=260, title="Distribution of chunk lengths"), width="stretch")
    st.dataframe(
        cand.rows(), hide_index=True, width="stretch",
        column_config={"over window": st.column_config.CheckboxColumn("over window")},
    )

    st.divider()
    n_src = sum(1 for r in rows if r.indexed_commit)
    n_docs = len(kb.documents(status="indexed"))
    st.markdown(f"#### Apply {escape_markdown(config.label())} to the whole knowledge base")
    st.caption(f"Builds a new collection beside the live one from the {n_docs} documents of {n_src} source(s) at "
               "their indexed commits, embeds what isn't stored yet, and switches the live collection only when it "
               "is complete. The old collection stays (see Collections) until you delete it.")
    queue = resources.job_queue(s)
    same = kb.is_live(config)  # the job would only fail, and count as a failed job on Home
    if same:
        st.caption("These are the live collection's settings: change one above to build another collection.")
    if st.button("Re-chunk the whole knowledge base", type="primary", key="rc_apply", disabled=same):
        try:  # a job in the server's worker: it goes on if the admin leaves this page
            track(queue.submit_rechunk(config), "rc")
        except expected_errors() as exc:
            show_error(exc)
    for rec, prefix in ended_jobs(queue):
        if prefix == "rc" and rec["state"] == "done" and rec.get("report"):
            st.session_state["rechunk_result"] = rec["report"]
        elif prefix == "rc" and rec.get("error"):
            show_error(Exception(f"re-chunk {rec['state']}: {rec['error']}"))
    jobs_panel(queue, recent=3)
    done = st.session_state.get("rechunk_result")
    if done:
        st.success(
            f"Live collection is now `{done['collection']}` ({escape_markdown(done['chunk_config'])}): {done['chunks']} "
            f"chunks, {done['chunks_embedded']} embedded, {done['chunks_overlong']} over the window, "
            f"{done['seconds']} s. Previous: `{done['previous']}`."
        )
