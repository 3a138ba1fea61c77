"""Experiment (forty-first stop; built at the forty-second as ``KB_TRANSLATE_QUESTIONS``, off by default): each
question also searched in the other language.

The default model translates a sample of the registered sets' questions (every cross-lingual one and every fifth
other one), greedy, and hybrid search gets two more lists from the translation: BM25 on its words and dense on its
passages, each at RRF weight ``WB`` / ``WD``. Compared with hybrid as it is, per category, on the same sample;
an optional trigger translates only when ``TRIG`` of hybrid's first five hits are in the other language.

    python -m bench.translated_queries [WB WD [TRIG]]   # writes bench/results/translated-queries.json
    python -m bench.translated_queries built            # the same sample through the built SearchOptions.also_as
    python -m bench.translated_queries gated            # ... translated only where BM25 and dense disagree (auto)

Translations are kept in that file, so a second run does not ask the model again.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

from bench.run import RESULTS, six_repo_kb
from kb.answer.prompts import TRANSLATE_PROMPTS
from kb.evaluate import is_hit, load_questions
from kb.question_sets import retrieval_sets
from kb.search import engine as E
from kb.search.engine import SearchEngine
from kb.search.hits import SearchOptions
from kb.words import language_of
from kb.words import query_tokens

OUT = RESULTS / "translated-queries.json"
# the product's own translation prompts (kb/answer/translate.py, KB_TRANSLATE_QUESTIONS), built from this experiment
SYSTEM = {lang: prompt.messages[0].prompt.template for lang, prompt in TRANSLATE_PROMPTS.items()}


def sample() -> list[tuple[str, dict]]:
    out, i = [], 0
    for s in retrieval_sets():
        for q in load_questions(s.file):
            i += 1
            if q.get("category") == "cross-lingual" or i % 5 == 0:
                out.append((s.key, q))
    return out


def translate(questions: list[str], kept: dict[str, str]) -> tuple[dict[str, str], float]:
    from langchain_core.messages import HumanMessage, SystemMessage

    from core.llm import build_chat_model

    todo = [q for q in questions if q not in kept]
    if not todo:
        return kept, 0.0
    kb = six_repo_kb()
    llm = build_chat_model(kb.settings.with_(llm_max_tokens=80, llm_temperature=0.0))
    llm.invoke([SystemMessage(SYSTEM["en"]), HumanMessage("你好")])  # the model loaded outside the timing
    t0 = time.perf_counter()
    for q in todo:
        text = llm.invoke([SystemMessage(SYSTEM[language_of(q)]), HumanMessage(q)]).content.strip()
        kept[q] = text.splitlines()[0] if text else ""
    return kept, (time.perf_counter() - t0) / len(todo)


def compare(pairs: list[tuple[str, dict]], search) -> tuple[dict, list[dict]]:
    """Each question searched as it is and translated (``search(question, arm)``): per category, the hits at 1 and 5
    and the MRR sum of each arm, and the questions whose gold moved."""
    totals: dict = defaultdict(lambda: {arm: [0, 0, 0, 0.0] for arm in ("as is", "translated")})
    changed = []
    for key, q in pairs:
        ranks = {}
        for arm in ("as is", "translated"):
            r = next((h.rank for h in search(q, arm) if is_hit(h, q)), None)
            ranks[arm] = r
            t = totals[q.get("category", "specific")][arm]
            t[0] += 1; t[1] += r == 1; t[2] += r is not None; t[3] += 1 / r if r else 0.0
        if ranks["as is"] != ranks["translated"]:
            changed.append({"set": key, "id": q["id"], "ranks": ranks})
    summary = {c: {arm: {"n": v[0], "hit@1": v[1], "hit@5": v[2], "mrr_sum": round(v[3], 1)} for arm, v in d.items()}
               for c, d in totals.items()}
    return summary, changed


def built() -> None:
    """The built path (``SearchOptions.also_as`` at its default weight) on the same sample: a question new since the
    kept translations is translated by the product's own step (kb/answer/translate.py)."""
    stored = json.loads(OUT.read_text()) if OUT.exists() else {}
    pairs = sample()
    kept = stored.get("translations", {})
    todo = [q["question"] for _, q in pairs if q["question"] not in kept]
    per_question = 0.0
    if todo:
        from core.llm import build_chat_model
        from kb.answer.translate import build_translate

        step = build_translate(build_chat_model(six_repo_kb().settings))
        step.invoke("你好")  # the model loaded outside the timing
        t0 = time.perf_counter()
        kept.update({q: step.invoke(q) for q in todo})
        per_question = (time.perf_counter() - t0) / len(todo)
    eng = SearchEngine(six_repo_kb())
    summary, changed = compare(pairs, lambda q, arm: eng.search(q["question"], SearchOptions(
        k=5, also_as=kept.get(q["question"], "") if arm == "translated" else "")))
    runs = stored.get("runs", [])
    runs.append({"built": True, "weights": {"bm25": 1.0, "dense": 1.0}, "trigger": 0, "new_translations": len(todo),
                 "seconds_per_new_translation": round(per_question, 2), "by_category": summary, "changed": changed})
    OUT.write_text(json.dumps({**stored, "translations": kept, "runs": runs}, ensure_ascii=False, indent=1))
    print(json.dumps(summary), "new translations", len(todo), f"{per_question:.2f} s each")


def gated() -> None:
    """The built path with ``KB_TRANSLATE_QUESTIONS=auto``'s gate (``SearchEngine.retrievers_disagree``), on the same
    sample with the kept translations: per category, and how many questions of each it translated."""
    stored = json.loads(OUT.read_text())
    kept, pairs = stored["translations"], sample()
    eng = SearchEngine(six_repo_kb())
    fired: dict = defaultdict(lambda: [0, 0])
    also_as: dict[str, str] = {}  # per question text: what the gate lets the search also read
    for _, q in pairs:
        disagree = eng.retrievers_disagree(q["question"], SearchOptions(k=5))
        fired[q.get("category", "specific")][0] += disagree
        fired[q.get("category", "specific")][1] += 1
        also_as[q["question"]] = kept.get(q["question"], "") if disagree else ""
    summary, changed = compare(pairs, lambda q, arm: eng.search(q["question"], SearchOptions(
        k=5, also_as=also_as[q["question"]] if arm == "translated" else "")))
    runs = stored.get("runs", [])
    runs.append({"built": True, "gate": "bm25 and dense share no chunk in their first five",
                 "translated": {c: {"of": n, "translated": f} for c, (f, n) in fired.items()},
                 "by_category": summary, "changed": changed})
    OUT.write_text(json.dumps({**stored, "runs": runs}, ensure_ascii=False, indent=1))
    print(json.dumps(summary), "translated", dict(fired))


def main() -> None:
    if sys.argv[1:2] == ["built"]:
        return built()
    if sys.argv[1:2] == ["gated"]:
        return gated()
    wb, wd = (float(sys.argv[1]), float(sys.argv[2])) if len(sys.argv) > 2 else (1.0, 1.0)
    trig = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    stored = json.loads(OUT.read_text()) if OUT.exists() else {}
    pairs = sample()
    trans, per_question = translate([q["question"] for _, q in pairs], stored.get("translations", {}))
    eng = SearchEngine(six_repo_kb())
    hybrid, fuse = SearchEngine._hybrid, E.fuse
    state = {"on": False, "fired": 0}

    def with_translation(self, coll, collection, query, lex, tokens, named, lists, opts):
        t = trans.get(query) if state["on"] else None
        if t and trig:
            first = hybrid(self, coll, collection, query, lex, tokens, named, {k: list(v) for k, v in lists.items()},
                           opts)[:5]
            t = t if sum(language_of(h.text[:300]) != language_of(query) for h in first) >= trig else None
        if t:
            state["fired"] += 1
            n = max(opts.candidates, opts.k)
            extra = {"bm25 tr": self._bm25(lex, query_tokens(t), n, opts)}
            extra["dense tr"], _ = self._dense_passages(self._passages(coll, self.kb.live()[1]), collection, t, n, opts)
            docs: dict = {}
            self._documents(coll, collection, {i for lst in extra.values() for i, _ in lst}, docs)
            lists.update({k: [(docs[i], s) for i, s in lst if i in docs] for k, lst in extra.items()})
        return hybrid(self, coll, collection, query, lex, tokens, named, lists, opts)

    def weighted(lists, opts, bm25_scale=1.0, extra_weights=None):
        return fuse(lists, opts, bm25_scale=bm25_scale, extra_weights={**(extra_weights or {}), "bm25 tr": wb,
                                                                        "dense tr": wd})

    SearchEngine._hybrid, E.fuse = with_translation, weighted
    def search(q: dict, arm: str):
        state["on"] = arm == "translated"
        return eng.search(q["question"], SearchOptions(k=5))

    summary, changed = compare(pairs, search)
    runs = stored.get("runs", [])
    runs.append({"weights": {"bm25": wb, "dense": wd}, "trigger": trig, "fired": state["fired"],
                 "by_category": summary, "changed": changed})
    if per_question:
        stored["seconds_per_translation"] = round(per_question, 2)
    OUT.write_text(json.dumps({**stored, "translations": trans, "runs": runs}, ensure_ascii=False, indent=1))
    print(json.dumps(summary), "fired", state["fired"])


if __name__ == "__main__":
    main()
