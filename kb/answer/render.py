"""An answer as Markdown: each sentence followed by a link to the lines that support it, or a calm flag.

Plain Python (the chat page renders the string), so the CLI and the tests
read the same text the user sees. A citation links to the dashboard's own
Documents page with those lines highlighted (``kb.citations.viewer_link``);
the permalink on the web host sits with the source below the answer.
"""

from __future__ import annotations

from kb.citations import MARKER_RE, link_markers, viewer_link
from kb.markdown import safe_url

UNSUPPORTED = ":gray-badge[not found in the sources]"


def _clean(sentence: str) -> str:
    """The sentence without the model's own markers (the checked citation replaces them)."""
    return MARKER_RE.sub("", sentence).rstrip()


def cite(sentence: dict, sources: list[dict]) -> str:
    n = sentence.get("source")
    if not n or not 1 <= n <= len(sources):
        return UNSUPPORTED if sentence.get("claim") else ""
    h = sources[n - 1]
    link = viewer_link(h["source"], h["path"], sentence["line_start"], sentence["line_end"])
    lines = f"{sentence['line_start']}" + (f"–{sentence['line_end']}" if sentence["line_end"] != sentence["line_start"] else "")
    return f"[\\[{n}\\]]({safe_url(link)} \"{h['path']}, line {lines}\")"


def answer_markdown(msg: dict) -> str:
    """``msg``: the chat's stored answer (``content``, ``sentences``, ``sources``). Text between sentences
    (line breaks, list markers) is kept as the model wrote it."""
    content, sentences, sources = msg.get("content") or "", msg.get("sentences") or [], msg.get("sources") or []
    if not sentences:
        return link_markers(content, [h.get("url", "") for h in sources])
    out, cursor = [], 0
    for x in sentences:
        at = content.find(x["text"], cursor)
        if at < 0:  # the stored text no longer matches: show it plainly rather than misplace links
            return link_markers(content, [h.get("url", "") for h in sources])
        out.append(content[cursor:at])
        tag = cite(x, sources)
        out.append(_clean(x["text"]) + (" " + tag if tag else ""))
        cursor = at + len(x["text"])
    out.append(content[cursor:])
    return "".join(out)
