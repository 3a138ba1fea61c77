"""An optional cross-encoder that re-orders the fused hits (``KB_RERANKER_PATH``).

Loaded from a local folder only (never a hub), on first use, once per engine.
"""

from __future__ import annotations

from kb.search.hits import Hit


class CrossEncoderReranker:
    def __init__(self, path: str) -> None:
        self.path = path
        self._model = None

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        """Hits ordered by the cross-encoder's score, kept in ``scores["rerank"]`` beside the others."""
        if not hits:
            return hits
        if self._model is None:
            from sentence_transformers import CrossEncoder

            self._model = CrossEncoder(self.path, local_files_only=True)
        scores = self._model.predict([(query, h.text) for h in hits])
        for h, s in zip(hits, scores):
            h.scores["rerank"] = round(float(s), 6)
            h.found_by.append("rerank")
        return sorted(hits, key=lambda h: -h.scores["rerank"])
