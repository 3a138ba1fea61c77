"""Document-level retrieval signals and the multi-location, per-category evaluation (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from langchain_core.documents import Document

from kb.errors import KBError
from kb.evaluate import evaluate, gold_locations, is_hit, load_questions, scores
from kb.search import signals
from kb.search.bm25 import BM25Matrix
from kb.words import language_of
from kb.search.hits import Hit, SearchOptions
from kb.words import tokenize


def hit(source="xtuner", path="README.md", a=1, b=10, text="some text " * 10, score=1.0) -> Hit:
    return Hit(rank=0, score=score, mode="hybrid", source=source, path=path, line_start=a, line_end=b,
               commit="c0ffee", url="", text=text, found_by=["dense"])


CHUNKS = [
    ("xtuner", "XTuner is a toolkit to fine-tune large models; xtuner supports QLoRA"),
    ("xtuner", "xtuner train config with deepspeed"),
    ("xtuner", "install xtuner with pip"),
    ("lmdeploy", "LMDeploy deploys models; lmdeploy serve api_server"),
    ("lmdeploy", "lmdeploy quantization with awq"),
    ("lmdeploy", "pip install lmdeploy"),
    ("InternLM", "InternLM chat models can be fine-tuned with xtuner and served by lmdeploy"),
    ("InternLM", "InternLM2.5 long context of one million tokens"),
    ("InternLM", "InternLM model zoo and model cards"),
    ("InternLM", "InternLM3 deep thinking mode"),
    ("InternLM-XComposer", "浦语·灵笔 InternLM-XComposer 多模态 模型"),
    ("InternLM-XComposer", "浦语·灵笔2.5 支持 长 上下文"),
]
ALIASES = {"xtuner": {"xtuner"}, "lmdeploy": {"lmdeploy"}, "InternLM": {"internlm"},
           "InternLM-XComposer": {"internlm", "xcomposer", "浦语", "灵笔"}}


@pytest.fixture(scope="module")
def corpus():
    return BM25Matrix([tokenize(t) for _, t in CHUNKS]), signals.Sources(np.asarray([s for s, _ in CHUNKS], dtype=object))


@pytest.mark.parametrize("question,named", [
    ("xtuner是什么？", ["xtuner"]),
    ("What is LMDeploy?", ["lmdeploy"]),
    ("浦语·灵笔2.5 是什么？", ["InternLM-XComposer"]),
    ("What is InternLM-XComposer?", ["InternLM-XComposer"]),  # not also InternLM: its word is part of the longer name
    ("How do I install it with pip?", []),  # "install" and "pip" name no source
    ("What is deep thinking mode in InternLM3?", ["InternLM"]),  # the name with its version run on
])
def test_named_sources(corpus, question, named):
    matrix, sources = corpus
    assert signals.named_sources(matrix, sources, tokenize(question), ALIASES) == named


def test_asked_about_leaves_what_the_question_is_about():
    assert signals.asked_about(tokenize("xtuner是什么？"), ["xtuner"], ALIASES) == []
    assert signals.asked_about(tokenize("Which models can I deploy with LMDeploy?"), ["lmdeploy"], ALIASES) == ["models"]
    assert signals.asked_about(tokenize("浦语·灵笔2.5 是什么？"), ["InternLM-XComposer"], ALIASES) == []
    assert signals.asked_about(tokenize("opencompass 是干嘛的？"), ["opencompass"], {"opencompass": {"opencompass"}}) == []
    assert signals.asked_about(tokenize("How do I install XTuner?"), ["xtuner"], ALIASES) == ["install"]
    assert signals.asked_about(tokenize("InternLM3 是什么？"), ["InternLM"], ALIASES) == []
    # who asks is not what is asked: a newcomer's "第一次" must not fade OpenCompass's README install section away
    oc = {"opencompass": {"opencompass"}}
    assert signals.asked_about(tokenize("第一次用 OpenCompass，安装步骤是怎样的？"), ["opencompass"], oc) == ["安装", "步骤"]
    assert signals.asked_about(tokenize("我是新手，xtuner 怎么装？"), ["xtuner"], ALIASES) == ["装"]


def test_a_question_for_the_feature_list_asks_for_a_summary():
    summary = lambda q, src: signals.asks_for_summary(signals.asked_about(tokenize(q), [src], ALIASES))  # noqa: E731
    assert summary("XTuner 有哪些核心功能？", "xtuner") and summary("What are the highlights of XTuner?", "xtuner")
    assert summary("XTuner V1 的主要特性是什么？", "xtuner")  # a version of the name is the name
    assert summary("What are the main selling points of XTuner?", "xtuner")
    assert summary("What is special about XTuner?", "xtuner") and summary("XTuner 到底有什么特别？", "xtuner")
    assert not summary("xtuner是什么？", "xtuner"), "nothing asked: definitional, not a summary"
    assert not summary("XTuner 的 FP8 训练有什么优势？", "xtuner"), "a feature named: a specific question"
    assert not summary("How do I install XTuner?", "xtuner")


def test_a_model_named_in_full_is_its_source_named():
    assert signals.name_compounds("InternLM3-8B-Instruct 有哪些亮点？", ["InternLM"], ALIASES) >= {"8b", "instruct"}
    assert signals.name_compounds("What is InternLM2.5-7B-Chat-1M?", ["InternLM"], ALIASES) >= {"7b", "chat", "1m"}
    assert not signals.name_compounds("Does XTuner support Llama-3-8B?", ["xtuner"], ALIASES), "another model's name"
    q = "InternLM3-8B-Instruct 有哪些亮点？"
    assert signals.asked_about(tokenize(q), ["InternLM"], ALIASES, q) == ["有", "亮点"]


def test_a_bracket_glossing_the_name_is_the_source_named_again(corpus):
    """blind22's "OpenCompass（司南）是什么？它的主要特点有哪些？" left "司南" asked about: a word the corpus holds only in
    OpenCompass's pages, so rare that the README signals faded to nothing and the introduction fell out of the five."""
    matrix, sources = corpus
    q = "xtuner（QLoRA）是什么？它的主要特点有哪些？"  # "qlora" lives in xtuner's chunks only, as 司南 in OpenCompass's
    plain, asides = signals.name_asides(q, "xtuner", ALIASES, matrix, sources)
    assert plain == "xtuner是什么？它的主要特点有哪些？" and asides == {"qlora"}
    assert signals.asks_for_summary(signals.asked_about(tokenize(q), ["xtuner"], ALIASES, q, asides))
    assert signals.names_subject(plain, ALIASES["xtuner"]) and not signals.names_subject(q, ALIASES["xtuner"])
    # a qualifier, not a name: "pip" lives in two sources alike ("XTuner (legacy docs)" in the question sets)
    assert signals.name_asides("xtuner (pip) 怎么装？", "xtuner", ALIASES, matrix, sources)[1] == set()
    # after something that isn't the source's name, or too long to be a name
    assert signals.name_asides("the toolkit (qlora) 是什么？", "xtuner", ALIASES, matrix, sources)[1] == set()
    assert signals.name_asides("xtuner (qlora qlora qlora qlora)", "xtuner", ALIASES, matrix, sources)[1] == set()


def test_readme_title_and_root_readmes():
    assert signals.readme_title("<p>\n    <b><font size=\"6\">浦语·灵笔2.5</font></b>\n</p>") == "浦语·灵笔2.5"
    assert signals.readme_title("badges\n# InternLM\n\n## Introduction") == "InternLM"
    # the code name as the heading and the spoken name in a banner: both name the source
    assert signals.readme_title("# InternLM\n<div>\n<b><font size=\"5\">书生·浦语 官网</font></b>") == "InternLM · 书生·浦语 官网"
    assert signals.is_root_readme("README_zh-CN.md") and signals.is_root_readme("README.md")
    assert not signals.is_root_readme("docs/README.md") and not signals.is_root_readme("READMEX.md")


def test_empty_hits_are_headings_and_markup_only():
    assert signals.is_empty(hit(text="# 已支持的模型"))
    assert signals.is_empty(hit(text="## Models\n[![badge](https://img.shields.io/x)](https://x.org) <img src=a>"))
    assert not signals.is_empty(hit(text="# Models\nXTuner supports InternLM2, Llama 3 and Qwen models."))


def test_query_language():
    assert language_of("xtuner是什么？") == "zh"
    assert language_of("What is XTuner?") == "en"


def test_near_duplicates_collapse_to_the_copy_in_the_questions_language():
    intro = "XTuner is an efficient, flexible and full-featured toolkit for fine-tuning large models. " * 3
    hits = [hit(path="docs/en/get_started/overview.md", text=intro, score=3.0),
            hit(path="docs/zh_cn/get_started/overview.md", text="XTuner 是一个高效、灵活、全能的轻量化大模型微调工具库。" * 3, score=2.5),
            hit(path="README.md", text=intro.replace("toolkit", "toolkit,"), score=2.0),
            hit(path="docs/en/other.md", text="QLoRA needs bitsandbytes and a GPU with enough memory. " * 3, score=1.0)]
    out = signals.collapse_duplicates(hits, "en")
    assert [h.path for h in out] == ["README.md", "docs/zh_cn/get_started/overview.md", "docs/en/other.md"]
    assert out[0].score == 3.0  # the kept copy takes the group's best place
    assert len(signals.collapse_duplicates(hits, "zh")) == 3  # another language's copy is not a duplicate


def test_opening_prefers_the_introduction_in_the_questions_language():
    def doc(path, a, heading, words):
        return Document(page_content=" ".join(["word"] * words), id=f"{path}:{a}",
                        metadata={"path": path, "line_start": a, "line_end": a + 5, "heading": heading})
    docs = [doc("README.md", 1, "", 3), doc("README.md", 10, "News", 80), doc("README.md", 40, "Introduction", 90),
            doc("README_zh-CN.md", 1, "", 3), doc("README_zh-CN.md", 40, "InternLM > 简介", 90)]
    assert [d.id for d in signals.opening(docs, "en", 2)] == ["README.md:40", "README.md:10"]
    assert [d.id for d in signals.opening(docs, "zh", 1)] == ["README_zh-CN.md:40"]


def test_gold_may_list_several_locations(tmp_path):
    q = {"id": "q", "question": "?", "repo": "xtuner", "path": "README.md", "line_start": 36, "line_end": 38,
         "gold": [{"path": "README.md", "line_start": 36, "line_end": 38},
                  {"path": "README_zh-CN.md", "line_start": 41, "line_end": 43}]}
    assert gold_locations(q) == [("README.md", 36, 38), ("README_zh-CN.md", 41, 43)]
    assert is_hit(hit(path="README_zh-CN.md", a=29, b=43), q)
    assert not is_hit(hit(path="README_zh-CN.md", a=44, b=60), q)
    assert not is_hit(hit(source="lmdeploy", path="README.md", a=30, b=40), q)
    single = {k: v for k, v in q.items() if k != "gold"}  # the single-location fields stay valid
    assert is_hit(hit(path="README.md", a=30, b=36), single) and not is_hit(hit(path="README_zh-CN.md", a=41, b=43), single)
    # a location may name its own repo: the InternLM repo's page on XTuner answers an XTuner question too
    elsewhere = dict(q, gold=[*q["gold"], {"repo": "InternLM", "path": "finetune/README.md", "line_start": 5,
                                            "line_end": 9}])
    assert is_hit(hit(source="InternLM", path="finetune/README.md", a=1, b=6), elsewhere)
    assert not is_hit(hit(source="xtuner", path="finetune/README.md", a=1, b=6), elsewhere)
    assert not is_hit(hit(source="InternLM", path="README.md", a=30, b=40), elsewhere)
    bad = tmp_path / "bad.jsonl"
    for gold in ([{"path": "README.md"}], [{"repo": 3, "path": "README.md", "line_start": 1, "line_end": 2}]):
        bad.write_text(json.dumps({**q, "gold": gold}) + "\n")
        with pytest.raises(KBError, match="gold"):
            load_questions(bad)


class FakeEngine:
    """Hits by question text: enough to score the evaluation's bookkeeping without a model."""

    kb = None

    def __init__(self, answers):
        self.answers = answers

    def search(self, query, opts):
        hits = self.answers.get(query, [])
        for r, h in enumerate(hits, 1):
            h.rank = r
        return hits


def test_evaluation_reports_per_category_and_skips_unanswerable(monkeypatch):
    monkeypatch.setattr("kb.evaluate.gold_passage", lambda kb, q: "")
    qs = [
        {"id": "a", "question": "what is x", "repo": "xtuner", "path": "README.md", "line_start": 1, "line_end": 5, "category": "overview"},
        {"id": "b", "question": "deep fact", "repo": "xtuner", "path": "docs/a.md", "line_start": 10, "line_end": 12},
        {"id": "c", "question": "no answer", "repo": "xtuner", "path": "", "line_start": 0, "line_end": 0, "answerable": False},
    ]
    engine = FakeEngine({"what is x": [hit(path="docs/b.md"), hit(path="README.md", a=1, b=3)],
                         "deep fact": [hit(path="docs/a.md", a=11, b=20)]})
    report = evaluate(engine, qs, SearchOptions(k=5))
    assert report["n"] == 2 and report["hit@1"] == 0.5 and report["hit@k"] == 1.0 and report["mrr"] == 0.75
    assert report["by_category"] == {"overview": {"n": 1, "hit@1": 0.0, "hit@k": 1.0, "mrr": 0.5},
                                     "specific": {"n": 1, "hit@1": 1.0, "hit@k": 1.0, "mrr": 1.0}}
    assert scores([1, None, 2, None]) == {"n": 4, "hit@1": 0.25, "hit@k": 0.5, "mrr": 0.375}


def _doc(path, a, heading, text):
    return Document(page_content=text, id=f"{path}:{a}",
                    metadata={"path": path, "line_start": a, "line_end": a + 5, "heading": heading})


def test_opening_finds_an_introduction_heading_inside_a_chunk():
    filler = " ".join(["news"] * 40)
    docs = [_doc("README.md", 10, "Latest News", filler), _doc("README.md", 30, "Latest News", filler),
            _doc("README.md", 60, "Latest News", filler + "\n\n# Introduction\n\nLMDeploy is a toolkit.")]
    assert [d.id for d in signals.opening(docs, "en", 1)] == ["README.md:60"]


def test_readme_sections_rank_a_matching_section_title_first_and_match_word_stems():
    body = " ".join(["text"] * 40)
    docs = [_doc("README.md", 10, "News", body + " we now support installing on Ascend with pip"),
            _doc("README.md", 50, "Quick Start > Installation", "## Installation\n" + body + " pip"),
            _doc("README.md", 90, "Supported Models", "## Supported Models\n" + body + " Llama Qwen"),
            _doc("README.md", 120, "License", body)]
    assert [d.id for d in signals.readme_sections(docs, "en", ["install"], 3)] == ["README.md:50", "README.md:10"]
    assert [d.id for d in signals.readme_sections(docs, "en", ["models", "support"], 3)][0] == "README.md:90"
    assert signals.readme_sections(docs, "en", ["license"], 3)[0].id == "README.md:120"
    assert signals.readme_sections(docs, "en", ["quantization"], 3) == []  # no chunk holds it


def test_a_chinese_question_finds_the_section_of_an_english_only_readme_and_back():
    body = " ".join(["text"] * 40)
    docs = [_doc("README.md", 10, "Quick Start > Installation", "## Installation\n" + body + " pip"),
            _doc("README.md", 120, "License", "## License\n" + body + " Apache 2.0")]
    # "Lagent 采用什么开源协议？": no Chinese copy, and only the section words cross the languages
    assert signals.readme_sections(docs, "zh", ["采用", "开源", "协议"], 2)[0].id == "README.md:120"
    assert signals.readme_sections(docs, "zh", ["安装"], 2)[0].id == "README.md:10"
    zh = [_doc("README_zh-CN.md", 10, "许可证", "## 许可证\n" + body + " Apache 2.0")]
    assert signals.readme_sections(zh, "en", ["license"], 1)[0].id == "README_zh-CN.md:10"
    assert signals.readme_sections(docs, "zh", ["采用"], 2) == []  # not a section word: no crossing


def test_a_section_word_finds_its_siblings_in_the_same_language():
    """"How do I cite InternLM?": "cite" is no stem of the "Citation" heading, but both name one kind of section."""
    from kb.search.section_words import equivalents

    assert {"citation", "bibtex", "引用"} <= equivalents("cite") and "cite" not in equivalents("cite")
    assert {"协议", "许可证", "license"} <= equivalents("许可")
    assert equivalents("采用") == frozenset()  # not a section word
    body = " ".join(["text"] * 40)
    docs = [_doc("README.md", 10, "News", body + " our paper is out"),
            _doc("README.md", 560, "Citation", "## Citation\n" + body + " @misc{cai2024internlm2,")]
    assert signals.readme_sections(docs, "en", ["cite", "paper"], 2)[0].id == "README.md:560"


def test_opening_without_an_introduction_heading_is_the_chunk_that_defines_the_project():
    filler = " ".join(["release"] * 40)
    docs = [_doc("README.md", 30, "🔥 News", "We release **XComposer2.5-Reward**, a reward model. " + filler),
            _doc("README.md", 40, "Projects", "> [**DualFocus**](x): a project\n" + filler),
            _doc("README.md", 60, "Projects", "> [**ShareGPT4V**](y)\n\n**InternLM-XComposer-2.5** excels in various "
                 "text-image comprehension and composition applications with a 7B LLM backend. " + filler)]
    names = frozenset({"internlm", "xcomposer"})
    assert [d.id for d in signals.opening(docs, "en", 2, names)] == ["README.md:60", "README.md:30"]
    assert [d.id for d in signals.opening(docs, "en", 1)] == ["README.md:30"], "no names: the first chunk"


def test_a_tables_header_labels_its_chunk_as_a_heading_does():
    body = " ".join(["text"] * 40)
    docs = [_doc("README.md", 40, "Key Features", "### Key Features\n" + body + " train models, support MoE"),
            _doc("README.md", 68, "Training Engine", "### Training Engine\n" + body +
                 "\n| Model | GPU(FP8) | NPU |\n|-------|---|---|\n| Qwen3 | ✅ | ✅ |")]
    # both hold "model(s)" and the features also "support"; the table's header says which one lists models
    assert signals.readme_sections(docs, "en", ["models", "support"], 2)[0].id == "README.md:68"


def test_a_readme_section_holding_every_asked_word_is_that_readmes_answer():
    chunk = _doc("README.md", 50, "Features", "Train on Ascend NPU and GPUs with XTuner V1.")
    assert signals.holds_all(chunk, ["train", "ascend", "npu"])
    assert not signals.holds_all(chunk, ["train", "huawei"]) and not signals.holds_all(chunk, [])


def test_a_word_written_as_code_is_an_option_and_a_readme_that_never_writes_it_cannot_explain_it():
    assert signals.code_words("微调时 max_length 默认是多少？") == ["max_length"]
    assert signals.code_words("What is the difference between --hf-num-gpus and --max-num-worker?") == [
        "--hf-num-gpus", "--max-num-worker"]
    # names with hyphens, versions, short flags and plain words are not options
    for question in ("What is InternLM2.5-7B-Chat-1M?", "pip install -e .", "lmdeploy 怎么装", "x-ray of e-mail"):
        assert signals.code_words(question) == [], question
    readme = [_doc("README.md", 254, "Usage", "Use `--hf-num-gpus` for a model's GPUs.")]
    assert not signals.writes_none(readme, ["--HF-num-gpus"])
    assert signals.writes_none(readme, ["max_length"])


@pytest.mark.parametrize("question,expected", [
    ("xtuner是什么？", True), ("InternLM 是干什么的？", True), ("What is LMDeploy?", True), ("What's Lagent?", True),
    ("介绍一下 OpenCompass", True), ("How do I install LMDeploy?", False), ("xtuner支持哪些模型？", False),
    ("Can you give me a quick intro to InternLM3?", True), ("An overview of XTuner, please", True),
    ("Lagent 简介", True), ("Where is the intro video?", False),
])
def test_definitional_questions(question, expected):
    assert signals.definitional(question) is expected


@pytest.mark.parametrize("question,expected", [
    ("what is xtuner v1 actually for? is it just another finetuning toolkit?", True),
    ("What's InternLM3 and who made it?", True), ("浦语·灵笔2.5 是什么？主要能干些啥", True),
    ("什么是 LMDeploy，它支持哪些模型？", True), ("InternLM 是什么？书生·浦语大模型是干什么的？", True),
    ("What is the default port of LMDeploy?", False), ("What is LMDeploy's TurboMind?", False),
    ("What's XTuner’s licence?", False),
    ("lmdeploy 的 turbomind 是什么", False), ("xtuner支持哪些模型？", False),
    ("Can you give me a quick intro to InternLM3 - how big is the instruct model?", True),
    ("an introduction to the config system of xtuner", False),
])
def test_a_question_asking_what_the_source_itself_is_names_its_subject(question, expected):
    # the asking words beside the name: its opening answers, whatever the question goes on to ask
    names = set().union(*ALIASES.values())
    assert signals.names_subject(question, names) is expected


def test_a_name_of_three_parts_has_the_short_forms_its_docs_write():
    assert "ixc" in signals.acronyms("InternLM-XComposer-2.5"), "IXC-2.5, IXC2.5-OL: the XComposer docs' own short form"
    assert signals.acronyms("InternLM-XComposer") == {"ixc", "ilc", "ilxc"}
    assert not signals.acronyms("LMDeploy") and not signals.acronyms("OpenCompass"), "two parts: no short form"
    assert not signals.acronyms("InternLM · 书生·浦语 官网"), "a title's names are taken one by one"


def test_a_file_in_a_hidden_folder_is_a_tools_not_the_users():
    assert signals.is_hidden(".claude/skills/add_hf_model/SKILL.md") and signals.is_hidden("docs/.github/x.md")
    assert not signals.is_hidden("README.md") and not signals.is_hidden("docs/en/get_started/installation.md")
    assert not signals.is_hidden(".README.md"), "only folders count: a file's own name is its business"


def test_facts_at_k_counts_the_key_facts_in_any_hit_from_any_file(monkeypatch):
    monkeypatch.setattr("kb.evaluate.gold_passage", lambda kb, q: "")
    qs = [
        {"id": "a", "question": "install", "repo": "xtuner", "path": "README.md", "line_start": 1, "line_end": 5,
         "category": "overview", "facts": [["pip install xtuner"], ["3.10", "3.11"]]},
        {"id": "b", "question": "deep", "repo": "xtuner", "path": "docs/a.md", "line_start": 10, "line_end": 12,
         "facts": [["QLoRA"]]},
        {"id": "c", "question": "no facts listed", "repo": "xtuner", "path": "docs/a.md", "line_start": 1, "line_end": 2},
    ]
    engine = FakeEngine({
        # the gold lines missed, but another copy states both facts across two hits (spaces and case ignored)
        "install": [hit(path="docs/install.md", text="Run `PIP install  xtuner`"), hit(path="docs/b.md", text="Python 3.10")],
        "deep": [hit(path="docs/a.md", a=10, b=12, text="full fine-tuning only")],
        "no facts listed": [hit(path="docs/a.md", a=1, b=2)],
    })
    report = evaluate(engine, qs, SearchOptions(k=5))
    assert report["hit@k"] == round(2 / 3, 4) and report["facts@k"] == 0.5  # of the two questions that list facts
    assert report["by_category"]["overview"]["facts@k"] == 1.0 and report["by_category"]["overview"]["hit@k"] == 0.0
    assert report["by_category"]["specific"]["facts@k"] == 0.0
    assert [r["facts_in_hits"] for r in report["results"]] == [True, False, None]


NAMES = {"lmdeploy", "opencompass", "xtuner", "lagent", "internlm", "浦语"}
CORPUS_WORDS = {"agent", "open", "compass", "deploy", "tuner", "install"}


@pytest.mark.parametrize("question, expected", [
    ("lmdepoy keeps downloading from huggingface", "lmdeploy keeps downloading from huggingface"),  # a letter lost
    ("lagnet 怎么装", "lagent 怎么装"),  # two swapped
    ("xtunner 支持哪些模型", "xtuner 支持哪些模型"),  # one added
    ("how many datasets does open compass cover", "how many datasets does opencompass cover"),  # split
    ("X-Tuner 是什么", "XTuner 是什么"),
    ("what is an agent in lagent", "what is an agent in lagent"),  # a word the docs use stays, however close
    ("install opencompass", "install opencompass"),
    ("浦语 是什么", "浦语 是什么"),
])
def test_a_slipped_or_split_source_name_is_searched_as_the_docs_write_it(question, expected):
    assert signals.respell(question, NAMES, CORPUS_WORDS.__contains__) == expected


def test_one_slip_is_one_edit_or_one_swap():
    assert signals.one_slip("lmdepoy", "lmdeploy") and signals.one_slip("mldeploy", "lmdeploy")
    assert signals.one_slip("lmdeployy", "lmdeploy") and signals.one_slip("lxdeploy", "lmdeploy")
    assert not signals.one_slip("lmdeploy", "lmdeploy")
    assert not signals.one_slip("ldmepoly", "lmdeploy")  # two slips
    assert not signals.one_slip("deploy", "lmdeploy")


@pytest.mark.parametrize("question, expected", [
    ("What's the most recent update announced for OpenCompass?", True),
    ("What's new in LMDeploy?", True),
    ("xtuner 最近有哪些新进展？", True),
    ("InternLM 最新发布的是哪个模型？", True),
    ("What are the latest news of Lagent?", True),
    ("How do I update the weights of an lmdeploy server online?", False),
    ("How do I add a new dataset to OpenCompass?", False),
    ("lmdeploy 支持在线更新权重吗？", False),
    ("What does cache_max_entry_count default to in recent versions of LMDeploy?", False),
    ("最新版本的 xtuner 需要什么依赖？", False),
])
def test_a_question_about_what_is_recent_asks_for_news(question, expected):
    assert signals.asks_for_news(question) is expected


def test_news_section_is_the_first_chunks_under_a_news_heading_in_the_questions_language():
    filler = " ".join(["word"] * 40)
    docs = [_doc("README.md", 1, "", filler + "\n\n## Welcome\n\nOpenCompass is a platform."),
            _doc("README.md", 20, "Welcome", filler + "\n\n## 🚀 What's New <a><img src='x.png'></a>\n\n- [2026.02.05] A"),
            _doc("README.md", 30, "🚀 What's New", filler + " [2025.12.08] B"),
            _doc("README.md", 40, "🚀 What's New", filler + " [2025.07.26] C"),
            _doc("README.md", 60, "Installation", filler + " update pip"),
            _doc("README_zh-CN.md", 20, "", filler + "\n\n## 🚀 最新进展\n\n- [2026.02.05] 甲"),
            _doc("README_zh-CN.md", 30, "🚀 最新进展", filler + " [2025.12.08] 乙")]
    assert [d.id for d in signals.news_section(docs, "en", 2)] == ["README.md:20", "README.md:30"]
    assert [d.id for d in signals.news_section(docs, "zh", 1)] == ["README_zh-CN.md:20"]
    assert signals.news_section(docs[:1] + docs[4:5], "en", 2) == []  # no news heading: no list
