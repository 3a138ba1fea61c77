"""The shipped question sets: one list, read by the benchmark and the Evaluation page alike."""

import re
from pathlib import Path

import pytest

from kb.errors import KBError
from kb.evaluate import answerable, load_questions, shipped_sets
from kb.question_sets import SETS, retrieval_sets


def test_every_set_loads_and_its_kind_matches_its_questions():
    assert len({s.key for s in SETS}) == len({s.label for s in SETS}) == len(SETS)
    for s in SETS:
        questions = load_questions(s.file)
        assert questions, s.key
        assert any(answerable(q) for q in questions) == s.retrieval, s.key


def test_the_benchmark_and_the_page_offer_the_same_sets():
    from bench.run import QUESTION_SETS

    assert {path for path, _ in QUESTION_SETS.values()} == {s.file for s in retrieval_sets()}
    offered = set(shipped_sets(Path("/nonexistent/corpus")).values())
    assert {s.file for s in SETS} <= offered


def test_the_benchmark_refuses_an_unknown_set_before_running_anything(monkeypatch, capsys):
    """`bench.run retrieval answers-unseen --set typo` must not spend a minute on retrieval and then fail."""
    from bench import run

    monkeypatch.setattr(run, "bench_retrieval", lambda: pytest.fail("ran before the set was checked"))
    monkeypatch.setattr("sys.argv", ["bench.run", "retrieval", "answers-unseen", "--set", "overview-blind99"])
    with pytest.raises(SystemExit) as exc:
        run.main()
    assert exc.value.code == 2
    assert "unknown question set 'overview-blind99'" in capsys.readouterr().err
    assert run.UNSEEN_SET in run.QUESTION_SETS


@pytest.mark.parametrize("line,message", [
    ("42", "not a JSON object"),
    ('"a string"', "not a JSON object"),
    ('{"id": "a", "question": 123, "repo": "x", "path": "p", "line_start": 1, "line_end": 2}', "non-empty string"),
    ('{"id": "a", "question": "q", "repo": "x", "path": "p", "line_start": "abc", "line_end": 2}', "whole numbers"),
    ('{"id": "a", "question": "q", "repo": "x", "path": "p", "line_start": null, "line_end": 2}', "whole numbers"),
    ('{"id": "a", "question": "q", "repo": "x", "path": "p", "line_start": 9, "line_end": 3}', "not a range"),
    ('{"id": "a", "question": "q", "repo": "x", "path": "p", "line_start": 1, "line_end": 2, '
     '"gold": [{"path": "p", "line_start": 0, "line_end": 2}]}', "gold 1: lines 0-2 are not a range"),
    ('{"id": "a", "question": "q", "repo": "x", "path": "p", "line_start": 1, "line_end": 2, "facts": "x"}',
     "list of groups"),
    ('{"id": "a", "question": "q", "repo": "x", "path": "p", "line_start": 1, "line_end": 2, "facts": [["a", 3]]}',
     "list of groups"),
])
def test_a_question_line_that_cant_be_scored_is_named_with_its_line(tmp_path, line, message):
    """These ended in a traceback, or scored silently (a reversed range always missed; a string of facts was always
    "stated") (a CLI review)."""
    good = '{"id": "ok", "question": "What is XTuner?", "repo": "xtuner", "path": "README.md", "line_start": 1, "line_end": 3}'
    path = tmp_path / "q.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(KBError, match=f"q.jsonl:2: .*{re.escape(message)}"):
        load_questions(path)
    unanswerable = '{"id": "u", "question": "q", "repo": "x", "path": "", "line_start": 0, "line_end": 0, "answerable": false}'
    path.write_text(f"{good}\n{unanswerable}\n")
    assert len(load_questions(path)) == 2  # an unanswerable question has no lines to check
    path.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(KBError, match="not UTF-8"):
        load_questions(path)
