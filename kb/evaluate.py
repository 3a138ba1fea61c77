"""Retrieval evaluation: hit@1, hit@k and MRR on a question file (DESIGN §6), per question category.

A question is hit at rank r when the r-th hit comes from the source named
``repo``, has the same ``path``, and its lines overlap the gold range. A
question may list several acceptable locations (``"gold": [{"path",
"line_start", "line_end"}, ...]``: the same passage in README.md,
README_zh-CN.md and docs/); a hit at any of them counts. Questions marked
``"answerable": false`` have no gold and are left to the answer evaluation.
Runs are saved in ``KB_HOME/evals`` with the config they measured, so they can
be compared over time (answer runs, ``kb/answer/evaluate.py``, in
``KB_HOME/evals/answers``). A knowledge base holding only some of the repos a
question set covers can score just the questions on its indexed sources
(``indexed=``): the rest are listed as not indexed instead of counted as misses.
Questions saved from rated chat answers (``kb/feedback.py``) live in
``KB_HOME/questions/feedback.jsonl`` and are offered beside the shipped sets.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from kb.errors import KBError
from kb.question_sets import BY_KEY, SETS
from kb.search.engine import SearchEngine
from kb.search.hits import Hit, SearchOptions

REQUIRED = ("id", "question", "repo", "path", "line_start", "line_end")
CATEGORIES = ("overview", "specific", "cross-lingual")
# 36 questions over the six shared repos, written apart from the tuning and
# never tuned on but once (README "Retrieval tuning"): a check that settings
# tuned on the shared dev set hold on questions they were not fitted to.
HOLDOUT = BY_KEY["holdout"].file


FEEDBACK_LABEL = "Feedback"


def feedback_questions(home: Path) -> Path:
    """Where questions saved from rated answers are appended (``kb/feedback.py``)."""
    return Path(home) / "questions" / "feedback.jsonl"


def shipped_sets(corpus: Path, home: Path | None = None) -> dict[str, Path]:
    """The question files a user can run without uploading one, by label.

    The overview sets ask what users ask first (what X is, install,
    requirements, capabilities); the held-out ones were never tuned on. With
    ``home``, the questions saved from rated answers (``KB_HOME/questions/
    feedback.jsonl``) are offered too, once there are any.
    """
    sets = {"Shared dev set": corpus / "dev_questions.jsonl", **{q.label: q.file for q in SETS}}
    if home is not None and feedback_questions(home).is_file() and feedback_questions(home).stat().st_size:
        sets[FEEDBACK_LABEL] = feedback_questions(home)
    return sets


def load_questions(path: Path | str, text: str | None = None) -> list[dict]:
    """Parse a JSONL question file; a bad line is reported with its number."""
    if text is None:
        p = Path(path)
        if p.is_dir():
            raise KBError(f"{path} is a folder: give a question file (.jsonl)")
        if not p.is_file():
            raise KBError(f"no such question file: {path}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise KBError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:  # unreadable: was a traceback (an operator review)
            raise KBError(f"cannot read {path}: {exc.strerror or exc}") from None
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KBError(f"{path}:{n}: not JSON ({exc.msg})") from None
        problem = question_problem(q)
        if problem:
            raise KBError(f"{path}:{n}: {problem}")
        questions.append(q)
    if not questions:
        raise KBError(f"{path}: no questions")
    return questions


def _lines_problem(where: str, start: object, end: object) -> str | None:
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        return f"{where}line_start and line_end must be whole numbers"
    if not 1 <= start <= end:  # type: ignore[operator]
        return f"{where}lines {start}-{end} are not a range: 1 <= line_start <= line_end"
    return None


def question_problem(q: object) -> str | None:
    """What makes a question line unusable, or None. A wrong type used to end in a traceback, and a reversed line
    range or a non-list ``facts`` to score silently (always a miss; facts always stated) (a CLI review)."""
    if not isinstance(q, dict):
        return "not a JSON object"
    missing = [f for f in REQUIRED if f not in q]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(q["id"], str) or not q["id"].strip():  # null or a list was a traceback in the report
        return "\"id\" must be a non-empty string"
    if not isinstance(q["question"], str) or not q["question"].strip():
        return "\"question\" must be a non-empty string"
    if not isinstance(q["repo"], str):
        return "\"repo\" must be a string"
    gold = q.get("gold")
    if gold is not None:
        if not (isinstance(gold, list) and gold and all(
                isinstance(g, dict) and {"path", "line_start", "line_end"} <= set(g) for g in gold)):
            return "\"gold\" must be a non-empty list of {path, line_start, line_end}"
        for i, g in enumerate(gold, 1):
            problem = _lines_problem(f"gold {i}: ", g["line_start"], g["line_end"])
            if problem or not isinstance(g["path"], str):
                return problem or f"gold {i}: \"path\" must be a string"
            if not isinstance(g.get("repo", ""), str):
                return f"gold {i}: \"repo\" must be a string"
    elif answerable(q):
        problem = _lines_problem("", q["line_start"], q["line_end"])
        if problem or not isinstance(q["path"], str):
            return problem or "\"path\" must be a string"
    facts = q.get("facts")
    if facts is not None and not (isinstance(facts, list) and all(
            isinstance(group, list) and group and all(isinstance(alt, str) and alt.strip() for alt in group)
            for group in facts)):
        return "\"facts\" must be a list of groups, each a list of strings: [[\"alt1\", \"alt2\"], [\"alt3\"]]"
    return None


def answerable(q: dict) -> bool:
    return q.get("answerable", True) is not False


def gold_locations(q: dict) -> list[tuple[str, int, int]]:
    """Every acceptable (path, first line, last line): the ``gold`` list, else the single location."""
    if q.get("gold"):
        return [(g["path"], int(g["line_start"]), int(g["line_end"])) for g in q["gold"]]
    return [(q["path"], int(q["line_start"]), int(q["line_end"]))]


def gold_repos(q: dict) -> list[str]:
    """Each gold location's repo, in ``gold_locations``' order: the location's own ``repo`` where it names one (a
    Lagent question answered by the InternLM repo's page on Lagent too), else the question's."""
    return [g.get("repo") or q["repo"] for g in q["gold"]] if q.get("gold") else [q["repo"]]


def is_hit(hit: Hit, q: dict) -> bool:
    """The hit overlaps any of the question's gold locations, in that location's repo."""
    return any(hit.source == repo and hit.path == path and hit.line_start <= b and hit.line_end >= a
               for repo, (path, a, b) in zip(gold_repos(q), gold_locations(q)))


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def states_facts(text: str, facts: list[list[str]]) -> bool:
    """Every group matched by one of its alternatives, ignoring case and spaces."""
    flat = _flat(text)
    return all(any(_flat(alt) in flat for alt in group) for group in facts)


def facts_in_hits(hits: list[Hit], q: dict) -> bool | None:
    """Whether the hits' texts together state the question's key facts, from any file (None: it lists none).

    The gold lines are one place an answer lives; the same facts in another
    copy (README.md, README_zh-CN.md, docs/) serve the reader as well.
    """
    return states_facts("\n".join(h.text for h in hits), q["facts"]) if q.get("facts") else None


def category(q: dict) -> str:
    """The question's category as written, else "specific" (a deep fact)."""
    return str(q.get("category") or "specific")


def scores(ranks: list[int | None], facts: list[bool | None] | None = None) -> dict:
    n = len(ranks) or 1
    stated = [f for f in facts or [] if f is not None]
    return {
        "n": len(ranks),
        "hit@1": round(sum(1 for r in ranks if r == 1) / n, 4),
        "hit@k": round(sum(1 for r in ranks if r) / n, 4),
        "mrr": round(sum(1 / r for r in ranks if r) / n, 4),
        **({"facts@k": round(sum(stated) / len(stated), 4)} if stated else {}),
    }


def gold_passage(kb, q: dict) -> str:
    """The gold lines as indexed, to read beside the top hit; empty when the file is not indexed here."""
    try:
        lines = kb.read_document(q["repo"], q["path"]).text.split("\n")
    except KBError:
        return ""
    return "\n".join(lines[int(q["line_start"]) - 1 : int(q["line_end"])])


def gold_label(q: dict) -> str:
    return f"{q['repo']}/{q['path']}:{q['line_start']}-{q['line_end']}"


def unindexed(questions: list[dict], indexed: set[str]) -> tuple[list[str], int]:
    """The sources the questions name that aren't indexed here, and how many questions name one: said before a
    run (the CLI's note, the Evaluation page's warning), as those questions can only miss."""
    missing = sorted({q["repo"] for q in questions} - set(indexed))
    return missing, sum(q["repo"] in missing for q in questions)


def split_indexed(questions: list[dict], indexed: set[str] | None) -> tuple[list[dict], list[dict]]:
    """The questions on an indexed source, and one row (id, question, repo, gold) for each of the others.

    ``indexed`` None: every question is kept (it is scored even if its repo is
    missing, and then can only miss). Raises when no question is left.
    """
    if indexed is None:
        return list(questions), []
    kept = [q for q in questions if q["repo"] in indexed]
    left = [{"id": q["id"], "question": q["question"], "repo": q["repo"],
             "gold": gold_label(q) if answerable(q) else ""} for q in questions if q["repo"] not in indexed]
    if questions and not kept:
        repos = ", ".join(sorted({q["repo"] for q in questions}))
        raise KBError(f"none of the {len(questions)} questions is on an indexed source (they ask about {repos}): "
                      "add and sync one of those sources, or score every question")
    return kept, left


def evaluate(engine: SearchEngine, questions: list[dict], options: SearchOptions,
             indexed: set[str] | None = None) -> dict:
    """Score retrieval; with ``indexed``, only the questions on those sources (the rest listed as ``not_indexed``)."""
    rows = []
    t0 = time.perf_counter()
    questions, not_indexed = split_indexed(questions, indexed)
    questions = [q for q in questions if answerable(q)]
    if not questions:
        raise KBError("no answerable question to score retrieval on")
    for q in questions:
        hits = engine.search(q["question"], options)
        rank = next((h.rank for h in hits if is_hit(h, q)), None)
        top = hits[0] if hits else None
        rows.append({
            "id": q["id"], "question": q["question"], "lang": q.get("lang", ""), "category": category(q), "rank": rank,
            "facts_in_hits": facts_in_hits(hits, q),
            "gold": gold_label(q), "gold_text": gold_passage(engine.kb, q),
            "top_hit": top.citation if top else "", "top_text": top.text if top else "",
        })
    by_category = {
        cat: scores([r["rank"] for r in rows if r["category"] == cat],
                    [r["facts_in_hits"] for r in rows if r["category"] == cat])
        for cat in sorted({r["category"] for r in rows},
                         key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), c))
    }
    return {
        **scores([r["rank"] for r in rows], [r["facts_in_hits"] for r in rows]),
        "by_category": by_category,
        "k": options.k,
        "mode": options.mode,
        "misses": [r["id"] for r in rows if not r["rank"]],
        "results": rows,
        **({"not_indexed": not_indexed} if indexed is not None else {}),
        "seconds": round(time.perf_counter() - t0, 2),
    }


KINDS = ("retrieval", "answers")


def _runs_folder(home: Path, kind: str) -> Path:
    if kind not in KINDS:
        raise KBError(f"unknown kind of evaluation run {kind!r}: use one of {', '.join(KINDS)}")
    folder = Path(home) / "evals"
    return folder / "answers" if kind == "answers" else folder


def save_run(home: Path, report: dict, config: dict, kind: str = "retrieval") -> Path:
    """Keep a run with what it measured (chunking, model, mode, k); answer runs in ``evals/answers``."""
    folder = _runs_folder(home, kind)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{report['mode']}-k{report['k']}"
    path = folder / f"{name}.json"
    n = 1
    while path.exists():  # two runs in one second: keep both
        n += 1
        path = folder / f"{name}-{n}.json"
    path.write_text(json.dumps({"time": time.time(), "kind": kind, "config": config, **report}, ensure_ascii=False,
                               indent=1))
    return path


def question_set(run: dict) -> str:
    """The file name of the questions a saved run measured: runs compare only within one set."""
    return Path(str((run.get("config") or {}).get("questions") or "unknown")).name


def past_runs(home: Path, kind: str = "retrieval") -> list[dict]:
    """Saved runs of one kind (``retrieval`` or ``answers``), oldest first; unreadable files are skipped."""
    folder = _runs_folder(home, kind)
    runs = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            run = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(run, dict):
            runs.append(run)
    return sorted(runs, key=run_time)


def run_time(run: dict) -> float:
    """When a saved run ran (Unix time; 0 when its file doesn't say)."""
    try:
        return float(run.get("time") or 0)
    except (TypeError, ValueError):
        return 0.0


def run_label(run: dict) -> str:
    """A saved run as a chart reads it: when it ran (to the second), then its mode and k."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run_time(run)))
    return f"{stamp} · {run.get('mode', '?')} k{run.get('k', '?')}"
