"""Hybrid's last step: its top 30 re-ordered by a logistic model of what the search already knows about each hit.

Reciprocal-rank fusion reads only ranks, with weights set by hand. This model also reads the scores behind them
(the dense cosine, BM25's score against the query's best), and the hit's path, heading and language, fitted to
which of hybrid's candidates held the gold lines over the 427 questions of the fourteen retrieval sets. Scored set
by set with a model fitted to the other thirteen (`python -m bench.run learned-fusion`), it found the gold in the
top five for 0.897 of the questions against 0.878 (README "Retrieval tuning": the table, and where it loses).

The coefficients live in ``learned_order.json`` beside this file, with the names of the features they were fitted
to; ``python -m bench.run learned-fusion --write`` fits them again after the fusion or a feature changes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kb.errors import KBError
from kb.search.hits import BM25_LEAD, IN_SOURCE, OPENING, PASSAGE_BM25, README_SECTION, Hit
from kb.search.signals import is_empty
from kb.words import tokenize

MODEL_FILE = Path(__file__).with_name("learned_order.json")
LISTS = ("dense", "bm25", PASSAGE_BM25, IN_SOURCE, OPENING, README_SECTION, BM25_LEAD)
FEATURES = ("fused rank", "log fused score", *(f"1/rank {name}" for name in LISTS), "dense cosine",
            "bm25 / best", "passage bm25 / best", "heading only", "path depth", "a README", "a root README",
            "log length", "question words in heading and path", "path language is the question's",
            "source named in the question")
ZH_PATH_RE = re.compile(r"zh[_-]?cn|_zh\b|/zh/", re.IGNORECASE)


def features(question: str, hits: list[Hit], language: str) -> np.ndarray:
    """One row per hit, in FEATURES' order; ``hits`` in the fusion's order (a hit's place there is a feature)."""
    words = set(tokenize(question.lower()))
    best = {m: max((h.scores[m] for h in hits if m in h.scores), default=0.0) for m in ("bm25", PASSAGE_BM25)}
    rows = []
    for place, h in enumerate(hits, 1):
        depth = h.path.count("/")
        readme = "readme" in h.path.lower()
        rows.append([
            1 / place, math.log(max(h.score, 0.0) + 1e-6),
            *(1 / h.ranks[m] if h.ranks.get(m) else 0.0 for m in LISTS),
            h.scores.get("dense", 0.0),
            *(h.scores[m] / best[m] if m in h.scores and best[m] else 0.0 for m in ("bm25", PASSAGE_BM25)),
            float(is_empty(h)), float(depth), float(readme), float(readme and depth == 0), math.log(len(h.text) + 1),
            len(words & set(tokenize(f"{h.heading} {h.path}".lower()))) / (len(words) + 1),
            float(bool(ZH_PATH_RE.search(h.path)) == (language == "zh")), float(h.source.lower() in question.lower()),
        ])
    return np.array(rows, dtype=float).reshape(len(hits), len(FEATURES))


@dataclass(frozen=True)
class LearnedOrder:
    """A fitted model: standardise each feature, then a weighted sum, then the logistic function."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def from_dict(cls, d: dict) -> LearnedOrder:
        if tuple(d.get("features", ())) != FEATURES:
            raise KBError(f"{MODEL_FILE.name} was fitted to other features than kb/search/learned.py computes: "
                          "fit it again with `python -m bench.run learned-fusion --write`")
        return cls(np.array(d["mean"]), np.array(d["scale"]), np.array(d["coef"]), float(d["intercept"]))

    def as_dict(self) -> dict:
        return {"features": list(FEATURES), "mean": self.mean.round(6).tolist(), "scale": self.scale.round(6).tolist(),
                "coef": self.coef.round(6).tolist(), "intercept": round(self.intercept, 6)}

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-((x - self.mean) / self.scale @ self.coef + self.intercept)))

    def order(self, question: str, hits: list[Hit], language: str) -> list[Hit]:
        """``hits`` by the model's probability that each holds the answer, which becomes its score; the fused
        score stays in ``scores["fusion"]``."""
        if not hits:
            return hits
        for h, p in zip(hits, self.probabilities(features(question, hits, language))):
            h.scores["fusion"], h.score = round(h.score, 6), round(float(p), 6)
        return sorted(hits, key=lambda h: -h.score)


@functools.cache
def shipped() -> LearnedOrder:
    return LearnedOrder.from_dict(json.loads(MODEL_FILE.read_text()))
