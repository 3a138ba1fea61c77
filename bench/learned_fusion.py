"""The learned order of hybrid's top 30 (kb/search/learned.py): each question set scored by a model fitted to the
others (leave one set out), and the model the product ships, fitted to all of them.

A set's figures never come from a model that read its answers: that is the figure to trust for questions nobody
fitted to. `python -m bench.run learned-fusion` writes `bench/results/learned-fusion.json`; with `--write` it also
writes the shipped model, `kb/search/learned_order.json`, fitted to every set. The candidates are exactly what the
default search hands the learned order, in the fusion's own order (one of the features).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from kb.search.learned import FEATURES, MODEL_FILE, LearnedOrder, features

C = 0.1  # L2 strength: 0.01-10 gave hit@1 0.658-0.667 and hit@5 0.888-0.892 left out (README "Retrieval tuning")


class _Seen:
    """Stands in for the shipped model inside the search: keeps the list it is handed, in the fusion's order."""

    hits: list = []

    def order(self, question: str, hits: list, language: str) -> list:
        self.hits = list(hits)
        return hits


def collect(engine, sets: dict) -> dict:
    """What the learned order is handed for every answerable question (the fused top ``order_depth`` of the
    default search, lists as deep as ever): each hit's features, and which hits are gold."""
    from unittest import mock

    from kb.evaluate import answerable, is_hit, load_questions
    from kb.search import learned, signals

    seen = _Seen()
    out = {}
    with mock.patch.object(learned, "shipped", lambda: seen):
        for name, path in sets.items():
            rows = []
            for q in filter(answerable, load_questions(path)):
                engine.search(q["question"])
                rows.append((features(q["question"], seen.hits, signals.query_language(q["question"])),
                             np.array([is_hit(h, q) for h in seen.hits], dtype=bool)))
            out[name] = rows
            print(f"learned-fusion: {name} {len(rows)} questions", file=sys.stderr)
    return out


def fit(rows: list) -> LearnedOrder:
    from sklearn.linear_model import LogisticRegression

    x = np.vstack([f for f, _ in rows if len(f)])
    y = np.concatenate([g for f, g in rows if len(f)])
    mean, scale = x.mean(0), x.std(0) + 1e-9
    model = LogisticRegression(C=C, max_iter=3000).fit((x - mean) / scale, y)
    return LearnedOrder(mean, scale, model.coef_[0], float(model.intercept_[0]))


def _scores(golds: list[np.ndarray], k: int = 5) -> dict:
    n = len(golds) or 1
    first = [next((i for i, g in enumerate(o[:k], 1) if g), None) for o in golds]
    return {"n": len(golds), "hit@1": round(sum(r == 1 for r in first) / n, 4),
            "hit@k": round(sum(r is not None for r in first) / n, 4),
            "mrr": round(sum(1 / r for r in first if r) / n, 4)}


def leave_one_set_out(data: dict) -> dict:
    """Each set re-ordered by a model fitted to every other set, against the fusion's own order."""
    out = {}
    for name, rows in data.items():
        model = fit([r for other, rs in data.items() if other != name for r in rs])
        learned = [g[np.argsort(-model.probabilities(f), kind="stable")] if len(f) else g for f, g in rows]
        out[name] = {"fusion": _scores([g for _, g in rows]), "learned": _scores(learned),
                     "gold in the top 30": round(sum(g.any() for _, g in rows) / (len(rows) or 1), 4)}
    return out


def totals(per_set: dict) -> dict:
    n = sum(s["fusion"]["n"] for s in per_set.values())
    return {arm: {m: round(sum(s[arm][m] * s[arm]["n"] for s in per_set.values()) / n, 4)
                  for m in ("hit@1", "hit@k", "mrr")} | {"n": n} for arm in ("fusion", "learned")}


def bench(engine, sets: dict, write: bool = False) -> dict:
    data = collect(engine, sets)
    per_set = leave_one_set_out(data)
    shipped = fit([r for rs in data.values() for r in rs])
    if write:
        MODEL_FILE.write_text(json.dumps(shipped.as_dict(), indent=1) + "\n")
    worse = {name: {m: round(s["learned"][m] - s["fusion"][m], 4) for m in ("hit@1", "hit@k")}
             for name, s in per_set.items()
             if s["learned"]["hit@1"] < s["fusion"]["hit@1"] or s["learned"]["hit@k"] < s["fusion"]["hit@k"]}
    return {"C": C, "sets": per_set, "total": totals(per_set), "sets_worse": worse,
            "coefficients (all sets, standardised features)": dict(zip(FEATURES, np.round(shipped.coef, 3).tolist()))}
