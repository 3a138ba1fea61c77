"""An optional cross-encoder that re-orders the fused hits (``KB_RERANKER_PATH``).

Loaded from a local folder only (never a hub), on first use, once per engine.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import SettingsError
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
            self._model = self._load()
        scores = self._model.predict([(query, h.text) for h in hits])
        for h, s in zip(hits, scores):
            h.scores["rerank"] = round(float(s), 6)
            h.found_by.append("rerank")
        return sorted(hits, key=lambda h: -h.scores["rerank"])

    def _load(self):
        """The cross-encoder, or a settings error naming the variable: a wrong path was the model library's
        traceback in every search that had a hit (an operator review)."""
        from sentence_transformers import CrossEncoder

        if not Path(self.path).is_dir():
            raise SettingsError(f"KB_RERANKER_PATH={self.path!r} is not a folder here: give a cross-encoder's "
                                "local folder, or leave it empty for no reranking")
        try:
            return CrossEncoder(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise SettingsError(f"KB_RERANKER_PATH={self.path!r} does not hold a cross-encoder model "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from exc
