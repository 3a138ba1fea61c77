"""An answer as Markdown: each sentence followed by a link to the lines that support it, or a calm flag.

Plain Python (the chat page renders the string), so the CLI and the tests
read the same text the user sees. A citation links to the dashboard's own
Documents page with those lines highlighted (``kb.citations.viewer_link``);
the permalink on the web host sits with the source below the answer.
"""

from __future__ import annotations

import re

from kb.citations import MARKER_RE, hit_link, link_markers
from kb.markdown import FENCES, counted, is_fence, link_title, no_images, safe_url

UNSUPPORTED = ":gray-badge[not found in the sources]"


MARKER_AND_SPACE_RE = re.compile(r"[ \t]*" + MARKER_RE.pattern)


def _clean(sentence: str) -> str:
    """The sentence without the model's own markers, or the space before them ("pip [1]." reads "pip.");
    the checked citation replaces them."""
    return MARKER_AND_SPACE_RE.sub("", sentence).rstrip()


def cite(sentence: dict, sources: list[dict]) -> str:
    n = sentence.get("source")
    if not n or not 1 <= n <= len(sources):
        return UNSUPPORTED if sentence.get("claim") else ""
    h = sources[n - 1]
    link = hit_link(h, sentence["line_start"], sentence["line_end"])
    lines = f"{sentence['line_start']}" + (f"–{sentence['line_end']}" if sentence["line_end"] != sentence["line_start"] else "")
    return f"[\\[{n}\\]]({safe_url(link)} \"{link_title(h['path'])}, line {lines}\")"


def _block_citations(lines: list[dict], sources: list[dict]) -> str:
    """The citations of a code block's lines on a line of their own below the block: one per source, spanning the
    lines the block's lines were found at (three lines of one command showed "[1] [1] [1]", each linking one line),
    and a paragraph of their own (the next sentence was read as carrying them: a browser review)."""
    found: dict = {}  # in order of first appearance: a source's number → its lines' span; a bare tag → itself
    for x in lines:
        n = x.get("source")
        if n and 1 <= n <= len(sources):
            span = found.setdefault(n, dict(x))
            span["line_start"] = min(span["line_start"], x["line_start"])
            span["line_end"] = max(span["line_end"], x["line_end"])
        elif tag := cite(x, sources):
            found.setdefault(tag, tag)
    unique = [v if isinstance(v, str) else cite(v, sources) for v in found.values()]
    return ("\n" + " ".join(unique) + "\n") if unique else ""


def answer_markdown(msg: dict) -> str:
    """``msg``: the chat's stored answer (``content``, ``sentences``, ``sources``). Text between sentences
    (line breaks, list markers) is kept as the model wrote it.

    A line inside a fenced code block stays exactly as written: a link appended to `pip install xtuner` would
    be shown as part of the command and copied with it. Its citation goes below the block instead.
    """
    return no_images(_linked(msg))


def _linked(msg: dict) -> str:
    content, sentences, sources = msg.get("content") or "", msg.get("sentences") or [], msg.get("sources") or []
    if not sentences:
        return link_markers(content, [h.get("url", "") for h in sources])
    out, cursor, in_code, pending = [], 0, False, []
    for x in sentences:
        at = content.find(x["text"], cursor)
        if at < 0:  # the stored text no longer matches: show it plainly rather than misplace links
            return link_markers(content, [h.get("url", "") for h in sources])
        out.append(content[cursor:at])
        cursor = at + len(x["text"])
        if is_fence(x["text"]):
            out.append(x["text"])
            if in_code:
                out.append(_block_citations(pending, sources))
                pending = []
            in_code = not in_code
            continue
        if in_code:
            out.append(x["text"])
            pending.append(x)
        else:
            tag = cite(x, sources)
            out.append(_clean(x["text"]) + (" " + tag if tag else ""))
    out.append(content[cursor:])
    if pending:  # a block the answer never closed (cut off at the token limit): close it, or the links are code
        out.append(("" if content.endswith("\n") else "\n") + FENCES[0] + _block_citations(pending, sources))
    return "".join(out)


def support_summary(claims: list[dict], content: str) -> list[str]:
    """How many sentences, and apart from them how many code lines, the sources hold.

    Counted together, a three-line install block and one unsupported sentence read "3 of 4 sentences found", an
    answer better supported than it is (a browser review).
    """
    code, inside = set(), False
    for line in content.split("\n"):
        if is_fence(line):
            inside = not inside
        elif inside:
            code.add(line.strip())
    lines = [x for x in claims if x["text"].strip() in code]
    prose = [x for x in claims if x["text"].strip() not in code]
    out = [f"{sum(x['supported'] for x in prose)} of {counted(len(prose), 'sentence')} found in the sources"] \
        if prose else []
    if lines:
        out.append(f"{sum(x['supported'] for x in lines)} of {counted(len(lines), 'code line')}")
    return out
