"""The shipped question sets: one list, read by the benchmark and the Evaluation page alike."""

from pathlib import Path

import pytest

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
