"""Hybrid's learned order (kb/search/learned.py): the features it reads, the shipped model, and the search using it."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest

from kb.errors import KBError
from kb.search import learned
from kb.search.engine import SearchEngine
from kb.search.hits import PASSAGE_BM25, Hit, SearchOptions
from kb.search.learned import FEATURES, MODEL_FILE, LearnedOrder, features


def hit(path: str, score: float, ranks: dict, scores: dict, source: str = "xtuner", heading: str = "",
        text: str = "XTuner is an efficient toolkit for fine-tuning large models, with QLoRA and LoRA.") -> Hit:
    return Hit(rank=0, score=score, mode="hybrid", source=source, path=path, line_start=1, line_end=5, commit="c",
               url="", text=text, heading=heading, ranks=ranks, scores=scores)


def column(x: np.ndarray, name: str) -> list[float]:
    return [round(float(v), 4) for v in x[:, FEATURES.index(name)]]


def test_features_read_ranks_scores_path_and_language():
    hits = [hit("README_zh-CN.md", 0.04, {"bm25": 1, "dense": 3}, {"bm25": 12.0, "dense": 0.61}, heading="安装"),
            hit("docs/en/get_started/install.md", 0.03, {"dense": 1, PASSAGE_BM25: 2},
                {"dense": 0.7, PASSAGE_BM25: 4.0}, heading="Installation"),
            hit("lagent/README.md", 0.01, {"bm25": 4}, {"bm25": 3.0}, source="lagent")]
    x = features("怎么安装 xtuner？", hits, "zh")
    assert x.shape == (3, len(FEATURES))
    assert column(x, "fused rank") == [1.0, 0.5, 0.3333]
    assert column(x, "1/rank bm25") == [1.0, 0.0, 0.25]
    assert column(x, "bm25 / best") == [1.0, 0.0, 0.25]  # against the query's best BM25 score among the hits
    assert column(x, "passage bm25 / best") == [0.0, 1.0, 0.0]
    assert column(x, "dense cosine") == [0.61, 0.7, 0.0]
    assert column(x, "a root README") == [1.0, 0.0, 0.0] and column(x, "path depth") == [0.0, 3.0, 1.0]
    assert column(x, "path language is the question's") == [1.0, 0.0, 0.0]
    assert column(x, "source named in the question") == [1.0, 1.0, 0.0]
    assert column(x, "question words in heading and path")[0] > 0  # "安装" is in the question and the heading


def test_a_model_orders_hits_by_its_probability_and_keeps_the_fused_score():
    """A model that weighs only the dense cosine puts the hit with the best cosine first, whatever its fused rank."""
    coef = np.zeros(len(FEATURES))
    coef[FEATURES.index("dense cosine")] = 2.0
    model = LearnedOrder(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), coef, 0.0)
    hits = [hit("a.md", 0.05, {"bm25": 1}, {"bm25": 9.0, "dense": 0.2}),
            hit("b.md", 0.04, {"dense": 1}, {"dense": 0.8}),
            hit("c.md", 0.03, {"dense": 2}, {"dense": 0.5})]
    ordered = model.order("what is xtuner?", hits, "en")
    assert [h.path for h in ordered] == ["b.md", "c.md", "a.md"]
    assert [h.scores["fusion"] for h in ordered] == [0.04, 0.03, 0.05]
    assert all(0 < h.score < 1 for h in ordered)
    assert ordered[0].score == pytest.approx(1 / (1 + np.exp(-1.6)), abs=1e-6)


def test_the_shipped_model_fits_the_features_and_refuses_others():
    shipped = learned.shipped()
    assert len(shipped.coef) == len(shipped.mean) == len(shipped.scale) == len(FEATURES)
    stored = json.loads(MODEL_FILE.read_text())
    assert LearnedOrder.from_dict(stored).as_dict() == shipped.as_dict()
    with pytest.raises(KBError, match="bench.run learned-fusion --write"):
        LearnedOrder.from_dict({**stored, "features": stored["features"][:-1]})


def test_hybrid_returns_the_fused_top_30_in_the_learned_order(xtuner_kb):
    """The search hands the model the fusion's top 30, in the fusion's order, and shows the model's first five."""
    from kb.search.signals import query_language

    class Seen:
        def order(self, question, hits, language):
            self.hits = list(hits)
            return hits

    engine, seen = SearchEngine(xtuner_kb), Seen()
    for question in ("xtuner是什么？", "How do I fine-tune with QLoRA?"):
        with mock.patch.object(learned, "shipped", lambda: seen):
            engine.search(question)
        assert len(seen.hits) == 30 and [h.score for h in seen.hits] == sorted((h.score for h in seen.hits), reverse=True)
        off = engine.search(question, SearchOptions(k=5, learned_order=False))
        assert [h.id for h in seen.hits[:5]] == [h.id for h in off]  # the fusion's own order, unchanged
        assert all("fusion" not in h.scores for h in off)
        got = engine.search(question, SearchOptions(k=5))
        expected = learned.shipped().order(question, seen.hits, query_language(question))[:5]
        assert [h.id for h in got] == [h.id for h in expected]
        assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
        assert all(0 < h.score < 1 and "fusion" in h.scores for h in got)
