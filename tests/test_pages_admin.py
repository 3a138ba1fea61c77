"""Admin pages through AppTest: the Documents page's deep links and charts, the Evaluation page's indexed-only
scoring, answer runs and rated answers, and the Retrieval lab's caption.

Models: the tiny sentence-transformers model for the lagent index and the empty knowledge base; the real default
embedding model and LLM (loaded once per session) for the xtuner evaluation.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from streamlit.testing.v1 import AppTest

from kb.citations import viewer_link
from kb.conversations import ConversationStore
from kb.evaluate import FEEDBACK_LABEL, feedback_questions, load_questions, past_runs, save_run
from page_fixtures import HOME_PY
from page_helpers import finish_jobs, frame_with, ok, texts


def open_with(page: str, params: dict[str, str], timeout: float = 90) -> AppTest:
    """A fresh session (a reload) of ``page?params``."""
    at = AppTest.from_file(str(HOME_PY), default_timeout=timeout)
    at.run()
    at.query_params.update(params)
    at.switch_page(f"pages/{page}.py").run()
    return ok(at)


def gutter_numbers(code: str) -> list[int]:
    """The file line numbers in a gutter view (``  5 │ 1 │ text``)."""
    return [int(line.split("│")[0]) for line in code.split("\n")]


def gutter_blocks(at) -> list[list[int]]:
    return [gutter_numbers(c.value) for c in at.code if " │ " in c.value.split("\n")[0]]


def specs(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def params_of(link: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(link).query))


# ---------------------------------------------------------------------------- Documents: deep links, line view, charts


GUIDE_V1 = "# Guide\n\nIntro line.\n\nThe judger pool runs judgers in parallel.\nIt retries twice.\n\nEnd.\n"
GUIDE_V2 = GUIDE_V1.replace("Intro line.", "A new paragraph.\nAnother new line.\n\nIntro line.")


def test_a_link_made_before_a_sync_finds_its_lines_or_shows_them_as_they_were(page_env, shared_kb, monkeypatch):
    """A browser review: an answer cited lines 87 at one commit; after a sync its link highlighted line 87 of the
    new version, an empty line, with nothing said."""
    kb = shared_kb()
    c1 = kb.upload({"guide.md": GUIDE_V1.encode(), "other.md": b"# Other\n"}, "notes").commit_after
    c2 = kb.upload({"guide.md": GUIDE_V2.encode()}, "notes").commit_after
    link = params_of(viewer_link("notes", "uploads/guide.md", 5, 6, c1))
    assert link["commit"] == c1[:12]
    at = open_with("documents", link)
    assert "where the cited lines are lines 8–9 (highlighted)" in texts(at.info), texts(at.info) + texts(at.warning)
    assert "Lines 8–9" in texts(at.markdown)
    assert at.query_params == link, "the link's own address, so a reload says again which version it cites"
    again = open_with("documents", dict(at.query_params))  # a reload (browser review, finding 14: the note was lost)
    assert "where the cited lines are lines 8–9 (highlighted)" in texts(again.info)
    at.selectbox(key="docs_open").set_value("notes/uploads/other.md").run()
    assert "commit" not in at.query_params, "another file on show: the URL names it, at the version on show"
    # the cited lines changed: shown as they were at the cited commit, nothing highlighted
    kb.upload({"guide.md": GUIDE_V2.replace("twice", "three times").encode()}, "notes")
    at = open_with("documents", params_of(viewer_link("notes", "uploads/guide.md", 8, 9, c2)))
    assert "the cited lines are no longer in it" in texts(at.warning)
    assert any(c.value == "The judger pool runs judgers in parallel.\nIt retries twice." for c in at.code)
    assert "Lines 8–9" not in texts(at.markdown)
    at = open_with("documents", params_of(viewer_link("notes", "uploads/guide.md", 8, 9, "0" * 40)))
    assert "which its clone doesn't hold" in texts(at.warning) and "Lines 8–9" in texts(at.markdown)


def test_a_citation_link_shows_its_lines_read_only_without_admin_rights(page_env, shared_kb, monkeypatch):
    """With an admin password set, the chat's citations opened the Documents sign-in: users couldn't check them."""
    commit = shared_kb().upload({"guide.md": GUIDE_V2.encode()}, "notes").commit_after
    monkeypatch.setenv("KB_ADMIN_PASSWORD", "s3cret")
    at = open_with("documents", params_of(viewer_link("notes", "uploads/guide.md", 8, 9, commit)))
    assert "Lines 8–9" in texts(at.markdown) and "Admin sign-in" in texts(at.subheader)
    assert any("8 │ The judger pool runs judgers in parallel." in c.value for c in at.code)
    assert not at.tabs and not at.selectbox, "nothing of the admin page"
    at = open_with("documents", {"source": "notes", "path": "../../etc/passwd", "lines": "1-2"})
    assert "not an indexed document here" in texts(at.warning) and not at.code


def test_deep_link_opens_the_file_with_its_lines_highlighted(lagent_env, shared_kb):
    kb = shared_kb()
    docs = sorted((d for d in kb.documents("lagent", status="indexed")), key=lambda d: -d.chunks)
    doc, other = docs[0], docs[1]
    n_lines = len(kb.read_document("lagent", doc.path).text.split("\n"))
    assert n_lines > 40
    link = viewer_link("lagent", doc.path, 12, 17)
    at = open_with("documents", params_of(link))
    assert at.selectbox(key="docs_open").value == f"lagent/{doc.path}"
    assert not at.warning or all("no admin password" in w.value for w in at.warning), texts(at.warning)
    assert "Lines 12–17" in texts(at.markdown)
    # the whole file, every line, split around the highlighted lines: 1-11 | 12-17 | 18-end
    before, marked, after = gutter_blocks(at)
    assert before == list(range(1, 12)) and marked == list(range(12, 18)) and after == list(range(18, n_lines + 1))
    assert all(c.proto.wrap_lines for c in at.code if " │ " in c.value), "long lines wrap"
    assert at.query_params == {"source": "lagent", "path": doc.path, "lines": "12-17"}
    assert any(h.proto.unsafe_allow_javascript and "scrollIntoView" in h.proto.body for h in at.get("html")), \
        "the highlighted lines are scrolled into view"
    # chunks by line: one row per chunk, with the linked lines as a band
    chunk_map = next(s for s in specs(at) if "one row per chunk" in json.dumps(s.get("title", "")))
    rows = [layer for layer in chunk_map["layer"] if layer["encoding"].get("y")]
    assert rows[0]["encoding"]["y"]["field"] == "chunk" and chunk_map["height"] == {"step": 20}

    # another file: the URL follows (its lines go), and a reload opens that file
    at.selectbox(key="docs_open").select(f"lagent/{other.path}").run()
    ok(at)
    assert at.query_params == {"source": "lagent", "path": other.path}
    assert "Lines 12–17" not in texts(at.markdown) and len(gutter_blocks(at)) == 1
    again = open_with("documents", at.query_params)
    assert again.selectbox(key="docs_open").value == f"lagent/{other.path}"
    # a reload of the first link highlights again; Clear removes the highlight and the lines from the URL
    first = open_with("documents", params_of(link))
    assert [b[0] for b in gutter_blocks(first)] == [1, 12, 18]
    first.button(key="docs_highlight_clear").click().run()
    ok(first)
    assert len(gutter_blocks(first)) == 1 and first.query_params == {"source": "lagent", "path": doc.path}

    # a re-chunk preview: the length histogram's axis covers the live chunks too, not only the candidate's
    live_max = max(int(c.get("n_tokens") or 0) for c in kb.chunks_of("lagent", doc.path))
    first.selectbox(key="rc_unit").select("tokens")
    first.number_input(key="rc_size").set_value(40)
    first.number_input(key="rc_overlap").set_value(0).run()
    ok(first)
    hist = next(s for s in specs(first) if "Distribution of chunk lengths" in json.dumps(s.get("title", "")))
    bars = hist["layer"][0] if "layer" in hist else hist
    domain = bars["encoding"]["x"]["scale"]["domain"]
    assert domain[0] == 0 and domain[1] > live_max > 40


def test_bad_links_warn_and_the_page_still_works(lagent_env, shared_kb):
    kb = shared_kb()
    path = next(d.path for d in kb.documents("lagent", status="indexed"))
    cases = [
        ({"source": "nosuch", "path": path, "lines": "1-2"}, "does not have"),
        ({"source": "lagent", "path": "no/such/file.md", "lines": "1-2"}, "not a document of lagent"),
        ({"source": "lagent", "path": path, "lines": "nine"}, "not a line range"),
        ({"source": "lagent", "path": path, "lines": "9-3"}, "not a line range"),
        ({"source": "lagent", "path": path, "lines": "90000-90005"}, "past the end"),
        ({"path": path}, "does not name a document"),
        ({"source": "<b>x</b>](javascript:1)", "path": path}, "does not have"),
    ]
    for params, message in cases:
        at = open_with("documents", params)
        if params.get("source") != "lagent" or params["path"] != path:  # names no document: the link stays
            warning = texts(at.warning)
            assert message in warning, (params, warning)
            assert gutter_blocks(at) and at.selectbox(key="docs_open").value, "the page still works"
            assert dict(at.query_params) == params, "the link stays: a reload warns again"
            shown = at.selectbox(key="docs_open").value
            other = next(f"lagent/{d.path}" for d in kb.documents("lagent", status="indexed")
                         if f"lagent/{d.path}" != shown)
            at.selectbox(key="docs_open").set_value(other).run()  # another file picked: the URL follows it
            assert at.query_params["path"] == other.split("/", 1)[1]
            assert not [w for w in at.warning if w.icon == ":material/link_off:"], "the warning was the link's"
            continue
        warning = texts(at.warning)
        assert message in warning, (params, warning)
        assert "<b>" not in warning.replace("`<b>x</b>](javascript:1)`", ""), "the URL's text is shown as code"
        assert not any("\\" in span for span in re.findall(r"`[^`]+`", warning)), "a code span shows escapes as such"
        assert gutter_blocks(at) and len(gutter_blocks(at)) == 1, "a document is shown, without a highlight"
        assert at.selectbox(key="docs_open").value, "the page still works"
        assert "lines" not in at.query_params and set(at.query_params) == {"source", "path"}, at.query_params
    # a link to the right file with bad lines opens that file
    at = open_with("documents", {"source": "lagent", "path": path, "lines": "x"})
    assert at.selectbox(key="docs_open").value == f"lagent/{path}"


# ---------------------------------------------------------------------------- Retrieval lab


def test_retrieval_lab_caption_says_what_hybrid_fuses(page_env, open_page):
    from kb.search.hits import SCORE_NOTES

    at = ok(open_page("retrieval_lab"))
    caption = texts(at.caption)
    assert SCORE_NOTES["hybrid"] in caption and SCORE_NOTES["dense"] in caption and "two" not in caption


# ---------------------------------------------------------------------------- Evaluation


def test_evaluation_scores_only_indexed_questions_and_labels_runs(xtuner_env, open_page):
    at = ok(open_page("evaluation"))
    assert "left out of the scores" in texts(at.warning)
    at.multiselect(key="eval_modes").set_value(["hybrid"])
    at.button(key="eval_run").click().run(timeout=180)
    ok(finish_jobs(at))  # an evaluation is a background job
    assert not at.error, texts(at.error)
    summary = frame_with(at, "mrr")
    assert list(summary["n"]) == [4], "only the xtuner questions are scored"
    assert set(frame_with(at, "rank hybrid")["id"]) == {f"dev-xtuner-0{i}" for i in range(1, 5)}
    left = frame_with(at, "gold lines")
    assert len(left) == 20 and "xtuner" not in set(left["repo"])
    (run,) = past_runs(xtuner_env)
    assert run["n"] == 4 and len(run["not_indexed"]) == 20 and run["config"]["only_indexed"] is True
    # past runs: one x position per run, named by when it ran (not a time axis in milliseconds)
    chart = next(s for s in specs(at) if "Past runs on" in json.dumps(s.get("title", "")))
    x = chart["encoding"]["x"]
    assert x["field"] == "run" and x["type"] == "nominal"
    assert frame_with(at, "chunking")["run"].iloc[0].endswith("· hybrid k3")


def test_answers_mode_runs_the_answer_evaluation(xtuner_env, open_page):
    question = {"id": "a-xtuner-01", "lang": "zh", "question": "XTuner 是什么？", "repo": "xtuner",
                "path": "README_zh-CN.md", "line_start": 1, "line_end": 60, "facts": [["XTuner"]]}
    at = ok(open_page("evaluation"))
    at.radio(key="eval_kind").set_value("Answers").run()
    at.selectbox(key="eval_origin").set_value("Upload a JSONL file").run()
    at.file_uploader(key="eval_upload").set_value(
        [("mine.jsonl", (json.dumps(question, ensure_ascii=False) + "\n").encode(), "application/json")])
    at.run()
    ok(at)
    at.slider(key="eval_ans_k").set_value(1)
    at.button(key="eval_ans_run").click().run(timeout=400)
    ok(finish_jobs(at))  # an answer evaluation is a background job too: its report shows once it has ended
    assert not at.error, texts(at.error)
    assert "This run" in [h.value for h in at.subheader]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Questions"] == "1" and metrics["Key facts stated"] in ("1.00", "0.00")
    rows = frame_with(at, "citations")
    assert list(rows["id"]) == ["a-xtuner-01"] and rows["answer"].iloc[0].strip()
    assert rows["gold lines"].iloc[0] == "xtuner/README_zh-CN.md:1-60"
    (run,) = past_runs(xtuner_env, "answers")
    assert run["n"] == 1 and run["k"] == 1 and run["config"]["questions"] == "mine.jsonl"
    assert {"facts", "gold_cited", "declined", "ttft_median", "seconds_median"} <= set(run)
    assert frame_with(at, "ttft median s")["n"].tolist() == [1], "the run is listed among past answer runs"
    assert "1 answered" in frame_with(at, "result")["result"].iloc[0], "the jobs panel says how it ended"


def test_a_saved_answer_run_renders(page_env, open_page):
    rows = [
        {"id": "q1", "question": "XTuner 是什么？", "category": "overview", "answer": "XTuner 是微调工具 [1]。",
         "answerable": True, "cited": [1], "sources": ["xtuner/README.md:1-9@abcdef12", "xtuner/docs/a.md:3-4@abcdef12"],
         "gold": "xtuner/README.md:1-12", "ttft_s": 4.2, "seconds": 9.1, "facts": True, "gold_cited": True,
         "gold_retrieved": True, "facts_shown": True},
        {"id": "q2", "question": "价格多少？", "category": "unanswerable", "answer": "文档中没有提到。",
         "answerable": False, "cited": [], "sources": [], "gold": "", "ttft_s": 3.0, "seconds": 5.0, "declined": True},
    ]
    report = {"n": 2, "facts": 1.0, "gold_cited": 1.0, "gold_retrieved": 1.0, "declined": 1.0, "ttft_median": 3.6,
              "seconds_median": 7.05, "k": 3, "mode": "hybrid", "rows": rows}
    save_run(page_env, report, {"questions": "dev_questions.jsonl", "llm": "llamacpp: test.gguf",
                                "chunk_config": "markdown 400/40 tokens"}, kind="answers")
    at = ok(open_page("evaluation"))
    at.radio(key="eval_kind").set_value("Answers").run()
    ok(at)
    past = frame_with(at, "ttft median s")
    assert past["facts"].tolist() == [1.0] and past["llm"].tolist() == ["llamacpp: test.gguf"]
    per_q = frame_with(at, "citations")
    assert per_q["citations"].tolist() == ["[1] xtuner/README.md:1-9@abcdef12", ""]
    assert per_q["gold lines"].tolist() == ["xtuner/README.md:1-12", "(unanswerable)"]
    assert per_q["declined"].tolist() == ["–", "yes"] and per_q["facts"].tolist() == ["yes", "–"]
    assert per_q["facts in excerpts"].tolist() == ["yes", "–"]
    chart = next(s for s in specs(at) if "Past answer runs on" in json.dumps(s.get("title", "")))
    assert chart["encoding"]["x"]["field"] == "run"


def stored_source(path: str, text: str) -> dict:
    """A source as a saved chat answer keeps it (xtuner, lines 3-9)."""
    return {"rank": 1, "score": 0.03, "mode": "hybrid", "source": "xtuner", "path": path,
            "line_start": 3, "line_end": 9, "commit": "abc", "url": "", "text": text, "heading": ""}


def test_rated_answers_become_a_question_set(page_env, open_page):
    store = ConversationStore(page_env)
    hit = stored_source("docs/en/install.md", "pip install xtuner")
    conv = store.new()
    conv["messages"] = [
        {"role": "user", "content": "How do I install xtuner?"},
        {"role": "assistant", "question": "How do I install xtuner?", "content": "I don't know.", "sources": [hit],
         "cited": [], "feedback": {"score": 0, "comment": "it is in the install guide", "at": time.time() - 10}},
        {"role": "user", "content": "xtuner是什么？"},
        {"role": "assistant", "question": "xtuner是什么？", "content": "一个微调工具 [1]。", "sources": [hit],
         "cited": [1], "feedback": {"score": 1, "comment": "", "at": time.time()}},
    ]
    store.save(conv)
    at = ok(open_page("evaluation"))
    at.radio(key="eval_kind").set_value("Rated answers").run()
    ok(at)
    listed = frame_with(at, "rating")
    assert listed["rating"].tolist() == ["👍 up", "👎 down"], "newest first"
    assert "it is in the install guide" in texts(at.markdown)
    assert viewer_link("xtuner", "docs/en/install.md", 3, 9) in texts(at.markdown), "its sources open the viewer"
    ident = f"{conv['id']}:1"

    at.button(key="fb_save").click().run()  # no gold lines picked
    assert "at least one gold location" in texts(at.error)
    assert not feedback_questions(page_env).exists()
    at.text_input(key=f"fb_path:{ident}").input("docs/en/install.md")
    at.text_input(key=f"fb_lines:{ident}").input("three").run()
    at.button(key="fb_save").click().run()
    assert "line range like 3-9" in texts(at.error)

    at.text_input(key=f"fb_path:{ident}").input("")
    at.text_input(key=f"fb_lines:{ident}").input("")
    at.multiselect(key=f"fb_gold:{ident}").set_value([1])
    at.text_area(key=f"fb_facts:{ident}").input("pip install xtuner | pip install -U xtuner").run()
    at.button(key="fb_save").click().run()
    ok(at)
    assert not at.error, texts(at.error)
    assert "Saved to" in texts(at.success)
    (q,) = load_questions(feedback_questions(page_env))
    assert (q["repo"], q["path"], q["line_start"], q["line_end"]) == ("xtuner", "docs/en/install.md", 3, 9)
    assert q["question"] == "How do I install xtuner?" and q["facts"] == [["pip install xtuner", "pip install -U xtuner"]]

    # the next evaluation offers it as a question set
    at.radio(key="eval_kind").set_value("Retrieval").run()
    assert FEEDBACK_LABEL in at.selectbox(key="eval_origin").options
    at.selectbox(key="eval_origin").set_value(FEEDBACK_LABEL).run()
    ok(at)
    assert "1 questions over xtuner." in texts(at.markdown)


def test_a_rated_follow_up_is_offered_as_the_question_it_was_searched_as(page_env, open_page):
    """Saved as asked, "它支持哪些模型？" would mean nothing in a question set."""
    store = ConversationStore(page_env)
    conv = store.new()
    conv["messages"] = [
        {"role": "user", "content": "它支持哪些模型？"},
        {"role": "assistant", "question": "它支持哪些模型？", "standalone": "LMDeploy 支持哪些模型？", "content": "…",
         "sources": [stored_source("README.md", "Llama")], "cited": [], "feedback": {"score": 0, "at": time.time()}},
    ]
    store.save(conv)
    at = ok(open_page("evaluation"))
    at.radio(key="eval_kind").set_value("Rated answers").run()
    ok(at)
    assert at.text_area(key=f"fb_question:{conv['id']}:1").value == "LMDeploy 支持哪些模型？"
    assert "**Searched as:** LMDeploy 支持哪些模型？" in texts(at.markdown)


@pytest.mark.parametrize("kind", ["Retrieval", "Answers", "Rated answers"])
def test_evaluation_kinds_render_on_an_empty_knowledge_base(page_env, open_page, kind):
    at = ok(open_page("evaluation"))
    at.radio(key="eval_kind").set_value(kind).run()
    ok(at)
    assert not at.error, texts(at.error)




def test_a_stopped_answer_keeps_its_sources_or_says_it_stopped_before_them(page_env):
    """Stopped while the model wrote, an answer keeps the sources it was written from; stopped while searching, it
    says so, not that nothing passed the threshold (a browser review saw "No sources" under a stopped answer)."""
    store = ConversationStore(page_env)
    conv = store.new()
    conv["messages"] = [
        {"role": "user", "content": "详细介绍 OpenCompass 的评测流程。"},
        {"role": "assistant", "question": "详细介绍 OpenCompass 的评测流程。", "rag": True, "stopped": True,
         "content": "OpenCompass 的评测流程", "sources": [stored_source("README.md", "评测流程")]},
        {"role": "user", "content": "What is OpenCompass?"},
        {"role": "assistant", "question": "What is OpenCompass?", "rag": True, "stopped": True, "content": ""},
    ]
    store.save(conv)
    at = open_with("chat", {"c": conv["id"]})
    writing, searching = at.chat_message[1], at.chat_message[3]
    assert "Sources: 1 read by the model" in texts(writing.caption)
    assert "Stopped before its sources were found." in texts(searching.caption)
    assert "No sources" not in texts(writing.caption) + texts(searching.caption)


def test_a_conversation_link_carries_no_markup_into_the_page(page_env):
    """A second review's link put an image and a sign-in link into the chat's warning, and a user's question was
    rendered as Markdown."""
    store = ConversationStore(page_env)
    at = open_with("chat", {"c": "![x](https://evil.example/p.png) **expired: [sign in](https://evil.example/l)**"})
    (warning,) = at.warning
    assert "https://evil.example/p.png" in warning.value and "\\[sign in\\]" in warning.value
    assert "![" not in warning.value.replace("\\![", "") and "](" not in warning.value.replace("\\](", "")
    conv = store.new()
    conv["messages"] = [{"role": "user", "content": "why ![x](https://evil.example/q.png) *this*?"}]
    store.save(conv)
    at = open_with("chat", {"c": conv["id"]})
    shown = texts(at.chat_message[0].markdown)
    assert "why \\!\\[x\\]\\(https\\://evil" in shown and "\\*this\\*" in shown


def test_a_withheld_answer_shows_the_decline_and_keeps_the_models_text_apart(page_env):
    """An answer none of whose sentences is in the sources reads as a decline; the model's text is one click away."""
    store = ConversationStore(page_env)
    hit = stored_source("README.md", "XTuner V1 is a training engine")
    conv = store.new()
    conv["messages"] = [
        {"role": "user", "content": "Does XTuner run on TPUs?"},
        {"role": "assistant", "question": "Does XTuner run on TPUs?", "rag": True, "sources": [hit], "cited": [],
         "content": "The knowledge base holds nothing that answers this (searched: “Does XTuner run on TPUs?”).",
         "declined": True, "sentences": [], "unverified": "Yes, XTuner runs on Google TPUs v5."},
    ]
    store.save(conv)
    at = open_with("chat", {"c": conv["id"]})
    answer = at.chat_message[1]
    assert "holds nothing that answers this" in texts(answer.markdown)
    withheld = next(e for e in answer.expander if e.label.startswith("What the model wrote"))
    assert "XTuner runs on Google TPUs v5" in texts(withheld.markdown)
