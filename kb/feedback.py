"""The feedback loop: answers rated in the chat become evaluation questions.

The chat stores a rating on the assistant message it rates, in the saved
conversation (``kb/conversations.py``)::

    {"role": "assistant", "question", "content", "sources": [...], ...,
     "feedback": {"score": 0 | 1, "comment": str, "at": unix_ts}}

(score 1 is a thumbs up, 0 a thumbs down). :func:`rated_answers` lists those
answers, newest rating first. :func:`add_question` turns one (usually a thumbs
down) into a question with gold lines, appended to
``KB_HOME/questions/feedback.jsonl`` in the format of the shipped question sets
(``kb/evaluate.py``: ``id, question, repo, path, line_start, line_end``, a
``gold`` list, optional ``facts``), which the evaluation then offers as a
question set of its own.
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

from kb.conversations import ConversationStore
from kb.errors import KBError
from kb.evaluate import feedback_questions, load_questions
from kb.ingest.sources import validate_name
from kb.words import CJK_RE

MAX_QUESTION_CHARS = 2000
MAX_FACT_CHARS = 200


# ---------------------------------------------------------------------------- rated answers


def _rating(msg: dict) -> dict | None:
    """The message's feedback as ``{score, comment, at}``, or None when it has none (or a malformed one)."""
    fb = msg.get("feedback")
    if not isinstance(fb, dict):
        return None
    score = fb.get("score")
    if isinstance(score, bool) or score not in (0, 1):
        return None
    try:
        at = float(fb.get("at") or 0)
    except (TypeError, ValueError):
        at = 0.0
    comment = fb.get("comment")
    return {"score": int(score), "comment": comment if isinstance(comment, str) else "", "at": at}


def rated_answers(home: Path) -> list[dict]:
    """Every rated assistant message of the saved conversations, newest rating first.

    Each: ``question``, ``searched`` (a follow-up rewritten to stand alone, as it was searched; else the
    question), ``answer``, ``sources`` (the answer's hits as saved:
    source, path, line_start, line_end, commit, url, text, ...), ``cited``
    (the source numbers the answer marks), ``score`` (1 up, 0 down),
    ``comment``, ``conversation`` (its id), ``title``, ``message`` (the
    message's index in it) and ``when`` (the rating's Unix time). Broken
    conversation files and malformed ratings are skipped.
    """
    store = ConversationStore(home)
    out = []
    for info in store.list():
        try:
            conv = store.load(info["id"])
        except KBError:
            continue
        messages = conv.get("messages") or []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") != "assistant":
                continue
            rating = _rating(msg)
            if rating is None:
                continue
            question = msg.get("question")
            if not isinstance(question, str) or not question:
                asked = [m for m in messages[:i] if isinstance(m, dict) and m.get("role") == "user"]
                question = str(asked[-1].get("content", "")) if asked else ""
            sources = [h for h in (msg.get("sources") or []) if isinstance(h, dict)]
            standalone = msg.get("standalone")
            out.append({
                "question": question, "answer": str(msg.get("content") or ""), "sources": sources,
                # a follow-up ("它支持哪些模型？") as it was searched: the question that means something on its own
                "searched": standalone.strip() if isinstance(standalone, str) and standalone.strip() else question,
                "cited": [n for n in (msg.get("cited") or []) if isinstance(n, int)],
                "score": rating["score"], "comment": rating["comment"], "when": rating["at"] or info["updated"],
                "conversation": conv["id"], "title": info["title"], "message": i,
            })
    return sorted(out, key=lambda r: -r["when"])


# ---------------------------------------------------------------------------- saving a question


def _int(value, what: str) -> int:
    if isinstance(value, bool):
        raise KBError(f"{what} must be a line number, not {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise KBError(f"{what} must be a line number, not {value!r}")
    if value < 1:
        raise KBError(f"{what} must be 1 or more, not {value}")
    return value


def _path(value, n: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KBError(f"gold location {n}: give the file's path in its source (e.g. docs/en/install.md)")
    path = value.strip()
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise KBError(f"gold location {n}: {path!r} is not a path inside a source (no leading /, no . or .. parts)")
    return path


def _gold(gold, source: str | None) -> tuple[str, list[dict]]:
    """The question's source and its gold locations, checked: one source, paths in it, line ranges."""
    if not isinstance(gold, (list, tuple)) or not gold:
        raise KBError("give at least one gold location: the source, path and lines that answer the question")
    named: list[str] = [source] if source else []
    out: list[dict] = []
    for n, g in enumerate(gold, 1):
        if not isinstance(g, dict):
            raise KBError(f"gold location {n} must be {{source, path, line_start, line_end}}, not {g!r}")
        if g.get("source"):
            named.append(str(g["source"]))
        a = _int(g.get("line_start"), f"gold location {n}: line_start")
        b = _int(g.get("line_end"), f"gold location {n}: line_end")
        if b < a:
            raise KBError(f"gold location {n}: line_end {b} is before line_start {a}")
        loc = {"path": _path(g.get("path"), n), "line_start": a, "line_end": b}
        if loc not in out:
            out.append(loc)
    repos = sorted(set(named))
    if not repos:
        raise KBError("name the source the gold lines are in (a question's gold lines are all in one source)")
    if len(repos) > 1:
        raise KBError(f"the gold locations are in several sources ({', '.join(repos)}); a question's gold lines "
                      "must all be in one source: save one question per source")
    return validate_name(repos[0]), out


def parse_facts(text: str) -> list[list[str]] | None:
    """Facts as a person types them: one per line, alternatives on a line separated by ``|`` (``0.05 | 5%``);
    blank lines and empty alternatives dropped; None when nothing is left."""
    groups = [[alt.strip() for alt in line.split("|") if alt.strip()] for line in text.splitlines()]
    return [g for g in groups if g] or None


def _facts(facts) -> list[list[str]] | None:
    """``[["alt", ...], ...]``; a plain string in the list is a group of one. None or empty: no facts."""
    if facts is None:
        return None
    if isinstance(facts, str) or not isinstance(facts, (list, tuple)):
        raise KBError('facts must be a list of groups of alternatives, e.g. [["0.05"], ["1.02", "1.02x"]]')
    out = []
    for n, group in enumerate(facts, 1):
        alts = [group] if isinstance(group, str) else group
        if not isinstance(alts, (list, tuple)) or not all(isinstance(a, str) for a in alts):
            raise KBError(f"fact {n} must be a text or a list of alternative texts, not {group!r}")
        alts = [a.strip() for a in alts if a.strip()]
        if not alts:
            raise KBError(f"fact {n} is empty")
        if any(len(a) > MAX_FACT_CHARS for a in alts):
            raise KBError(f"fact {n} is longer than {MAX_FACT_CHARS} characters: a fact is a short text the answer "
                          "must contain")
        out.append(alts)
    return out or None


@contextmanager
def _locked(path: Path):
    """One writer at a time on the question file (two admins saving at once both keep their line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _existing(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            q = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(q, dict):
            out.append(q)
    return out


def _next_id(existing: list[dict]) -> str:
    numbers = [int(m.group(1)) for q in existing if (m := re.fullmatch(r"feedback-(\d+)", str(q.get("id", ""))))]
    return f"feedback-{max(numbers, default=0) + 1:03d}"


def add_question(home: Path, question: str, gold: list[dict], facts: list | None = None, *,
                 source: str | None = None, answer: str = "", conversation: str = "") -> Path:
    """Append a question with its gold lines to ``KB_HOME/questions/feedback.jsonl``; returns that file.

    ``gold``: one or more ``{source?, path, line_start, line_end}`` (lines
    1-based, inclusive), all in one source (each may name it, or pass
    ``source``). ``facts``: optional ``[["alt", ...], ...]`` that a good answer
    states. ``answer`` (the expected answer, for people) and ``conversation``
    (where the rating came from) are kept with it. Bad input raises
    :class:`KBError` with what to fix; nothing is written then.
    """
    if not isinstance(question, str) or not question.strip():
        raise KBError("the question is empty")
    text = " ".join(question.split())
    if len(text) > MAX_QUESTION_CHARS:
        raise KBError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
    repo, locations = _gold(gold, source)
    groups = _facts(facts)
    path = feedback_questions(home)
    with _locked(path):
        existing = _existing(path)
        same = next((q for q in existing if " ".join(str(q.get("question", "")).split()) == text), None)
        if same is not None:
            raise KBError(f"this question is already in {path.name} (id {same.get('id')}); edit the file to change it")
        first = locations[0]
        row = {
            "id": _next_id(existing), "lang": "zh" if CJK_RE.search(text) else "en", "question": text, "repo": repo,
            "path": first["path"], "line_start": first["line_start"], "line_end": first["line_end"],
            "gold": locations, **({"facts": groups} if groups else {}),
            **({"answer": answer.strip()} if isinstance(answer, str) and answer.strip() else {}),
            "origin": "feedback", **({"conversation": conversation} if conversation else {}),
            "added": round(time.time(), 3),
        }
        line = json.dumps(row, ensure_ascii=False)
        load_questions(path, text=line)  # the format every question set is read with
        with open(path, "ab+") as fh:
            end = fh.seek(0, 2)
            if end:
                fh.seek(end - 1)
                if fh.read(1) != b"\n":  # a file edited by hand without a final newline
                    fh.write(b"\n")
            fh.write((line + "\n").encode("utf-8"))
    return path
