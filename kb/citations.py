"""Citations: where a piece of an answer comes from, and how that is written down.

One module for every way a location is formatted, so the answer chain, the
CLI and the pages agree: the permalink to a file's lines at a commit on its
web host, the plain ``source/path:a-b@commit`` label, its Markdown form with a
link, and the ``[n]`` markers an answer uses to point at its sources.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlencode, urlsplit

from kb.markdown import escape_markdown, safe_url

# [2], [1, 3], 【1、2】: the markers an answer may use for its numbered sources.
VIEWER_PAGE = "documents"  # the Documents page's url_path (its file name, pages/documents.py)
MARKER_RE = re.compile(r"[\[【]\s*(\d+(?:\s*[,，、]\s*\d+)*)\s*[\]】]")


def permalink(web_url: str, commit: str, path: str, line_start: int, line_end: int) -> str:
    """Link to the file and lines at that commit; empty when the host is unknown."""
    if not web_url or not commit:
        return ""
    base = web_url.rstrip("/")
    if "gitlab" in (urlsplit(base).hostname or ""):  # GitLab: /-/blob/ and #L3-9
        return f"{base}/-/blob/{commit}/{path}#L{line_start}-{line_end}"
    return f"{base}/blob/{commit}/{path}#L{line_start}-L{line_end}"  # GitHub and Gitee: #L3-L9


def reanchor(url: str, line_start: int, line_end: int) -> str:
    """A permalink moved to other lines of the same file, in its host's anchor format."""
    if not url or "#L" not in url:
        return url
    base = url.split("#", 1)[0]
    if "/-/blob/" in base:  # GitLab
        return f"{base}#L{line_start}-{line_end}"
    return f"{base}#L{line_start}-L{line_end}"


def file_url(web_url: str, commit: str, path: str) -> str:
    """The whole file at that commit on its web host; empty when the host is unknown."""
    return permalink(web_url, commit, path, 1, 1).split("#")[0]


LINK_COMMIT = 12  # hex digits of the cited commit a deep link carries


def viewer_link(source: str, path: str, line_start: int, line_end: int, commit: str = "") -> str:
    """The dashboard's own deep link: the Documents page at that file, with those lines highlighted.

    Relative to the app's root, so it works behind any host and survives a
    reload (the page reads ``source``, ``path``, ``lines`` and ``commit`` from the
    URL). The commit lets the page find the cited lines after a sync has moved
    them: without it, an old answer's link highlighted whatever the new version
    held at those numbers, an empty line in the review's case.
    """
    query = {"source": source, "path": path, "lines": f"{line_start}-{line_end}"}
    if commit:
        query["commit"] = commit[:LINK_COMMIT]
    return f"{VIEWER_PAGE}?{urlencode(query)}"


def hit_link(hit: dict, line_start: int | None = None, line_end: int | None = None) -> str:
    """``viewer_link`` for a stored hit (its lines, or some of them), at the commit it was read at."""
    return viewer_link(hit["source"], hit["path"], hit["line_start"] if line_start is None else line_start,
                       hit["line_end"] if line_end is None else line_end, str(hit.get("commit") or ""))


MAX_RELOCATED = 2000  # lines: far above any chunk's (a citation's lines lie in one), far below an abusive link's
MAX_TRIED = 2000  # places compared in full at most: the nearest first, so the answer is the same when one matches


def relocate(then: Sequence[str], line_start: int, line_end: int, now: Sequence[str]) -> tuple[int, int] | None:
    """Where lines ``line_start..line_end`` of a file's old version stand in its new one (1-based), or None.

    The cited block must appear unchanged; of several places, the nearest to the old numbers. A block of blank
    lines alone is found everywhere, so nowhere. Only the places where the block's rarest line stands in the new
    version are compared, nearest first: a comparison at every place was quadratic, and a deep link naming
    thousands of identical lines held the dashboard for seconds per reload (two security reviews).
    """
    block = list(then[line_start - 1:line_end])
    if not block or not any(line.strip() for line in block) or len(block) > MAX_RELOCATED:
        return None
    size, wanted = len(block), set(block)
    seen: dict[str, list[int]] = {line: [] for line in wanted}
    for i, line in enumerate(now):
        if line in wanted:
            seen[line].append(i)
    k = min(range(size), key=lambda j: len(seen[block[j]]))  # the block's rarest line in the new version
    places = sorted((i - k for i in seen[block[k]] if 0 <= i - k <= len(now) - size),
                    key=lambda a: abs(a + 1 - line_start))
    for a in places[:MAX_TRIED]:
        if list(now[a:a + size]) == block:
            return a + 1, a + size
    return None


def parse_lines(value: str | None) -> tuple[int, int] | None:
    """``"3-9"`` (or ``"7"``) from a deep link as a line range; ``None`` when absent or malformed."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", value or "")
    if not m:
        return None
    a = int(m.group(1))
    b = int(m.group(2) or a)
    return (a, b) if 1 <= a <= b else None


def location(source: str, path: str, line_start: int, line_end: int, commit: str = "") -> str:
    """``source/path:a-b@commit8``: how the CLI, logs and evaluation name a hit."""
    return f"{source}/{path}:{line_start}-{line_end}" + (f"@{commit[:8]}" if commit else "")


def location_md(source: str, path: str, line_start: int, line_end: int, commit: str = "", url: str = "") -> str:
    """The location as Markdown (document text escaped), linked to its permalink when there is one."""
    loc = escape_markdown(f"{source}/{path}:{line_start}-{line_end}")
    if url:
        loc = f"[{loc}]({safe_url(url)})"
    return f"{loc} @ `{commit[:8]}`" if commit else loc


def marker_numbers(m: re.Match[str]) -> list[int]:
    """The source numbers of one ``MARKER_RE`` match: ``[2]``, ``[1, 3]``, ``【1、2】``."""
    return [int(n) for n in re.split(r"\s*[,，、]\s*", m.group(1))]


def cited_numbers(answer: str, n_sources: int) -> list[int]:
    """The ``[n]`` (also ``[1, 2]`` and ``【n】``) markers that name a real source."""
    found = {n for m in MARKER_RE.finditer(answer) for n in marker_numbers(m)}
    return sorted(n for n in found if 1 <= n <= n_sources)


def link_markers(answer: str, urls: Sequence[str]) -> str:
    """Turn the ``[n]`` markers of an answer into Markdown links to source n's permalink.

    ``urls[n-1]`` is source n's permalink ('' when it has none: the marker is
    shown bold). Markers naming no source are left as they are. The answer is
    the model's own Markdown, shown without HTML.
    """

    def one(n: int) -> str:
        url = urls[n - 1] if 1 <= n <= len(urls) else None
        if url is None:
            return f"[{n}]"
        if not url:
            return f"**\\[{n}\\]**"
        return f"[\\[{n}\\]]({safe_url(url)})"

    def repl(m: re.Match[str]) -> str:
        nums = marker_numbers(m)
        if not any(1 <= n <= len(urls) for n in nums):
            return m.group(0)
        return "".join(one(n) for n in nums)

    return MARKER_RE.sub(repl, answer)
