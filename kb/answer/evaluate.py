"""Answer evaluation behind ``kb eval --answers``: does the answer state the facts, cite the gold lines, decline?

Each question goes through the real answer chain with the configured LLM. Per
question: ``facts`` (every group of ``"facts": [["alt", ...], ...]`` appears in
the answer by one alternative, case-insensitive, spaces ignored),
``gold_cited`` (a ``[n]`` marker points at a source overlapping a gold
location), ``declined`` (for ``"answerable": false``, the answer says the
sources don't hold it) and the time to the first token and in all. ``facts_shown``
says whether the excerpts the model was given state the facts at all: an answer
can't state what it wasn't shown, so it tells a fact the model missed from one
the context never held. Facts are
checked in the answer as shown: an answer withheld because nothing in it was
found in the sources counts as not stating them (``facts_withheld`` says
whether the withheld text did).
"""

from __future__ import annotations

import statistics
import time

from kb.answer.chain import Answerer
from kb.answer.prompts import declines
from kb.evaluate import answerable, category, facts_in_hits, is_hit, states_facts
from kb.search.hits import SearchOptions

def _share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate_answers(answerer: Answerer, questions: list[dict], options: SearchOptions,
                     progress=lambda done, total: None) -> dict:
    """Ask every question; the ``kb eval --answers`` report (shares over the questions each applies to)."""
    rows = []
    for i, q in enumerate(questions, 1):
        t0 = time.perf_counter()
        result = answerer.ask(q["question"], options=options)
        cited = [result.sources[n - 1] for n in result.cited if 1 <= n <= len(result.sources)]
        row = {
            "id": q["id"], "question": q["question"], "category": category(q), "answer": result.answer,
            "answerable": answerable(q), "cited": result.cited,
            "sources": [h.citation for h in result.sources],
            "gold": f"{q['repo']}/{q['path']}:{q['line_start']}-{q['line_end']}" if answerable(q) else "",
            "ttft_s": result.first_token_seconds, "seconds": round(time.perf_counter() - t0, 3),
            "sentences": [x.as_dict() for x in result.sentences],
        }
        if result.also_as:  # the question's translation, searched as well (kb/answer/translate.py)
            row["also_as"] = result.also_as
        if result.unverified:  # the model's answer, withheld because nothing in it was found in the sources
            row["withheld"] = result.unverified
        if answerable(q):
            row["facts"] = states_facts(result.answer, q["facts"]) if q.get("facts") else None
            if result.unverified and q.get("facts"):  # what withholding cost: a right answer nothing backed
                row["facts_withheld"] = states_facts(result.unverified, q["facts"])
            row["gold_cited"] = any(is_hit(h, q) for h in cited)
            row["gold_retrieved"] = any(is_hit(h, q) for h in result.sources)
            row["facts_shown"] = facts_in_hits(result.sources, q)
        else:
            row["declined"] = result.declined or declines(result.answer)
        rows.append(row)
        progress(i, len(questions))
    ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    return {
        "n": len(rows),
        "facts": _share([r["facts"] for r in rows if r.get("facts") is not None]),
        "gold_cited": _share([r["gold_cited"] for r in rows if "gold_cited" in r]),
        "gold_retrieved": _share([r["gold_retrieved"] for r in rows if "gold_retrieved" in r]),
        "facts_shown": _share([r["facts_shown"] for r in rows if r.get("facts_shown") is not None]),
        "declined": _share([r["declined"] for r in rows if "declined" in r]),
        # answers withheld (nothing in them found in the sources), and how many of those stated the facts
        "withheld": _share(["withheld" in r for r in rows]),
        "withheld_right": sum(bool(r.get("facts_withheld")) for r in rows),
        # sentences: the share of answer sentences with a claim that carry a citation (kb/answer/support.py)
        "coverage": _share([x["supported"] for r in rows for x in r["sentences"] if x["claim"]]),
        "ttft_median": round(statistics.median(ttfts), 2) if ttfts else None,
        "seconds_median": round(statistics.median(r["seconds"] for r in rows), 2) if rows else None,
        "k": options.k, "mode": options.mode, "rows": rows,
    }
