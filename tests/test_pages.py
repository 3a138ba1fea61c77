"""The dashboard pages through streamlit.testing (AppTest), plus the plain helpers behind them.

Every page must render without an exception and its main interaction must
really work: add and sync a bundle, upload and delete, view a document,
preview and apply a re-chunk, inspect a collection, search, ask, evaluate.
Models: the tiny sentence-transformers model for indexing, the real default
model and LLM (loaded once per session) for search and chat.
"""

from __future__ import annotations

import time

import json

import pytest

from kb.ingest.chunking import ChunkConfig
from kb.conversations import ConversationStore, title_of
from kb.errors import KBError
from kb.citations import link_markers
from kb.ingest.preview import annotated_lines, length_histogram, line_cover, preview_chunks
from kb.markdown import code_span, escape_markdown, mark_terms, snippet
from page_helpers import finish_jobs, frame_with, ok, texts


EVIL_DOC = (
    b"# Notes\n\nSome *text* about xtuner.\n\n<script>window.__pwned = 1; alert('x')</script>\n\n"
    b"<img src=x onerror=\"window.__pwned = 2\">\n\n:red[directive] and [link](javascript:alert(1))\n"
)


# ---------------------------------------------------------------------------- plain helpers


def test_code_span_shows_the_text_as_written():
    """Inside a code span a backslash escape would show ("xtuner/README\\.md"): the text is fenced instead."""
    assert code_span("xtuner/README.md") == "`xtuner/README.md`"
    assert code_span("a `b` c") == "``a `b` c``"
    assert code_span("`x``") == "``` `x`` ```"
    assert code_span("two\nlines") == "`two lines`" and code_span("") == "`  `"


def test_escape_and_mark_terms_are_inert():
    raw = "<script>alert(1)</script> **bold** [x](javascript:1) :red[hi] $x$ & a_b"
    esc = escape_markdown(raw)
    for ch in "<>*[]()$&_:":
        assert f"\\{ch}" in esc
    assert "<script>" not in esc and "**" not in esc
    marked = mark_terms("XTuner 是一个微调工具，xtuner supports QLoRA [1].", ["xtuner", "微调"])
    assert marked.count(":orange-background[") == 3
    assert ":orange-background[XTuner]" in marked and ":orange-background[微调]" in marked
    assert "\\[1\\]" in marked
    assert mark_terms("a<b", []) == "a\\<b"


def test_snippet_centres_on_a_term():
    text = "intro " * 200 + "the QLoRA recipe " + "outro " * 200
    s = snippet(text, ["qlora"], width=120)
    assert "QLoRA" in s and s.startswith("…") and s.endswith("…") and len(s) <= 122
    assert snippet("short\n\ntext", ["x"]) == "short text"


def test_link_markers():
    urls = ["https://h/a#L1-L2", "", "https://h/c(1)"]
    out = link_markers("A [1], B【2】, C [1, 3], D [9].", urls)
    assert "[\\[1\\]](https://h/a#L1-L2)" in out
    assert "**\\[2\\]**" in out
    assert "(https://h/c%281%29)" in out and "[9]" in out


def test_line_cover_and_gutter():
    cover = line_cover(5, [(1, 3), (3, 5)])
    assert cover == [[1], [1], [1, 2], [2], [2]]
    text = "a\nb\nc\nd\ne"
    view = annotated_lines(text, [(1, 3), (3, 5)])
    lines = view.split("\n")
    assert lines[2].startswith("3 │ 1,2 │ c") and lines[0].startswith("1 │ 1   │ a")
    assert annotated_lines(text, [(2, 2)], first=2, last=3).split("\n") == ["2 │ 1 │ b", "3 │ · │ c"]


def test_length_histogram_has_the_window_as_an_edge():
    hist = length_histogram([10, 100, 250, 300, 300], window=256)
    assert sum(h["count"] for h in hist) == 5
    assert any(h["start"] == 256 for h in hist)
    assert all(h["over"] == (h["start"] >= 256) for h in hist)
    assert length_histogram([], 256) == []
    # a model without a window (the default USE) cuts nothing
    assert not any(h["over"] for h in length_histogram([10, 100, 5000], window=None))


def test_preview_chunks_measures_tokens(tiny_kb, corpus):
    from kb.ingest.loaders import load_document

    text = ("XTuner 是一个高效、灵活、全能的轻量化大模型微调工具库。" * 40 + "\n\n") * 3
    doc = load_document("README_zh-CN.md", ("# XTuner\n\n" + text).encode(), 10**6)
    s = tiny_kb.settings
    big = preview_chunks(doc, ChunkConfig(size=1500, overlap=0), s)
    small = preview_chunks(doc, ChunkConfig(size=120, overlap=20, unit="tokens"), s)
    from core.embeddings import max_tokens

    assert big.window == max_tokens(s) and big.over_window >= 1 and big.tokens_lost > 0
    assert small.over_window == 0 and len(small.chunks) > len(big.chunks)
    assert all(c.line_start >= 1 for c in small.chunks)
    assert small.summary()["chunks"] == len(small.rows())
    no_window = preview_chunks(doc, ChunkConfig(size=1500, overlap=0), s.with_(embed_model="", embed_backend=""))
    assert no_window.window is None and no_window.over_window == 0 and no_window.tokens_lost == 0


def test_conversation_store(tmp_path):
    store = ConversationStore(tmp_path)
    assert store.list() == []
    conv = store.new()
    conv["messages"] += [{"role": "user", "content": "xtuner是什么？" * 10},
                         {"role": "assistant", "content": "XTuner 是微调工具 [1]", "sources": [{"path": "README.md"}]}]
    path = store.save(conv)
    assert path.parent == tmp_path / "conversations" and json.loads(path.read_text())["messages"][1]["sources"]
    listed = store.list()
    assert [c["id"] for c in listed] == [conv["id"]] and listed[0]["turns"] == 1
    assert listed[0]["title"].startswith("xtuner是什么？") and len(listed[0]["title"]) <= 60
    again = store.load(conv["id"])
    assert again["messages"] == conv["messages"]
    for bad in ("../../etc/passwd", "x", conv["id"] + "/.."):
        with pytest.raises(KBError):
            store.load(bad)
    (tmp_path / "conversations" / "20250101-000000-abcdef.json").write_text("{not json")
    assert [c["id"] for c in store.list()] == [conv["id"]]  # a broken file is skipped
    store.delete(conv["id"])
    assert store.list() == [] and title_of([]) == "(empty)"


def test_a_conversation_the_disk_refuses_is_one_error_and_the_saved_copy_stays(tmp_path):
    """The chat's Delete let an OSError through as a traceback; its save caught OSError itself, in the page."""
    store = ConversationStore(tmp_path)
    conv = store.new()
    conv["messages"].append({"role": "user", "content": "xtuner是什么？"})
    path = store.save(conv)
    kept = path.read_text()
    blocked = store.new()
    (tmp_path / "conversations" / f"{blocked['id']}.json").mkdir()  # what unlink can't remove, nor replace overwrite
    with pytest.raises(KBError, match=f"conversation {blocked['id']} could not be deleted"):
        store.delete(blocked["id"])
    with pytest.raises(KBError, match="the conversation could not be saved"):
        store.save(blocked)
    path.rename(tmp_path / "kept.json")
    (tmp_path / "conversations").rename(tmp_path / "gone")
    (tmp_path / "conversations").write_text("a file where the folder was")
    conv["messages"].append({"role": "user", "content": "lost?"})
    with pytest.raises(KBError, match="the conversation could not be saved"):
        store.save(conv)
    assert (tmp_path / "kept.json").read_text() == kept and not list((tmp_path / "gone").glob("*.tmp"))


def test_admin_password_check():
    from core import auth
    from core.settings import Settings

    open_ = Settings(admin_password="")
    locked = Settings(admin_password="s3cret")
    assert not auth.admin_locked(open_) and auth.admin_locked(locked)
    assert auth.password_ok(locked, "s3cret") and not auth.password_ok(locked, "s3cret ")
    assert not auth.password_ok(open_, "") and not auth.token_ok(open_, "anything")
    token = auth.sign_in(locked, "s3cret")
    assert token and auth.token_ok(locked, token) and "s3cret" not in token
    assert not auth.token_ok(Settings(admin_password="changed"), token)
    assert auth.sign_in(locked, "nope") is None
    # a sign-in lasts admin_session; a forged time or a token of the old format is no token at all
    old = auth.session_token(locked, issued=int(time.time()) - 13 * 3600)
    assert auth.token_state(locked, old) == "expired" and not auth.token_ok(locked, old)
    assert auth.token_ok(Settings(admin_password="s3cret", admin_session=0), old)  # 0: no limit
    assert auth.token_state(locked, str(int(time.time())) + "." + old.split(".")[1]) == "none"
    assert auth.token_state(locked, old.split(".")[1]) == "none"


# ---------------------------------------------------------------------------- pages on an empty knowledge base


@pytest.mark.parametrize("page", [None, "chat", "retrieval_lab", "sources", "documents", "collections", "evaluation"])
def test_every_page_renders_empty(page_env, open_page, page):
    at = ok(open_page(page))
    assert at.title, "every page has a title"
    if page in ("sources", "documents", "collections", "evaluation"):
        assert "no admin password is set" in texts(at.warning)


def test_admin_lock(page_env, open_page, monkeypatch):
    monkeypatch.setenv("KB_ADMIN_PASSWORD", "s3cret")
    at = ok(open_page("sources"))
    assert "Admin sign-in" in texts(at.subheader) and not at.tabs
    at.text_input[0].input("wrong")
    at.form_submit_button[0].click().run()
    assert "Wrong password." in texts(at.error) and not at.tabs
    at.text_input[0].input("s3cret")
    at.form_submit_button[0].click().run()
    ok(at)
    assert at.tabs and "Admin sign-in" not in texts(at.subheader)
    at.switch_page("pages/collections.py").run()  # the session stays signed in
    assert "Admin sign-in" not in texts(at.subheader)
    chat = ok(open_page("chat"))  # Chat and Retrieval lab are open
    assert "Admin sign-in" not in texts(chat.subheader) and chat.chat_input
    # a sign-in lasts KB_ADMIN_SESSION (12 h): a tab left open since yesterday is asked again
    from core import auth
    from core.settings import load_settings

    at.session_state["_admin_token"] = auth.session_token(load_settings(), issued=int(time.time()) - 13 * 3600)
    at.switch_page("pages/sources.py").run()
    assert "Admin sign-in" in texts(at.subheader) and not at.tabs
    assert "expired after 12 h" in texts(at.info)
    at.text_input[0].input("s3cret")
    at.form_submit_button[0].click().run()
    assert ok(at).tabs


# ---------------------------------------------------------------------------- Sources


def test_sources_add_bundle_dry_run_then_sync(page_env, corpus, open_page, shared_kb):
    at = ok(open_page("sources"))
    at.text_input(key="add_name").input("lagent")
    at.text_input(key="add_url").input(str(corpus / "lagent.bundle"))
    at.text_input(key="add_web").input("https://gitee.com/InternLM/lagent")
    at.checkbox(key="add_sync").uncheck()
    at.button(key="add_btn").click().run()
    ok(at)
    assert not at.error, texts(at.error)
    assert "Added **lagent**" in texts(at.success)

    at.selectbox(key="sync_target").select("lagent")
    at.button(key="sync_preview_btn").click().run()
    ok(at)
    preview = frame_with(at, "chunks to embed")
    assert preview.loc[0, "source"] == "lagent" and preview.loc[0, "files +"] > 0 and preview.loc[0, "chunks to embed"] > 0
    assert shared_kb().stats()["chunks"] == 0, "a dry run writes nothing"
    assert any(s.label.startswith("Dry run: done") for s in at.status)

    at.button(key="sync_apply_btn").click().run()
    finish_jobs(at)
    ok(at)
    done = frame_with(at, "chunks embedded")
    assert done.loc[0, "chunks embedded"] == preview.loc[0, "chunks to embed"] and not done.loc[0, "error"]
    assert done.loc[0, "passages embedded"] == preview.loc[0, "passages to embed"] > 0
    assert "1 source(s) synced" in texts(at.success)
    kb = shared_kb()
    src = kb.manifest.source("lagent")
    stored = int(done.loc[0, "chunks embedded"]) + int(done.loc[0, "chunks reused"])  # identical texts embed once
    assert src.indexed_commit and kb.stats()["chunks"] == stored

    # the sources table and Home now show the indexed commit
    table = frame_with(at, "indexed commit")
    assert table.loc[0, "indexed commit"] == src.indexed_commit[:12]
    home = ok(open_page())
    assert frame_with(home, "indexed commit").loc[0, "source"] == "lagent"
    assert "Nothing stale" in texts(home.success)

    # a second sync has nothing to do
    finish_jobs(at.button(key="sync_now_btn").click().run())
    again = frame_with(ok(at), "chunks embedded")
    assert again.loc[0, "chunks embedded"] == 0 and again.loc[0, "files +"] == 0


def test_sources_errors_are_messages(page_env, open_page, monkeypatch):
    # make every network clone fail fast, online or not
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    at = ok(open_page("sources"))
    for name, url in (("evil", "ext::sh -c touch% /tmp/pwned"), ("bad name!", "https://example.com/x.git"),
                      ("down", "https://127.0.0.1:9/nothing.git"), ("missing", "/nonexistent/repo.bundle")):
        at.text_input(key="add_name").input(name)
        at.text_input(key="add_url").input(url)
        at.button(key="add_btn").click().run()
        ok(at)
        assert at.error, f"{url}: no error shown"
    at.button(key="add_defaults_btn").click().run()
    ok(at)
    results = frame_with(at, "ok")
    assert len(results) == 6 and not results["ok"].any()
    assert len([e for e in at.error if "gitee.com" in e.value]) == 6


def test_upload_view_escaped_then_delete(page_env, open_page, shared_kb):
    at = ok(open_page("sources"))
    at.text_input(key="upload_source").input("notes")
    at.file_uploader(key="upload_files").set_value([("notes.md", EVIL_DOC, "text/markdown")])
    at.run()
    finish_jobs(at.button(key="upload_btn").click().run())
    ok(at)
    assert "Uploaded 1 file(s) to **notes**" in texts(at.success) and ": 1 new;" in texts(at.success), texts(at.error)
    assert shared_kb().manifest.source("notes").kind == "files"

    docs = ok(open_page("documents"))
    assert docs.selectbox(key="docs_open").options[0].startswith("notes/uploads/notes.md")
    # the document is shown as code or as Markdown without HTML: nothing can inject markup or script
    assert not docs.get("html") and not docs.get("iframe")
    assert all(not m.proto.allow_html for m in docs.markdown)
    assert any("<script>" in c.value and "│" in c.value for c in docs.code)
    rendered = [m.value for m in docs.markdown if "__pwned" in m.value]
    assert rendered and all(not m.proto.allow_html for m in docs.markdown if "__pwned" in m.value)

    at.selectbox(key="delete_source").select("notes")
    at.button(key="delete_btn").click().run()
    ok(at)
    assert at.button(key="delete_confirm_btn").disabled
    at.text_input(key="delete_typed").input("notes")
    at.run()
    at.button(key="delete_confirm_btn").click().run()
    ok(at)
    assert "Deleted notes" in texts(at.success)
    kb = shared_kb()
    assert kb.sources() == [] and kb.stats()["chunks"] == 0


# ---------------------------------------------------------------------------- Documents and Collections


def test_documents_view_and_rechunk(lagent_env, open_page, shared_kb):
    kb = shared_kb()
    before, _ = kb.live()
    at = ok(open_page("documents"))
    docs = frame_with(at, "reason")
    assert (docs["source"] == "lagent").all() and (docs["status"] == "indexed").any()
    at.text_input(key="docs_filter").input("README").run()
    ok(at)
    key = next(o for o in at.selectbox(key="docs_open").options if o.startswith("lagent/README"))
    at.selectbox(key="docs_open").select(key.split("  (")[0]).run()
    ok(at)
    path = key.split("  (")[0].split("/", 1)[1]
    n_chunks = len(kb.chunks_of("lagent", path))
    gutter = next(c.value for c in at.code if " │ " in c.value)
    assert gutter.startswith("1 │ 1") or gutter.lstrip().startswith("1 │ 1")
    assert f"│ {n_chunks}" in gutter or f",{n_chunks}" in gutter, "the last chunk is marked on its lines"
    assert at.get("vega_lite_chart"), "the chunk map and length histogram are drawn"

    # preview a token-measured config on this document
    at.selectbox(key="rc_unit").select("tokens")
    at.number_input(key="rc_size").set_value(64)
    at.number_input(key="rc_overlap").set_value(8).run()
    ok(at)
    assert not at.error, texts(at.error)
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Chunks"]) >= n_chunks and metrics["Over the window"] == "0"
    rows = frame_with(at, "over window")
    assert len(rows) == int(metrics["Chunks"]) and rows["tokens"].max() <= 256

    at.button(key="rc_apply").click().run(timeout=120)
    ok(finish_jobs(at))  # a re-chunk is a background job too
    after, cfg = kb.live()
    assert after != before and cfg.unit == "tokens" and cfg.size == 64
    assert "Live collection is now" in texts(at.success)
    # the form now holds the live settings: a job that could only fail (and count as a failed job on Home) is not offered
    at.run()
    assert at.button(key="rc_apply").disabled and "These are the live collection's settings" in texts(at.caption)


def test_collections_records_lookup_switch_delete(lagent_env, open_page, shared_kb):
    kb = shared_kb()
    old, _ = kb.live()
    kb.rechunk(ChunkConfig(size=300, overlap=30))
    new, _ = kb.live()
    at = ok(open_page("collections"))
    table = frame_with(at, "dimension")
    assert set(table["name"]) == {old, new} and table.loc[table["name"] == new, "live"].iloc[0] == "● live"
    assert (table["dimension"] == 32).all()
    passages = dict(zip(table["name"], table["passages"]))
    assert passages[old] > 0 and passages[new] == 0  # the rebuild was asked for without passages

    records = frame_with(at, "heading")
    assert len(records) > 0 and (records["source"] == "lagent").all()
    at.selectbox(key="coll_source").select("lagent")
    at.text_input(key="coll_path").input(records.loc[0, "path"]).run()
    ok(at)
    filtered = frame_with(at, "heading")
    assert (filtered["path"] == records.loc[0, "path"]).all()

    rid = filtered.loc[0, "id"]
    at.text_input(key="coll_id").input(rid).run()
    ok(at)
    assert at.json and "32 dimensions" in texts(at.markdown)
    at.text_input(key="coll_id").input("no-such-id").run()
    assert "No record with id" in texts(at.warning)

    # make the old collection live again, then delete the other one
    at.selectbox(key="coll_pick").select(old).run()
    at.button(key="coll_live_btn").click().run()
    ok(at)
    assert kb.live()[0] == old and "is now the live collection" in texts(at.success)
    at.selectbox(key="coll_pick").select(new).run()
    at.button(key="coll_delete_btn").click().run()
    at.button(key="coll_delete_confirm").click().run()
    ok(at)
    assert "Deleted" in texts(at.success) and [c["name"] for c in kb.collections()] == [old]


# ---------------------------------------------------------------------------- Retrieval lab, Chat, Evaluation


def test_retrieval_lab_side_by_side(xtuner_env, open_page):
    at = ok(open_page("retrieval_lab"))
    question = "Xtuner RL Rollout 中如果不设置 rollout_max_batch_size_per_instance，默认并发度是多少？"
    at.text_input(key="lab_query").input(question).run(timeout=120)
    ok(at)
    assert [h.value for h in at.subheader][:3] == ["Dense", "BM25", "Hybrid"]
    notes = texts(at.caption)
    assert "cosine similarity of the chunk's best passage (or of the chunk), -1..1, higher is better" in notes and "higher is better" in notes
    body = texts(at.markdown)
    assert escape_markdown("docs/zh_cn/rl/advanced_tutorial/efficiency.md") in body, "the gold doc is among the hits"
    assert ":orange-background[xtuner]" in body.lower() or ":orange-background[XTuner]" in body
    assert "found by dense #" in body and "bm25 #" in body
    assert "https://gitee.com/InternLM/xtuner/blob/" in body, "hits link to their permalink"
    assert "(other language)" not in body

    # another wording searched too (as a translated chat question is): hybrid's hits say which lists found them
    at.text_input(key="lab_also_as").input("In XTuner's RL rollout, what concurrency applies when "
                                           "rollout_max_batch_size_per_instance is not set?").run(timeout=120)
    ok(at)
    assert "bm25 (other language) #" in texts(at.markdown) and "dense (other language) #" in texts(at.markdown)

    # a threshold no hit can pass leaves the column empty
    at.checkbox(key="lab_th_on_dense").check().run()
    at.number_input(key="lab_th_dense").set_value(0.99).run()
    ok(at)
    assert "No hits above the threshold." in texts(at.info)


def test_retrieval_lab_says_when_an_auto_answer_would_search_a_translation(xtuner_env, open_page, monkeypatch):
    """The gate of KB_TRANSLATE_QUESTIONS=auto (its own logic is tested in test_answer.py), shown beside the hits."""
    from kb.search.engine import SearchEngine

    asked = []
    for disagree in (True, False):
        monkeypatch.setattr(SearchEngine, "retrievers_disagree",
                            lambda self, q, opts=None, d=disagree: asked.append((q, opts.source)) or d)
        at = ok(open_page("retrieval_lab"))
        at.selectbox(key="lab_source").set_value("xtuner")
        at.text_input(key="lab_query").input("xtuner 怎么安装").run(timeout=120)
        notes = texts(ok(at).caption)
        assert ("Their first five share no chunk: with `KB_TRANSLATE_QUESTIONS=auto`" in notes) is disagree, notes
    assert asked == [("xtuner 怎么安装", "xtuner")] * 2, "asked with the lab's filters"


def test_retrieval_lab_says_what_a_slipped_name_was_searched_as(xtuner_env, open_page):
    at = ok(open_page("retrieval_lab"))
    at.text_input(key="lab_query").input("xtunner 怎么装").run(timeout=120)
    ok(at)
    assert "Searched as “xtuner 怎么装”: a project name written as its docs write it." in texts(at.caption)
    assert "Query terms (BM25): `xtuner` `安装`" in texts(at.markdown), "the words BM25 reads, as it reads them"
    at.text_input(key="lab_query").input("xtuner 怎么安装").run(timeout=120)
    ok(at)
    assert "Query terms (BM25): `xtuner` `安装`" in texts(at.markdown)
    assert "Searched as" not in texts(at.caption), "nothing to say when nothing changed"


def test_two_sessions_share_one_engine_model_and_kb(xtuner_env, open_page):
    from pages import _resources as resources

    one = ok(open_page("retrieval_lab"))
    one.text_input(key="lab_query").input("如何安装 xtuner").run(timeout=120)
    two = ok(open_page("retrieval_lab"))
    two.text_input(key="lab_query").input("QLoRA").run(timeout=120)
    ok(one), ok(two)
    a, b = one.session_state["_kb_resources"], two.session_state["_kb_resources"]
    for name in ("knowledge_base", "search_engine"):
        assert a[name] == b[name], name
    assert a["search_engine"] == id(resources.search_engine())
    assert a["knowledge_base"] == id(resources.knowledge_base()) == id(resources.search_engine().kb)
    assert resources.loaded()["embeddings"] is not None, "the model was loaded once and recorded"


def message_places(at) -> list[int]:
    """Where the chat messages sit among the page's top-level elements."""
    return [i for i, node in at.main.children.items() if getattr(node, "type", "") == "chat_message"]


def test_chat_answers_with_citations_and_saves(xtuner_env, open_page):
    at = ok(open_page("chat"))
    at.chat_input(key="chat_input").set_value("xtuner是什么？").run(timeout=300)
    ok(at)
    assert not at.error, texts(at.error)
    assert len(at.chat_message) == 2
    answer = at.chat_message[1]
    assert texts(answer.markdown).strip(), "an answer was streamed"
    labels = [e.label for e in answer.expander if not e.label.startswith("What the model wrote")]  # a withheld answer
    assert labels and all("xtuner/" in l and "@" in l for l in labels), labels
    assert any("README" in l for l in labels)
    assert any("gitee.com/InternLM/xtuner/blob/" in m.value for m in answer.markdown)
    from core.settings import load_settings
    from kb import log as runlog

    (logged,) = runlog.read(load_settings(), kinds=["answer"])  # with its length: it said "? tokens" from the page
    assert logged["tokens"] > 0 and f"{logged['tokens']} tokens" in runlog.describe(logged)
    # the next run (a follow-up asked) draws the conversation where this run drew it: Streamlit keeps a moved
    # element's old children, greyed, so the answer's thumbs showed under the user's follow-up
    asked_in = message_places(at)
    at.run()
    assert message_places(at) == asked_in, "the messages keep their places once there is no intro"
    saved = ConversationStore(xtuner_env).list()
    assert saved and saved[0]["title"] == "xtuner是什么？"

    # another session lists it and reopens it
    other = ok(open_page("chat"))
    saved_box = next(b for b in other.selectbox if b.label == "Conversation")
    assert saved_box.options and saved_box.options[0].startswith("xtuner是什么？")
    other.button(key="chat_open").click().run()
    ok(other)
    assert len(other.chat_message) == 2 and other.chat_message[1].expander

    # compare mode: the RAG answer and the model alone, side by side
    at.button(key="chat_clear").click().run()
    assert len(at.chat_message) == 0
    at.toggle(key="chat_compare").set_value(True)
    at.slider(key="chat_k").set_value(1)
    at.chat_input(key="chat_input").set_value("XTuner 支持哪些微调算法？").run(timeout=300)
    ok(at)
    reply = at.chat_message[1]
    heads = texts(reply.markdown)
    assert "With the knowledge base (RAG)" in heads and "Model alone (no RAG)" in heads
    sources = [e for e in reply.expander if not e.label.startswith("What the model wrote")]
    assert len(sources) == 1, "only the RAG side has sources"
    conv = json.loads((xtuner_env / "conversations" / f"{at.session_state['chat_conv']['id']}.json").read_text())
    assert conv["messages"][1]["plain"]["content"] and conv["messages"][1]["content"]


def test_chat_shows_llm_errors(page_env, open_page, monkeypatch):
    from pages import _resources as resources

    monkeypatch.setenv("KB_LLM_GGUF", "/nonexistent/model.gguf")
    saved_before: list = []
    events: list[str] = []
    load, listed = resources.chat_model, ConversationStore.list
    monkeypatch.setattr(ConversationStore, "list", lambda self: events.append("list") or listed(self))
    monkeypatch.setattr(resources, "chat_model", lambda *a, **kw: events.append("model") or saved_before.append(
        ConversationStore(page_env).list()) or load(*a, **kw))
    at = ok(open_page("chat"))
    events.clear()  # from the question's run on
    at.chat_input(key="chat_input").set_value("hello").run(timeout=120)
    ok(at)
    assert "no such file" in texts(at.chat_message[1].error), [texts(m.markdown) for m in at.chat_message]
    assert ConversationStore(page_env).list()[0]["turns"] == 1, "the failed turn is saved with its error"
    # saved with its question before the answer began: a reload while it streamed lost both (a browser review)
    assert saved_before and saved_before[0] and saved_before[0][0]["turns"] == 1
    assert at.query_params["c"] == saved_before[0][0]["id"]
    # and the sidebar's list drawn with it before the model was asked for: drawn at the end, it lagged a question
    # while the answer streamed (a browser review)
    assert events[0] == "list" and "model" in events, events


def test_a_question_left_without_an_answer_says_so_and_can_be_asked_again(page_env, open_page, monkeypatch):
    """A reload while an answer streamed (or a second question sent before the first's first word) left the question
    bare, with nothing under it, in the page and in its saved copy (a browser review)."""
    monkeypatch.setenv("KB_LLM_GGUF", "/nonexistent/model.gguf")  # an answer that ends at once, with its error
    store = ConversationStore(page_env)
    conv = store.new()
    conv["messages"] = [{"role": "user", "content": "What is Lagent?"}]
    store.save(conv)
    at = ok(open_page("chat"))
    at.button(key="chat_open").click().run()
    ok(at)
    assert len(at.chat_message) == 1 and "Not answered: interrupted" in texts(at.chat_message[0].caption)
    at.button(key="chat_again_0").click().run(timeout=120)
    ok(at)
    messages = json.loads((page_env / "conversations" / f"{conv['id']}.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "user", "assistant"]  # asked again, answered (its error)
    assert messages[1]["content"] == "What is Lagent?" and "no such file" in texts(at.chat_message[-1].error)
    assert not [b for b in at.button if b.key == "chat_again_1"]  # the new one has its answer


def test_chat_can_also_search_in_the_other_language(page_env, open_page, monkeypatch):
    at = ok(open_page("chat"))
    choice = at.selectbox(key="chat_translate")
    assert choice.value == "off" and not choice.disabled  # off by default: a generation before every search
    assert choice.options == ["Off", "When BM25 and dense disagree", "Always"]
    at.selectbox(key="chat_mode").set_value("bm25").run()
    assert at.selectbox(key="chat_translate").disabled  # hybrid only
    monkeypatch.setenv("KB_TRANSLATE_QUESTIONS", "1")  # the switch it was: on is always
    assert ok(open_page("chat")).selectbox(key="chat_translate").value == "always"
    monkeypatch.setenv("KB_TRANSLATE_QUESTIONS", "auto")
    assert ok(open_page("chat")).selectbox(key="chat_translate").value == "auto"
    monkeypatch.setenv("KB_TRANSLATE_QUESTIONS", "sometimes")
    assert "KB_TRANSLATE_QUESTIONS='sometimes'" in texts(open_page("chat").error)


def test_evaluation_runs_and_lists_past_runs(xtuner_env, open_page, corpus):
    at = ok(open_page("evaluation"))
    assert "Not indexed here" in texts(at.warning)
    at.toggle(key="eval_only_indexed").set_value(False)  # score every question (test_pages_admin: only indexed)
    at.multiselect(key="eval_modes").set_value(["bm25", "hybrid"])
    at.button(key="eval_run").click().run(timeout=180)
    ok(finish_jobs(at))  # an evaluation is a background job
    summary = frame_with(at, "mrr")
    assert list(summary["mode"]) == ["bm25", "hybrid"] and (summary["n"] == 24).all()
    per_q = frame_with(at, "gold")
    assert len(per_q) == 24 and {"rank bm25", "rank hybrid"} <= set(per_q.columns)
    # the gold passage, read from the indexed file, stands beside each mode's top hit
    row = per_q[per_q["id"] == "dev-xtuner-02"].iloc[0]
    assert "Xtuner" in row["gold passage"] and row["top passage (hybrid)"]
    assert (per_q[per_q["id"].str.startswith("dev-lmdeploy")]["gold passage"] == "").all()  # not indexed here
    past = frame_with(at, "chunking")
    assert len(past) == 2  # this test's two runs, and no other test's
    # the held-out set runs too, and past runs are shown per question set
    at.selectbox(key="eval_origin").set_value("Held-out set").run()
    at.multiselect(key="eval_modes").set_value(["bm25"])
    at.button(key="eval_run").click().run(timeout=180)
    ok(finish_jobs(at))  # an evaluation is a background job
    assert list(frame_with(at, "mrr")["n"]) == [36]
    assert at.selectbox(key="eval_past_set:holdout_questions.jsonl").value == "holdout_questions.jsonl"
    assert len(frame_with(at, "chunking")) == 1
    # a run that can't be saved is shown all the same, and says it was not kept
    evals = xtuner_env / "evals"
    evals.rename(xtuner_env / "evals-aside")
    evals.write_text("a file where the runs' folder goes")
    try:
        at.button(key="eval_run").click().run(timeout=180)
        ok(finish_jobs(at))
    finally:
        evals.unlink()
        (xtuner_env / "evals-aside").rename(evals)
    assert list(frame_with(at, "mrr")["n"]) == [36] and "This run is shown, but not kept" in texts(at.warning)
    # a set of unanswerable questions has nothing for retrieval to find: said, and not run
    at.selectbox(key="eval_origin").set_value("Unanswerable").run()
    assert at.button(key="eval_run").disabled and any("only unanswerable" in i.value for i in at.info)


def test_embedding_cache_key_follows_every_embedding_setting(tmp_path):
    """A changed backend or model cache must load another model, never reuse the cached one."""
    from conftest import base_settings
    from pages import _resources as resources

    s = base_settings(tmp_path)
    keys = {resources._key(x, resources._EMBED_FIELDS) for x in (
        s, s.with_(embed_backend="onnx-int8"), s.with_(model_cache=str(tmp_path / "c")), s.with_(embed_batch_size=8))}
    assert len(keys) == 4
    assert resources._key(s.with_(llm="openai"), resources._EMBED_FIELDS) == resources._key(s, resources._EMBED_FIELDS)


@pytest.mark.parametrize("page", ["sources", "documents", "collections", "evaluation"])
def test_every_admin_page_needs_the_password_and_sign_out_ends_it(lagent_env, open_page, monkeypatch, page):
    monkeypatch.setenv("KB_ADMIN_PASSWORD", "s3cret")
    at = ok(open_page(page))
    assert "Admin sign-in" in texts(at.subheader) and not at.tabs and not at.dataframe  # nothing of the KB shown
    at.text_input[0].input("s3cret")
    at.form_submit_button[0].click().run()
    ok(at)
    assert "Admin sign-in" not in texts(at.subheader) and at.button(key="_admin_sign_out")
    at.button(key="_admin_sign_out").click().run()
    ok(at)
    assert "Admin sign-in" in texts(at.subheader) and not at.dataframe


def test_the_model_hears_stop_or_a_new_question_while_the_chat_page_waits():
    """Streamlit ends a run only at its next st call; the model asks this while it reads the prompt (10-15 s)."""
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData, ScriptRequests

    from pages._common import rerun_requested

    requests = ScriptRequests()
    asked = rerun_requested(requests)
    assert not asked()
    requests.request_rerun(RerunData(fragment_id_queue=["jobs"]))  # a fragment elsewhere refreshing: answer on
    assert not asked()
    for ask_again in (lambda r: r.request_rerun(RerunData()), lambda r: r.request_stop()):  # Stop's click, a new question
        requests = ScriptRequests()
        asked = rerun_requested(requests)
        ask_again(requests)
        assert asked()
    assert rerun_requested()() is False  # no script run here: never "asked"
