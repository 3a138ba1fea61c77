"""The feedback loop (kb/feedback.py): rated chat answers listed, a thumbs-down turned into a question that the
evaluation reads like any shipped question set; and the evaluation's run bookkeeping it relies on."""

from __future__ import annotations

import json
import time

import pytest

from conftest import base_settings
from kb.conversations import ConversationStore
from kb.errors import KBError
from kb.evaluate import (FEEDBACK_LABEL, feedback_questions, gold_locations, load_questions, past_runs, run_label,
                         save_run, shipped_sets, split_indexed)
from kb.feedback import add_question, parse_facts, rated_answers

HIT = {"rank": 1, "score": 0.03, "mode": "hybrid", "source": "xtuner", "path": "docs/en/install.md",
       "line_start": 3, "line_end": 9, "commit": "abc123", "url": "", "text": "pip install xtuner", "heading": ""}


def conversation(store: ConversationStore, *turns: tuple[str, dict]) -> dict:
    conv = store.new()
    for question, reply in turns:
        conv["messages"] += [{"role": "user", "content": question},
                             {"role": "assistant", "question": question, "rag": True, **reply}]
    store.save(conv)
    return conv


def test_rated_answers_newest_first(tmp_path):
    store = ConversationStore(tmp_path)
    now = time.time()
    one = conversation(
        store,
        ("How do I install xtuner?", {"content": "Use pip [1].", "sources": [HIT], "cited": [1],
                                      "feedback": {"score": 0, "comment": "wrong file", "at": now - 60}}),
        ("And QLoRA?", {"content": "It supports QLoRA.", "sources": [], "cited": []}),  # not rated
    )
    two = conversation(store, ("xtuner是什么？", {"content": "一个微调工具。", "sources": [HIT], "cited": [],
                                                 "feedback": {"score": 1, "comment": "", "at": now}}))
    # a rating on a message without its question: the user message before it is the question
    conv = store.new()
    conv["messages"] = [{"role": "user", "content": "What is lagent?"},
                        {"role": "assistant", "content": "An agent framework.", "feedback": {"score": 0, "at": now - 5}},
                        {"role": "assistant", "content": "bad rating", "feedback": {"score": 7, "at": now}},
                        {"role": "assistant", "content": "bool rating", "feedback": {"score": True, "at": now}},
                        {"role": "assistant", "content": "no dict", "feedback": "up"}]
    store.save(conv)
    (tmp_path / "conversations" / "20250101-000000-abcdef.json").write_text("{broken")

    rated = rated_answers(tmp_path)
    assert [r["question"] for r in rated] == ["xtuner是什么？", "What is lagent?", "How do I install xtuner?"]
    assert [r["score"] for r in rated] == [1, 0, 0]
    down = rated[2]
    assert down["answer"] == "Use pip [1]." and down["comment"] == "wrong file" and down["cited"] == [1]
    assert down["sources"][0]["path"] == "docs/en/install.md" and down["conversation"] == one["id"]
    assert down["message"] == 1 and down["when"] == pytest.approx(now - 60)
    assert rated[0]["conversation"] == two["id"] and rated[1]["comment"] == ""
    assert [r["searched"] for r in rated] == [r["question"] for r in rated]  # no follow-up: as asked
    assert rated_answers(tmp_path / "nowhere") == []


def test_a_rated_follow_up_is_offered_as_it_was_searched(tmp_path):
    """"它支持哪些模型？" means nothing in a question set; the rewrite that was searched does (a review found it)."""
    store = ConversationStore(tmp_path)
    conversation(store, ("它支持哪些模型？", {"content": "…", "sources": [HIT], "cited": [], "standalone": "LMDeploy 支持哪些模型？",
                                           "feedback": {"score": 0, "comment": "", "at": time.time()}}))
    (r,) = rated_answers(tmp_path)
    assert r["question"] == "它支持哪些模型？" and r["searched"] == "LMDeploy 支持哪些模型？"


def test_add_question_writes_the_question_format(tmp_path):
    path = add_question(tmp_path, "  How do I install   xtuner? ",
                        [{"source": "xtuner", "path": "docs/en/install.md", "line_start": 3, "line_end": 9},
                         {"path": "docs/zh_cn/install.md", "line_start": "4", "line_end": 10}],
                        facts=[["pip install xtuner", "pip install -U xtuner"], "xtuner"], conversation="c1")
    assert path == feedback_questions(tmp_path) == tmp_path / "questions" / "feedback.jsonl"
    (q,) = load_questions(path)  # read as every question set is
    assert q["id"] == "feedback-001" and q["question"] == "How do I install xtuner?" and q["lang"] == "en"
    assert (q["repo"], q["path"], q["line_start"], q["line_end"]) == ("xtuner", "docs/en/install.md", 3, 9)
    assert gold_locations(q) == [("docs/en/install.md", 3, 9), ("docs/zh_cn/install.md", 4, 10)]
    assert q["facts"] == [["pip install xtuner", "pip install -U xtuner"], ["xtuner"]]
    assert q["origin"] == "feedback" and q["conversation"] == "c1"

    # the next one gets the next id, in its own line, even after a hand edit without a final newline
    path.write_text(path.read_text().rstrip("\n"))
    add_question(tmp_path, "XTuner 支持哪些微调算法？", [{"path": "README_zh-CN.md", "line_start": 7, "line_end": 7}],
                 source="xtuner")
    qs = load_questions(path)
    assert [x["id"] for x in qs] == ["feedback-001", "feedback-002"]
    assert qs[1]["lang"] == "zh" and "facts" not in qs[1] and qs[1]["gold"] == [
        {"path": "README_zh-CN.md", "line_start": 7, "line_end": 7}]


@pytest.mark.parametrize("question, gold, facts, message", [
    ("", [{"source": "x", "path": "a.md", "line_start": 1, "line_end": 2}], None, "empty"),
    ("q", [], None, "at least one gold location"),
    ("q", None, None, "at least one gold location"),
    ("q", ["a.md:1-2"], None, "must be {source"),
    ("q", [{"path": "a.md", "line_start": 1, "line_end": 2}], None, "name the source"),
    ("q", [{"source": "a", "path": "a.md", "line_start": 1, "line_end": 2},
           {"source": "b", "path": "b.md", "line_start": 1, "line_end": 2}], None, "several sources (a, b)"),
    ("q", [{"source": "x", "path": "a.md", "line_start": 0, "line_end": 2}], None, "1 or more"),
    ("q", [{"source": "x", "path": "a.md", "line_start": 5, "line_end": 2}], None, "before line_start"),
    ("q", [{"source": "x", "path": "a.md", "line_start": "3-9", "line_end": 9}], None, "must be a line number"),
    ("q", [{"source": "x", "path": "a.md", "line_start": True, "line_end": 9}], None, "must be a line number"),
    ("q", [{"source": "x", "path": "../etc/passwd", "line_start": 1, "line_end": 2}], None, "not a path inside"),
    ("q", [{"source": "x", "path": "/abs.md", "line_start": 1, "line_end": 2}], None, "not a path inside"),
    ("q", [{"source": "x", "path": " ", "line_start": 1, "line_end": 2}], None, "give the file's path"),
    ("q", [{"source": "bad name!", "path": "a.md", "line_start": 1, "line_end": 2}], None, "invalid source name"),
    ("q", [{"source": "x", "path": "a.md", "line_start": 1, "line_end": 2}], "0.05", "list of groups"),
    ("q", [{"source": "x", "path": "a.md", "line_start": 1, "line_end": 2}], [["  "]], "fact 1 is empty"),
    ("q", [{"source": "x", "path": "a.md", "line_start": 1, "line_end": 2}], [[1]], "fact 1 must be"),
])
def test_add_question_refuses_bad_input_and_writes_nothing(tmp_path, question, gold, facts, message):
    with pytest.raises(KBError, match=message.replace("(", r"\(").replace(")", r"\)")):
        add_question(tmp_path, question, gold, facts)
    assert not feedback_questions(tmp_path).exists()


def test_add_question_refuses_a_duplicate(tmp_path):
    gold = [{"source": "xtuner", "path": "README.md", "line_start": 1, "line_end": 3}]
    add_question(tmp_path, "What is XTuner?", gold)
    with pytest.raises(KBError, match="already in feedback.jsonl"):
        add_question(tmp_path, "What  is XTuner? ", gold)
    assert len(load_questions(feedback_questions(tmp_path))) == 1


def test_feedback_set_is_offered_once_it_exists(tmp_path, corpus):
    assert FEEDBACK_LABEL not in shipped_sets(corpus, tmp_path)
    assert FEEDBACK_LABEL not in shipped_sets(corpus)
    add_question(tmp_path, "What is XTuner?", [{"source": "xtuner", "path": "README.md", "line_start": 1, "line_end": 3}])
    assert shipped_sets(corpus, tmp_path)[FEEDBACK_LABEL] == feedback_questions(tmp_path)


def test_facade_reads_and_writes_feedback(tmp_path):
    from kb.service import KnowledgeBase

    kb = KnowledgeBase(base_settings(tmp_path / "home"))
    try:
        conversation(ConversationStore(kb.settings.home),
                     ("How do I install xtuner?", {"content": "No idea.", "sources": [HIT], "cited": [],
                                                   "feedback": {"score": 0, "comment": "", "at": time.time()}}))
        (r,) = kb.rated_answers()
        h = r["sources"][0]
        path = kb.add_feedback_question(r["question"], [{k: h[k] for k in ("source", "path", "line_start", "line_end")}],
                                        [["pip"]], conversation=r["conversation"])
        assert load_questions(path)[0]["repo"] == "xtuner"
        assert kb.indexed_sources() == set()
    finally:
        kb.close()


def test_split_indexed_lists_the_rest():
    qs = [{"id": "a", "question": "qa", "repo": "xtuner", "path": "p", "line_start": 1, "line_end": 2},
          {"id": "b", "question": "qb", "repo": "lmdeploy", "path": "p", "line_start": 3, "line_end": 4},
          {"id": "c", "question": "qc", "repo": "lmdeploy", "path": "", "line_start": 0, "line_end": 0,
           "answerable": False}]
    kept, left = split_indexed(qs, {"xtuner"})
    assert [q["id"] for q in kept] == ["a"]
    assert left == [{"id": "b", "question": "qb", "repo": "lmdeploy", "gold": "lmdeploy/p:3-4"},
                    {"id": "c", "question": "qc", "repo": "lmdeploy", "gold": ""}]
    assert split_indexed(qs, None) == (qs, [])
    with pytest.raises(KBError, match="none of the 3 questions is on an indexed source"):
        split_indexed(qs, {"InternLM"})


def test_runs_are_kept_per_kind_and_labelled(tmp_path):
    retrieval = {"mode": "hybrid", "k": 5, "n": 4, "hit@1": 0.5}
    answers = {"mode": "hybrid", "k": 3, "n": 2, "facts": 0.5, "rows": []}
    a = save_run(tmp_path, retrieval, {"questions": "dev.jsonl"})
    b = save_run(tmp_path, retrieval, {"questions": "dev.jsonl"})  # the same second: both kept
    c = save_run(tmp_path, answers, {"questions": "dev.jsonl"}, kind="answers")
    assert len({a, b, c}) == 3 and c.parent == tmp_path / "evals" / "answers"
    assert [r["n"] for r in past_runs(tmp_path)] == [4, 4]
    (run,) = past_runs(tmp_path, "answers")
    assert run["facts"] == 0.5 and run["kind"] == "answers"
    label = run_label(run)
    assert label.endswith("· hybrid k3") and time.strftime("%Y-%m-%d") in label
    (tmp_path / "evals" / "broken.json").write_text("[1, 2")
    assert len(past_runs(tmp_path)) == 2
    with pytest.raises(KBError):
        past_runs(tmp_path, "nonsense")
    assert json.loads(a.read_text())["config"] == {"questions": "dev.jsonl"}


def test_facts_typed_one_per_line_with_alternatives():
    assert parse_facts("0.05 | 5%\n\n  QLoRA  \n | \n") == [["0.05", "5%"], ["QLoRA"]]
    assert parse_facts("") is None and parse_facts(" | \n") is None
