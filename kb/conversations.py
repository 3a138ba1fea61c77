"""Chat conversations saved as JSON files under ``KB_HOME/conversations``.

One file per conversation, ``<id>.json``, written atomically (temporary file
then rename), so a crash never leaves half a conversation. A conversation is
a dict::

    {"id", "title", "created", "updated", "messages": [{"role": "user"|"assistant", "content", ...}]}

Assistant messages may carry more (sources, cited markers, timings, the no-RAG
answer of a comparison); they are stored as given, so they must be JSON-safe.
Ids are generated here and checked on every read, so a name from a request can
never reach outside the folder.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from core import atomic
from kb.errors import KBError

if TYPE_CHECKING:
    from kb.answer.chain import Answer

ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
TITLE_CHARS = 60


def new_id(now: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)


def title_of(messages: list[dict]) -> str:
    """The first question, on one line, shortened."""
    first = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
    flat = " ".join(str(first).split())
    return (flat[: TITLE_CHARS - 1] + "…") if len(flat) > TITLE_CHARS else (flat or "(empty)")


def answer_fields(result: "Answer", *, seconds: float, first_token_seconds: float | None,
                  waited_seconds: float) -> dict:
    """An answer as its conversation keeps it: read back by the chat on reload, by ``kb.feedback`` (rated answers
    become questions) and by the log, so its shape is decided here, not in the page that streams it."""
    return {
        "content": result.answer, "sources": [h.as_dict() for h in result.sources], "cited": result.cited,
        "standalone": result.standalone_question, "also_as": result.also_as, "seconds": round(seconds, 3),
        "first_token_seconds": first_token_seconds, "waited_seconds": round(waited_seconds, 2),
        "sentences": [x.as_dict() for x in result.sentences], "declined": result.declined,
        "unverified": result.unverified, "tokens": result.tokens,
    }


def rating(score: int | None, comment: str = "") -> dict | None:
    """A message's feedback as saved (``kb.feedback`` reads it back): thumbs 1 or 0 with a comment; None clears it."""
    return None if score is None else {"score": score, "comment": comment or "", "at": time.time()}


def chat_history(messages: list[dict]) -> list[tuple[str, str]]:
    """The turns a follow-up is read with: every message that has text, a failed answer left out."""
    return [(m["role"], m["content"]) for m in messages if m.get("content") and not m.get("error")]


class ConversationStore:
    def __init__(self, home: Path) -> None:
        self.folder = Path(home) / "conversations"

    def _path(self, conv_id: str) -> Path:
        if not isinstance(conv_id, str) or not ID_RE.match(conv_id):
            raise KBError(f"not a conversation id: {conv_id!r}")
        return self.folder / f"{conv_id}.json"

    def new(self) -> dict:
        now = time.time()
        return {"id": new_id(now), "title": "", "created": now, "updated": now, "messages": []}

    def save(self, conv: dict) -> Path:
        """Write the conversation (its title follows its first question); returns the file.

        A disk that refuses it (full, read-only, the folder replaced by a file) is a :class:`KBError`, which the
        chat shows in its error box; the copy already saved stays as it was.
        """
        path = self._path(conv["id"])
        conv["title"] = title_of(conv.get("messages", []))
        conv["updated"] = time.time()
        conv.setdefault("created", conv["updated"])
        try:
            atomic.write_json(path, conv, ensure_ascii=False, indent=1)
        except OSError as exc:
            raise KBError(f"the conversation could not be saved: {exc}") from None
        return path

    def load(self, conv_id: str) -> dict:
        path = self._path(conv_id)
        try:
            conv = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KBError(f"no saved conversation {conv_id}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KBError(f"conversation {conv_id} can't be read: {exc}") from None
        if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
            raise KBError(f"conversation {conv_id} is not a conversation file")
        conv["id"] = conv_id
        return conv

    def list(self) -> list[dict]:
        """Saved conversations, newest first: id, title, updated, turns (questions asked)."""
        out = []
        if not self.folder.is_dir():
            return out
        for p in self.folder.glob("*.json"):
            if not ID_RE.match(p.stem):
                continue
            try:
                conv = json.loads(p.read_text(encoding="utf-8"))
                msgs = conv.get("messages", [])
                out.append({
                    "id": p.stem, "title": conv.get("title") or title_of(msgs),
                    "updated": float(conv.get("updated", p.stat().st_mtime)),
                    "turns": sum(1 for m in msgs if m.get("role") == "user"),
                })
            except (OSError, ValueError, AttributeError, TypeError):
                continue  # a broken file is skipped, not fatal
        return sorted(out, key=lambda c: -c["updated"])

    def delete(self, conv_id: str) -> None:
        try:
            self._path(conv_id).unlink(missing_ok=True)
        except OSError as exc:  # the chat's Delete button showed a traceback
            raise KBError(f"conversation {conv_id} could not be deleted: {exc}") from None
