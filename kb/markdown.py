"""Document text made safe to show as Markdown, with the query's terms highlighted.

Pages render chunk text, headings and paths from indexed files through
``st.markdown``; without escaping, a document could inject HTML, links,
LaTeX or Streamlit directives (``:red[...]``) into the dashboard. Pure
Python, so the CLI and tests can use it too. Counts shown beside such text
("1 source", "3 code lines") are written here too, once for every page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from markdown_it import MarkdownIt

# Every ASCII punctuation mark may be backslash-escaped in CommonMark; these are the
# ones that could start Markdown, HTML, an entity, LaTeX ($) or a Streamlit
# directive/emoji shortcode (:color[...], :smile:).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~$:=^\"'])")


FENCES = ("```", "~~~")


def is_fence(line: str) -> bool:
    """A line that opens or closes a fenced code block."""
    return FENCE_RE.fullmatch(line) is not None


_LINKING = re.compile(r"[\\\[\]<>]|!(?=\\?\[)")


# A fenced code block's fence: three or more backticks or tildes, and no backtick after backticks ("```x``` is"
# opens nothing). CommonMark allows three spaces before one, counted from the list item it sits in; the docs' install
# steps indent theirs under "1." by 3 to 9 spaces, so any indentation is taken (an indented code block showing a
# fence is rarer than those). Then what may stand between the opening fence and the code: blank lines and MyST's
# directive options (":caption: …").
FENCE_RE = re.compile(r"^[ \t]*(`{3,}(?=[^`\n]*$)|~{3,})(.*)$", re.MULTILINE)
OPTION_LINE_RE = re.compile(r"[ \t]*(?::[\w-]+:.*|---)?[ \t]*")


@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block's offsets in its document."""

    opens: int  # where its opening fence's line starts
    code: int  # where its first code line starts (after blank lines and directive options)
    closes: int | None = None  # where its closing fence's line starts (None: open to the end)
    closed: int | None = None  # where that line ends


def code_blocks(text: str) -> list[CodeBlock]:
    """The document's fenced code blocks, paired as CommonMark pairs fences (a closing fence is as long as the
    opening one at least, of the same character, with nothing after it)."""
    out: list[CodeBlock] = []
    opened: tuple[int, str] | None = None
    for m in FENCE_RE.finditer(text):
        if opened is None:
            opened = (m.start(), m.group(1))
            out.append(CodeBlock(m.start(), _code_start(text, m.end())))
        elif _closes(m, opened[1]):
            out[-1] = replace(out[-1], closes=m.start(), closed=m.end())
            opened = None
    return out


def fence_partners(lines: Sequence[str], opened: str | None = None) -> dict[int, int]:
    """Each fence line's index mapped to its partner's: -1 for the close of a block opened before ``lines``
    (``opened``: its fence), ``len(lines)`` for a block still open after them. Paired as ``code_blocks`` pairs them.

    An excerpt of a file may hold half a code block; its lone fence reads to a model as the *opening* of one, so
    the prose after it becomes code, and the excerpts after it with it (kb/answer/context.py).
    """
    out: dict[int, int] = {}
    block: tuple[int, str] | None = None if opened is None else (-1, opened)
    for i, line in enumerate(lines):
        m = FENCE_RE.fullmatch(line)
        if m is None:
            continue
        if block is None:
            block = (i, m.group(1))
        elif _closes(m, block[1]):
            out[i], out[block[0]] = block[0], i
            block = None
    if block is not None:
        out[block[0]] = len(lines)
    out.pop(-1, None)
    return out


def fenced_lines(lines: Sequence[str]) -> list[bool]:
    """Which lines belong to a fenced code block, fences included (a block never closed runs to the end): there
    "# …" is a comment, not a heading, and "- …" is code, not a list item. One pairing for the loader's heading
    paths and the support check's contexts, as ``fence_partners`` pairs fences (a ```` ```` ```` block around a
    ```` ``` ```` one, MyST's nesting, is one block)."""
    out = [False] * len(lines)
    for i, j in fence_partners(lines).items():
        for k in range(i, min(j, len(lines) - 1) + 1):
            out[k] = True
    return out


def open_fence(lines: Sequence[str], before: int, opened: str | None = None) -> str | None:
    """The fence of the code block that line ``before`` (0-based) sits in or closes, or None outside one
    (``opened``: the fence of a block ``lines`` start in)."""
    block = opened
    for line in lines[:before]:
        m = FENCE_RE.fullmatch(line)
        if m is not None:
            block = m.group(1) if block is None else None if _closes(m, block) else block
    return block


def _closes(m: re.Match, opening: str) -> bool:
    """CommonMark: a closing fence is as long as the opening one at least, of the same character, nothing after."""
    return m.group(1)[0] == opening[0] and len(m.group(1)) >= len(opening) and not m.group(2).strip()


def _code_start(text: str, pos: int) -> int:
    """The start of the first line after ``pos`` that is neither blank nor a directive option."""
    while pos < len(text):
        nl = text.find("\n", pos + 1)
        line_end = len(text) if nl < 0 else nl
        line = text[pos + 1:line_end] if text[pos] == "\n" else text[pos:line_end]
        if not OPTION_LINE_RE.fullmatch(line):
            return pos + 1 if text[pos] == "\n" else pos
        pos = line_end
    return len(text)


def plain_message(text: str) -> str:
    """A message for an error or warning box, with nothing in it that links, shows an image or makes HTML.

    Messages quote what others wrote (a git server's ``fatal:`` line, a page address's ``?c=``): a second review
    put an image and a sign-in link into a warning through a shared link. Only brackets, angles and backslashes are
    escaped, so the message reads as written otherwise ("line range like 3-9", ``'bad name!'``).
    """
    return _LINKING.sub(lambda m: "\\" + m.group(0), text)


def escape_markdown(text: str) -> str:
    """Text shown literally by st.markdown: no formatting, links, HTML or directives from it."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def code_span(text: str) -> str:
    """Text shown literally as inline code. Inside a code span a backslash escape shows as written
    (``escape_markdown`` there gave "xtuner/README\\.md"), so the text is fenced instead, with one backtick more
    than its longest run of them, and kept on one line."""
    text = " ".join(text.split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if not text or text[0] == "`" or text[-1] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_COMMONMARK = MarkdownIt("commonmark")
NO_IMAGE = "&#33;["  # "![" with its "!" as an entity: read as text, so it starts no image, even after a backslash


def _has_image(markdown: str) -> bool:
    return any(child.type == "image" for token in _COMMONMARK.parse(markdown) for child in token.children or ())


def no_images(markdown: str) -> str:
    """Model-written Markdown with no image in it: each ``![`` outside code blocks made text, so ``![alt](url)``
    reads as "!" and a link.

    A browser fetches an image as soon as it is shown: an answer talked into writing ``![](https://host/?q=...)``
    by a document it read would send what it was asked to that host, unclicked (a security review). A link waits
    for a click, and Streamlit refuses ``javascript:`` ones. Where the blocks of code are is read by a CommonMark
    parser (a second review's ``\\![x](u)``, a lone backtick and a fence that is none got past a line-by-line
    reading); and the result is parsed again: should an image remain, every "!" becomes text.
    """
    if not _has_image(markdown):
        return markdown  # nearly every answer: left exactly as written
    code = {line for token in _COMMONMARK.parse(markdown) if token.type in ("fence", "code_block") and token.map
            for line in range(*token.map)}
    lines = markdown.split("\n")
    out = "\n".join(line if i in code else line.replace("![", NO_IMAGE) for i, line in enumerate(lines))
    return out.replace("!", "&#33;") if _has_image(out) else out


def streamed_without_images(pieces: Iterable[str]) -> Iterator[str]:
    """``no_images`` for an answer as it streams: a ``!`` that ends a piece waits for the next one. Code isn't told
    apart here (a streamed line of code may show ``&#33;[`` until the answer is redrawn whole, through
    ``no_images``)."""
    held = ""
    for piece in pieces:
        text = held + piece
        held = "!" if text.endswith("!") else ""
        yield text[:len(text) - len(held)].replace("![", NO_IMAGE)
    if held:
        yield held


def link_title(text: str) -> str:
    """Text for a link's quoted title (``[x](url "title")``): a ``"`` in a file's name ended the title, and what
    followed it (an image, another link) became part of every answer citing that file (a security review)."""
    return " ".join(text.split()).replace("\\", "\\\\").replace('"', '\\"')


def safe_url(url: str) -> str:
    """A URL that can sit inside ``[text](url)`` without ending the link early."""
    return url.replace("(", "%28").replace(")", "%29").replace(" ", "%20")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _terms_re(terms: Iterable[str]) -> re.Pattern[str] | None:
    uniq = sorted({t for t in terms if t and t.strip()}, key=len, reverse=True)
    if not uniq:
        return None
    return re.compile("|".join(re.escape(t) for t in uniq), re.IGNORECASE)


def mark_terms(text: str, terms: Iterable[str], style: str = "orange-background") -> str:
    """Escaped Markdown of ``text`` with each occurrence of a term wrapped in ``:style[...]``."""
    pattern = _terms_re(terms)
    if pattern is None:
        return escape_markdown(text)
    out, pos = [], 0
    for m in pattern.finditer(text):
        out.append(escape_markdown(text[pos : m.start()]))
        out.append(f":{style}[{escape_markdown(m.group(0))}]")
        pos = m.end()
    out.append(escape_markdown(text[pos:]))
    return "".join(out)


def snippet(text: str, terms: Iterable[str], width: int = 320) -> str:
    """A one-line excerpt of about ``width`` characters around the first query term (raw text)."""
    flat = _one_line(text)
    if len(flat) <= width:
        return flat
    pattern = _terms_re(terms)
    m = pattern.search(flat) if pattern else None
    start = 0 if m is None else max(0, min(m.start() - width // 4, len(flat) - width))
    piece = flat[start : start + width]
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(flat) else "")


def marked_snippet(text: str, terms: Iterable[str], width: int = 320) -> str:
    terms = list(terms)
    return mark_terms(snippet(text, terms, width), terms)


def counted(n: int, noun: str) -> str:
    """ "1 source", "2 sources", "1,024 chunks": a count with its noun, as a person writes it (it said "1 sources")."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
