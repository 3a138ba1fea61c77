"""Fusing the ranked lists of several retrievers into one (the ``hybrid`` mode).

Weighted reciprocal-rank fusion over dense-on-passages, BM25-on-chunks and
BM25-on-passages (README "Retrieval tuning" has the measurements behind the
weights and depths).
"""

from __future__ import annotations

from langchain_core.documents import Document

from kb.search.bm25 import BM25Matrix
from kb.search.hits import PASSAGE_BM25, Hit, SearchOptions, hit_from_document

SPECIFIC_IDF = 3.0


def specificity(matrix: BM25Matrix, tokens: list[str]) -> float:
    """1 when the query has a rare term; less when all its terms are everywhere.

    "xtuner是什么？" leaves BM25 one term found in most xtuner chunks, so its
    ranking is noise and must not outvote dense. A term in under ~5 % of
    the chunks (idf >= SPECIFIC_IDF) counts fully.
    """
    return min(1.0, matrix.max_idf(tokens) / SPECIFIC_IDF)


def fuse(lists: dict[str, list[tuple[Document, float]]], opts: SearchOptions, bm25_scale: float = 1.0,
         extra_weights: dict[str, float] | None = None) -> list[Hit]:
    """Weighted reciprocal-rank fusion: sum of weight / (rrf_k + rank) over retrievers."""
    bm25 = opts.bm25_weight * bm25_scale
    weights = {"dense": opts.dense_weight, "bm25": bm25, PASSAGE_BM25: bm25, **(extra_weights or {})}
    fused: dict[str, Hit] = {}
    for mode, scored in lists.items():
        for r, (doc, s) in enumerate(scored, 1):
            h = fused.get(doc.id)
            if h is None:
                h = fused[doc.id] = hit_from_document(doc, 0.0, "hybrid")
            h.score += weights[mode] / (opts.rrf_k + r)
            h.found_by.append(mode)
            h.ranks[mode] = r
            h.scores[mode] = round(float(s), 6)
    hits = sorted(fused.values(), key=lambda h: -h.score)
    for h in hits:
        h.score = round(h.score, 6)
    return hits
