"""Answers with sources, with the real default LLM (one model for the session) over xtuner."""

from __future__ import annotations

import json
from dataclasses import replace

import git as gitpython
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from kb.answer.chain import Answer, Answerer
from kb.answer.prompts import echo_at, format_context, heading_label, undecided_tail
from kb.citations import MARKER_RE, cited_numbers
from kb.search.engine import SearchEngine
from kb.search.hits import Hit, SearchOptions

from conftest import CORPUS


def test_markers_map_to_sources():
    assert cited_numbers("XTuner 是微调工具 [1]，支持 QLoRA [2][3]，见【4】和 [2, 5]；[9] 不存在", 5) == [1, 2, 3, 4, 5]
    assert cited_numbers("no markers", 3) == []
    hits = [Hit(rank=i, score=1.0, mode="hybrid", source="xtuner", path=f"p{i}.md", line_start=i, line_end=i + 2,
                commit="abc", url="", text=f"text {i}") for i in (1, 2)]
    ctx = format_context(hits)
    assert ctx.startswith("[1] xtuner/p1.md\ntext 1") and "[2] xtuner/p2.md\n" in ctx
    # the model cites by number: line numbers and a heading's badges are prompt tokens that tell it nothing
    badge = "Quick Start [![Open In Colab](https://colab.research.google.com/badge.svg)](https://colab.example/x)"
    assert heading_label(f"LMDeploy > {badge}") == "Quick Start"
    assert heading_label("Docs > [Install](docs/install.md) guide") == "Install guide"
    labelled = format_context([replace(hits[0], heading=f"LMDeploy > {badge}")])
    assert labelled.startswith("[1] xtuner/p1.md · Quick Start\n")


class RecordingChat(GenericFakeChatModel):
    """A scripted chat model for the wiring only (prompt and marker mapping); real models are tested below."""

    seen: list = []

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.seen.append(messages)
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def test_a_translated_question_is_searched_too_when_asked_for(tiny_kb):
    """With ``translate``, the model first writes the question in the other language (its first line only), and the
    search reads both; without it the model is asked once, for the answer."""
    from kb.answer.translate import first_line
    from kb.search.hits import ALSO_BM25

    tiny_kb.upload({"stripes.md": b"# Stripes\n\nThe quuxinator paints the zebra stripes.\n",
                    "zh.md": "# 说明\n\n这一页介绍斑马的条纹怎么画。\n".encode(),
                    **{f"note{i}.md": f"# Note {i}\n\nA page about topic {i}.\n".encode() for i in range(4)}}, "notes")
    engine = SearchEngine(tiny_kb)
    llm = RecordingChat(messages=iter([AIMessage("What paints the zebra stripes?\nNote: a translation."),
                                       AIMessage("The quuxinator paints the zebra stripes [1].")]))
    llm.seen.clear()
    stages: list[str] = []
    result = Answer(question="", answer="")
    for _ in Answerer(llm, engine, SearchOptions(k=2), translate=True).stream(
            "斑马的条纹用什么画？", result=result, on_stage=lambda name, res: stages.append(name)):
        pass
    assert stages[0] == "searching" and stages[-3:] == ["translated", "sources", "answering"], stages  # shown at once
    assert len(llm.seen) == 2 and "Translate the user's question into English" in llm.seen[0][0].content
    assert llm.seen[0][-1].content == "斑马的条纹用什么画？"
    assert result.also_as == "What paints the zebra stripes?" and result.as_dict()["also_as"] == result.also_as
    found = [h for h in result.chunks if h.path == "uploads/stripes.md"]
    assert found and ALSO_BM25 in found[0].found_by, [(h.path, h.found_by) for h in result.chunks]
    assert "notes/uploads/stripes.md" in llm.seen[1][-1].content

    llm = RecordingChat(messages=iter([AIMessage("The quuxinator paints the zebra stripes [1].")]))
    llm.seen.clear()
    plain = Answerer(llm, engine, SearchOptions(k=2)).ask("斑马的条纹用什么画？")
    assert len(llm.seen) == 1 and plain.also_as == "" and all(ALSO_BM25 not in h.found_by for h in plain.chunks)
    # the model writing the question back, or nothing, searches as asked; an English question goes to Chinese
    assert first_line("  斑马的条纹用什么画？ \n", "斑马的条纹用什么画？") == "" and first_line("\n\n", "q") == ""
    llm = RecordingChat(messages=iter([AIMessage("斑马的条纹用什么画？"), AIMessage("The quuxinator [1].")]))
    llm.seen.clear()
    english = Answerer(llm, engine, SearchOptions(k=2), translate=True).ask("What paints the zebra stripes?")
    assert "翻译成中文" in llm.seen[0][0].content and english.also_as == "斑马的条纹用什么画？"


def test_auto_translates_only_when_bm25_and_dense_disagree(tiny_kb, monkeypatch):
    """``translate="auto"``: the model is asked for the translation only when the two retrievers' first hits share
    no chunk; otherwise the question is searched as asked, with no generation before the search."""
    from kb.search.hits import Hit

    tiny_kb.upload({"stripes.md": b"# Stripes\n\nThe quuxinator paints the zebra stripes.\n",
                    **{f"note{i}.md": f"# Note {i}\n\nA page about topic {i}.\n".encode() for i in range(4)}}, "notes")
    engine = SearchEngine(tiny_kb)
    asked: list[str] = []
    for disagree, calls, also_as in ((True, 2, "What paints the zebra stripes?"), (False, 1, "")):
        monkeypatch.setattr(engine, "retrievers_disagree", lambda q, opts, d=disagree: asked.append(q) or d)
        llm = RecordingChat(messages=iter([AIMessage("What paints the zebra stripes?")] * (calls - 1)
                                          + [AIMessage("The quuxinator paints the zebra stripes [1].")]))
        llm.seen.clear()
        result = Answerer(llm, engine, SearchOptions(k=2), translate="auto").ask("斑马的条纹用什么画？")
        assert len(llm.seen) == calls and result.also_as == also_as, (disagree, result.also_as)
    assert asked == ["斑马的条纹用什么画？"] * 2
    # a single mode searches as asked: neither the check nor the translation runs
    llm = RecordingChat(messages=iter([AIMessage("The quuxinator [1].")]))
    llm.seen.clear()
    single = Answerer(llm, engine, SearchOptions(k=2, mode="bm25"), translate="auto").ask("What paints the zebra stripes?")
    assert len(llm.seen) == 1 and len(asked) == 2, (single.answer, single.chunks)

    # the check itself: BM25's and dense's first five, compared chunk by chunk
    def hit(path: str, line: int) -> Hit:
        return Hit(0, 0.0, "x", "notes", path, line, line, "c", "", "")

    found = {"bm25": [hit("a.md", 1), hit("b.md", 3)], "dense": [hit("b.md", 3)]}
    engine = SearchEngine(tiny_kb)
    seen_k: list[int] = []
    monkeypatch.setattr(engine, "_search", lambda q, o: seen_k.append(o.k) or found[o.mode])
    assert not engine.retrievers_disagree("q", SearchOptions(k=2)) and seen_k == [5, 5]
    found["dense"] = [hit("b.md", 4), hit("a.md", 2)]  # the same files, other chunks: they disagree
    assert engine.retrievers_disagree("q")
    found["bm25"] = []  # words found nothing, the meaning did: a question in the docs' other language
    assert engine.retrievers_disagree("q")
    found["dense"] = []  # filters that match nothing: nothing to disagree on (the Retrieval lab said they disagreed)
    assert not engine.retrievers_disagree("q")


def test_marker_wiring_and_threshold(xtuner_kb):
    engine = SearchEngine(xtuner_kb)
    llm = RecordingChat(messages=iter([AIMessage("XTuner 是一个微调工具库 [2]。")]))
    result = Answerer(llm, engine, SearchOptions(k=3)).ask("xtuner是什么？")
    system, prompt = llm.seen[-1][0].content, llm.seen[-1][-1].content
    assert "[1] xtuner/" in prompt and "[3] xtuner/" in prompt and "不要编造" in system
    assert len(result.sources) == 3 and result.sources[1].path in prompt.split("[2] xtuner/")[1].split("\n")[0]
    # none of its claims is in the lines it was shown: withheld behind one sentence naming the search
    assert result.declined and "没有找到" in result.answer and result.cited == []
    assert result.unverified == "XTuner 是一个微调工具库 [2]。" and not result.unverified_sentences[0].supported

    # a sentence the second source states, marked [2]: kept, and its marker maps to that source
    line = max(result.sources[1].text.splitlines(), key=len).strip()
    llm = RecordingChat(messages=iter([AIMessage(f"{line} [2]")]))
    kept = Answerer(llm, engine, SearchOptions(k=3)).ask("xtuner是什么？")
    assert not kept.declined and not kept.unverified and 2 in kept.cited, kept

    # the question written back as the answer asks, claims nothing: no citation, and withheld like an unfound claim
    echo = "xtuner支持哪些模型？"
    llm = RecordingChat(messages=iter([AIMessage(echo)]))
    asked = Answerer(llm, engine, SearchOptions(k=3)).ask(echo)
    assert asked.declined and "没有找到" in asked.answer and asked.cited == [] and asked.unverified == echo
    assert not asked.unverified_sentences[0].claim and not asked.unverified_sentences[0].supported

    # nothing passes the threshold: say so in the question's language, with what was searched; never ask the model
    llm.seen.clear()
    none = Answerer(llm, engine, SearchOptions(k=3, mode="dense", threshold=0.999)).ask("xtuner是什么？")
    assert none.declined and "没有找到" in none.answer and "xtuner是什么" in none.answer
    assert none.sources == [] and llm.seen == []


def test_the_prompt_written_back_is_found_where_it_starts():
    assert echo_at("abc\n\n[6] opencompass/docs/zh_cn/summarizer.md · 结果展示\n在评测完成后") == 5
    assert echo_at("abc\n问题：用 OpenCompass 把评测结果存到公共数据站时") == 4
    assert echo_at("见 [1] xtuner/README.md 的说明") is None  # a marker inside a sentence
    assert echo_at("[1] 支持 QLoRA 微调") is None and echo_at("Run `xtuner list-cfg`.") is None
    # a last line that may still become a label waits; one that can't any more goes out
    assert [undecided_tail("abc\n" + tail) for tail in ("[", "[6", "[6] ", "[6] opencompass", "问", "问题")] == \
        [1, 2, 4, 15, 1, 2]
    assert undecided_tail("abc\n[6] 支持 ") == undecided_tail("abc\nplain") == undecided_tail("abc [6") == 0


def test_an_answer_ends_where_it_writes_the_prompt_back(xtuner_kb):
    """After a code block the default model sometimes writes on as if it were the context: a sixth excerpt's label,
    copied lines, the question. None of it reaches the reader, and the model is stopped there."""
    engine = SearchEngine(xtuner_kb)
    first = Answerer(RecordingChat(messages=iter([AIMessage("x")])), engine, SearchOptions(k=3)).ask("xtuner是什么？")
    line = max(first.sources[0].text.splitlines(), key=len).strip()
    echo = ("\n\n[4] xtuner/docs/zh_cn/get_started/installation.md · 安装\npip install -U 'xtuner[deepspeed]'\n\n"
            "问题：xtuner是什么？")
    script = f"{line} [1]\n\n```bash\nxtuner list-cfg\n```{echo}"
    streamed, result = [], Answer(question="", answer="")
    answerer = Answerer(RecordingChat(messages=iter([AIMessage(script)])), engine, SearchOptions(k=3))
    for piece in answerer.stream("xtuner是什么？", result=result):
        streamed.append(piece)
    shown = "".join(streamed)
    assert shown.rstrip().endswith("```") and "[4] xtuner/" not in shown and "问题" not in shown, shown
    assert result.answer == script[: script.index(echo)] and not result.declined


def test_ask_cites_the_gold_file_with_real_lines(xtuner_kb, default_chat_model):
    """The real models end to end: a dev question's answer streams and cites its gold file, with lines inside it."""
    q = next(json.loads(l) for l in (CORPUS / "dev_questions.jsonl").read_text().splitlines() if '"dev-xtuner-02"' in l)
    engine = SearchEngine(xtuner_kb)
    result = Answer(question="", answer="")
    pieces = list(Answerer(default_chat_model, engine, SearchOptions(k=5)).stream(q["question"], result=result))
    assert len(pieces) > 1 and result.answer.strip()
    # an answer, not only a marker ("[1]" or "[n]" alone came back from the tutorial's wording)
    assert len(MARKER_RE.sub("", result.answer).strip(" []n。.")) >= 10, result.answer
    assert result.first_token_seconds is not None
    gold = [h for h in result.sources if h.path == q["path"]]
    assert gold, [h.citation for h in result.sources]
    repo = gitpython.Repo(xtuner_kb.manifest.source("xtuner").repo_path)
    n_lines = len((repo.commit(gold[0].commit).tree / q["path"]).data_stream.read().decode().splitlines())
    assert 1 <= gold[0].line_start <= gold[0].line_end <= n_lines
    assert gold[0].url.startswith("https://gitee.com/InternLM/xtuner/blob/")


def test_no_rag_does_not_touch_the_index(default_chat_model):
    class Untouchable:
        def search(self, *a, **k):
            raise AssertionError("the index was used")

    result = Answerer(default_chat_model, Untouchable()).ask("你是谁", rag=False)  # type: ignore[arg-type]
    assert result.answer.strip() and result.sources == [] and result.rag is False


def test_follow_up_is_rewritten_before_retrieval(xtuner_kb, default_chat_model):
    history = [("user", "xtuner是什么？"), ("assistant", "XTuner 是一个大模型微调工具库。")]
    result = Answerer(default_chat_model, SearchEngine(xtuner_kb), SearchOptions(k=3)).ask("它支持哪些模型？", history)
    assert result.standalone_question and result.standalone_question != "它支持哪些模型？"
    assert result.sources and result.answer


def test_answer_evaluation_scores_facts_citations_and_declines(xtuner_kb):
    """`kb eval --answers` bookkeeping on scripted answers: the scoring, not the model, is under test here."""
    from kb.answer.evaluate import declines, evaluate_answers, states_facts

    assert states_facts("XTuner 支持 Q LoRA 与 全量微调", [["qlora"], ["全量", "full"]])
    assert not states_facts("XTuner 支持 LoRA", [["qlora"]])
    assert declines("资料中没有提到这一点。") and declines("The sources do not mention pricing.")
    assert not declines("XTuner 支持 QLoRA [1]。")
    engine = SearchEngine(xtuner_kb)
    questions = [
        {"id": "a", "question": "What is XTuner?", "repo": "xtuner", "path": "README.md", "line_start": 36,
         "line_end": 38, "gold": [{"path": "README.md", "line_start": 36, "line_end": 38},
                                  {"path": "README_zh-CN.md", "line_start": 41, "line_end": 43}],
         "facts": [["training engine", "训练引擎"], ["moe"]]},
        {"id": "b", "question": "XTuner 企业版多少钱？", "repo": "xtuner", "path": "", "line_start": 0, "line_end": 0,
         "answerable": False},
    ]
    hits = engine.search("What is XTuner?", SearchOptions(k=3))
    gold_n = next(h.rank for h in hits if h.path == "README.md" and h.line_start <= 38 and h.line_end >= 36)
    llm = RecordingChat(messages=iter([AIMessage(f"XTuner V1 is a next-generation training engine for MoE models [{gold_n}]."),
                                       AIMessage("资料中没有提到企业版的价格。")]))
    report = evaluate_answers(Answerer(llm, engine, SearchOptions(k=3)), questions, SearchOptions(k=3))
    assert (report["n"], report["facts"], report["gold_cited"], report["declined"]) == (2, 1.0, 1.0, 1.0)
    assert gold_n in report["rows"][0]["cited"] and report["ttft_median"] is not None
    # the excerpts the model read held the facts (so a miss would be the model's), and the share says so
    assert report["rows"][0]["facts_shown"] is True and report["facts_shown"] == 1.0
    assert "facts_shown" not in report["rows"][1], "an unanswerable question has no facts to show"
    assert {"n", "facts", "gold_cited", "declined", "ttft_median", "seconds_median", "k", "mode", "rows"} <= set(report)
