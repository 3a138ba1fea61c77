"""Answer evaluation behind ``kb eval --answers``: does the answer state the facts, cite the gold lines, decline?

Each question goes through the real answer chain with the configured LLM. Per
question: ``facts`` (every group of ``"facts": [["alt", ...], ...]`` appears in
the answer by one alternative, case-insensitive, spaces ignored),
``gold_cited`` (a ``[n]`` marker points at a source overlapping a gold
location), ``declined`` (for ``"answerable": false``, the answer says the
sources don't hold it) and the time to the first token and in all.
"""

from __future__ import annotations

import re
import statistics
import time

from kb.answer.chain import Answerer
from kb.evaluate import answerable, category, is_hit
from kb.search.hits import SearchOptions

# How the prompt's rule "say you don't know" comes out, in both languages (and the chain's own no-hit answer).
DECLINE_RE = re.compile(
    r"不知道|没有找到|找不到|无法(根据|回答|确定|从)|(资料|文档|上下文|知识库)(中|里)?(没有|未|并未)(提到|提及|包含|说明|给出)|"
    r"没有(相关|提到|提及)|未(提及|提到|找到)|"
    r"(don'?t|do not|cannot|can'?t) (know|find|answer|determine)|not (mentioned|found|provided|included|stated|covered)|"
    r"no (information|mention|relevant)|(do|does|did)(n'?t| not) (mention|contain|say|provide|include|cover|specify)",
    re.IGNORECASE,
)


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def states_facts(answer: str, facts: list[list[str]]) -> bool:
    """Every group matched by one of its alternatives, ignoring case and spaces."""
    flat = _flat(answer)
    return all(any(_flat(alt) in flat for alt in group) for group in facts)


def declines(answer: str) -> bool:
    return bool(DECLINE_RE.search(answer))


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
        }
        if answerable(q):
            row["facts"] = states_facts(result.answer, q["facts"]) if q.get("facts") else None
            row["gold_cited"] = any(is_hit(h, q) for h in cited)
            row["gold_retrieved"] = any(is_hit(h, q) for h in result.sources)
        else:
            row["declined"] = declines(result.answer)
        rows.append(row)
        progress(i, len(questions))
    ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    return {
        "n": len(rows),
        "facts": _share([r["facts"] for r in rows if r.get("facts") is not None]),
        "gold_cited": _share([r["gold_cited"] for r in rows if "gold_cited" in r]),
        "gold_retrieved": _share([r["gold_retrieved"] for r in rows if "gold_retrieved" in r]),
        "declined": _share([r["declined"] for r in rows if "declined" in r]),
        "ttft_median": round(statistics.median(ttfts), 2) if ttfts else None,
        "seconds_median": round(statistics.median(r["seconds"] for r in rows), 2) if rows else None,
        "k": options.k, "mode": options.mode, "rows": rows,
    }
