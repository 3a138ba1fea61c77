"""Split documents into chunks that know their exact file lines.

LangChain's ``RecursiveCharacterTextSplitter`` does the splitting; this module
adds what citations need: each chunk's line range in the file, the Markdown
heading path in force there, and a deterministic id.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from core import embeddings as emb
from core.settings import Settings
from kb.errors import KBError
from kb.ingest.loaders import LoadedDocument
from kb.markdown import code_blocks
from kb.citations import permalink

# Break Chinese text after 。！？； too, keeping the mark with its sentence
# (zero-width look-behinds), before falling back to spaces and characters.
SENTENCE_SEPARATORS = [r"(?<=[。！？；])", r"(?<=[.!?;])\s", r"(?<=[，,、])", " ", ""]
PLAIN_SEPARATORS = [r"\n\n", r"\n"] + SENTENCE_SEPARATORS
SPLITTERS = ("recursive", "markdown")
MAX_CHARS_PER_TOKEN = 10
UNITS = ("chars", "tokens")


@dataclass(frozen=True)
class ChunkConfig:
    """Everything that changes which chunks a document becomes."""

    splitter: str = "recursive"
    size: int = 500
    overlap: int = 150
    unit: str = "chars"
    heading_prefix: bool = False  # prepend the heading path to the embedded/BM25 text
    # bump when the splitting or BM25 tokenizing code changes its output (4: git line numbers; 5: a code block's
    # opening fence goes with its code, :func:`keep_openings`)
    version: int = 5
    # Size of the passages searched to find chunks (kb/passages.py), in ``unit``; 0: none.
    passage_size: int = 0

    def __post_init__(self) -> None:
        if self.splitter not in SPLITTERS:
            raise KBError(f"unknown splitter {self.splitter!r}: use one of {', '.join(SPLITTERS)}")
        if self.unit not in UNITS:
            raise KBError(f"unknown length unit {self.unit!r}: use one of {', '.join(UNITS)}")
        if self.size < 20 or self.size > 100_000:
            raise KBError(f"chunk size {self.size} is out of range (20..100000)")
        if self.overlap < 0 or self.overlap >= self.size:
            raise KBError(f"chunk overlap {self.overlap} must be >= 0 and smaller than the chunk size {self.size}")
        if self.passage_size and not 20 <= self.passage_size <= self.size:
            raise KBError(f"passage size {self.passage_size} must be 0 (no passages) or 20..{self.size} (the chunk size)")

    def _fields(self) -> dict:
        """The config as stored; no passages is left out, so older collections keep their names."""
        d = asdict(self)
        if not self.passage_size:
            del d["passage_size"]
        return d

    @functools.cached_property
    def hash(self) -> str:
        """Computed once per config: it is compared with every chunk's record (``kb verify`` read 4,660 of them in
        0.2 s of its 1.36, a sync stamps every chunk it makes)."""
        return hashlib.sha256(json.dumps(self._fields(), sort_keys=True).encode()).hexdigest()[:8]

    def to_json(self) -> str:
        return json.dumps(self._fields(), sort_keys=True)

    @property
    def passage_overlap(self) -> int:
        return self.passage_size // 8

    @classmethod
    def from_json(cls, raw: str) -> "ChunkConfig":
        return cls(**json.loads(raw))

    def embed_text(self, heading: str, text: str) -> str:
        """What is embedded and BM25-indexed for a chunk: its text, after its heading path if so configured."""
        return f"{heading}\n{text}" if self.heading_prefix and heading else text

    def label(self) -> str:
        return (f"{self.splitter} {self.size}/{self.overlap} {self.unit}" + (" +heading" if self.heading_prefix else "")
                + (f" +passages {self.passage_size}" if self.passage_size else ""))


@dataclass
class Chunk:
    """One piece of a document, with the provenance a citation needs."""

    id: str
    text: str
    embed_text: str
    text_hash: str
    source: str
    path: str
    commit: str
    line_start: int
    line_end: int
    heading: str
    chunk_config: str
    embed_model: str
    url: str
    n_tokens: int = 0
    language: str = ""
    bm25_tokens: str = ""  # space-joined BM25 tokens, computed once at sync time

    @property
    def document(self) -> str:
        """The text Chroma stores with the record: what a user reads and cites."""
        return self.text

    def metadata(self) -> dict[str, str | int]:
        return {
            "source": self.source,
            "path": self.path,
            "commit": self.commit,
            "line_start": self.line_start,
            "line_end": self.line_end,
            "heading": self.heading,
            "chunk_config": self.chunk_config,
            "embed_model": self.embed_model,
            "url": self.url,
            "text_hash": self.text_hash,
            "n_tokens": self.n_tokens,
            "language": self.language,
            "bm25": self.bm25_tokens,
        }


@dataclass(frozen=True)
class Splitter:
    """LangChain's splitter with the length it measures in (characters or model tokens).

    Folding small pieces into a neighbour (:func:`merge_small`) must measure
    exactly as the splitter did, so the two travel together.
    """

    text_splitter: RecursiveCharacterTextSplitter
    length: Callable[[str], int]

    def split_text(self, text: str) -> list[str]:
        return self.text_splitter.split_text(text)


def make_splitter(config: ChunkConfig, token_len: Callable[[str], int] | None = None) -> Splitter:
    if config.splitter == "markdown":
        separators = RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN)
        separators = [s for s in separators if s not in ("\n\n", "\n", " ", "")] + PLAIN_SEPARATORS
    else:
        separators = PLAIN_SEPARATORS
    if config.unit == "tokens":
        if token_len is None:
            raise KBError("token-measured chunking needs the embedding model's tokenizer")

        def length(text: str) -> int:
            # A tokenizer may count a long run without spaces (a hash, base64, a hex dump) as one token:
            # then a 100,000-character line "fits" in a 400-token chunk. Text never counts for less than a
            # token per MAX_CHARS_PER_TOKEN characters (prose has 1-5), so such runs are still cut.
            return max(token_len(text), len(text) // MAX_CHARS_PER_TOKEN)
    else:
        length = len
    return Splitter(RecursiveCharacterTextSplitter(
        chunk_size=config.size,
        chunk_overlap=config.overlap,
        separators=separators,
        is_separator_regex=True,
        keep_separator="start",
        length_function=length,
        strip_whitespace=True,
    ), length)


def chunk_id(source: str, path: str, text_hash: str, occurrence: int) -> str:
    """Same source, path and text give the same id, so re-adding is idempotent."""
    return hashlib.sha256(f"{source}\0{path}\0{text_hash}\0{occurrence}".encode()).hexdigest()[:32]


def locate(text: str, pieces: list[str]) -> list[int]:
    """Character offset of each piece, in order (the splitter keeps order)."""
    starts: list[int] = []
    pos = 0
    for piece in pieces:
        at = text.find(piece, pos)
        if at < 0:
            at = text.find(piece)
        if at < 0:
            raise KBError(f"internal error: chunk not found in its document: {piece[:60]!r}")
        starts.append(at)
        pos = at + 1
    return starts


def merge_small(text: str, spans: list[tuple[int, int]], config: ChunkConfig, length) -> list[tuple[int, int]]:
    """Fold fragments shorter than a fifth of the chunk size into a neighbour.

    The recursive splitter emits a lone tail (a label such as "常用字段：" before
    a long code block) when the next piece is too big to join it. Alone, such
    fragments carry no meaning yet rank high in dense search. The merged span
    is the file's own contiguous text, so line provenance stays exact; it may
    exceed the chunk size by at most that fifth.
    """
    small = max(1, config.size // 5)
    limit = config.size + small
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(spans):
        start, end = spans[i]
        if length(text[start:end]) < small:
            if i + 1 < len(spans) and length(text[start : max(end, spans[i + 1][1])]) <= limit:
                spans[i + 1] = (start, max(end, spans[i + 1][1]))
                i += 1
                continue
            if out and length(text[out[-1][0] : max(end, out[-1][1])]) <= limit:
                out[-1] = (out[-1][0], max(end, out[-1][1]))
                i += 1
                continue
        out.append((start, end))
        i += 1
    return out


def keep_openings(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Move a code block's opening fence (and its options), cut off from its code at a chunk's end, into the next
    chunk, which holds the code.

    MyST writes a blank line after a block's options, where the splitter
    breaks: 67 of the six repos' 4,660 chunks ended on "```{code-block} bash"
    and ":caption: Download Qwen3 8B model", the command itself in the next
    chunk. The chunk promised a command it did not hold, and an answer built
    from it copied the fence and stopped (blind30). The chunk keeps the
    sentence introducing the code; spans stay the file's own contiguous text.
    """
    blocks, spans = code_blocks(text), list(spans)
    opens = [b.opens for b in blocks]
    out: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(spans):
        # only the last block opening before the chunk's end can hold that end in its head
        last = bisect.bisect_left(opens, end) - 1
        opening = blocks[last] if last >= 0 else None
        if i + 1 < len(spans) and opening is not None and start <= opening.opens and end <= opening.code:
            spans[i + 1] = (min(spans[i + 1][0], opening.opens), spans[i + 1][1])
            if not text[start:opening.opens].strip():  # the chunk is the opening alone: it all goes
                continue
            end = len(text[:opening.opens].rstrip())
        out.append((start, end))
    return out


def split_document(
    doc: LoadedDocument,
    *,
    source: str,
    commit: str,
    web_url: str,
    config: ChunkConfig,
    embed_model: str,
    splitter: Splitter,
) -> list[Chunk]:
    """Split one document; each chunk's lines are the file's own line numbers."""
    pieces = [p for p in splitter.split_text(doc.text) if p.strip()]
    spans = merge_small(doc.text, [(s, s + len(p)) for p, s in zip(pieces, locate(doc.text, pieces))],
                        config, splitter.length)
    spans = keep_openings(doc.text, spans)
    newlines = [i for i, c in enumerate(doc.text) if c == "\n"]
    seen: Counter[str] = Counter()
    chunks = []
    for start, end in spans:
        piece = doc.text[start:end]
        line_start = bisect.bisect_left(newlines, start) + 1
        line_end = line_start + piece.count("\n")
        heading = doc.heading_at(line_start)
        embed_text = config.embed_text(heading, piece)
        text_hash = hashlib.sha256(embed_text.encode()).hexdigest()
        occurrence = seen[text_hash]
        seen[text_hash] += 1
        chunks.append(
            Chunk(
                id=chunk_id(source, doc.path, text_hash, occurrence),
                text=piece,
                embed_text=embed_text,
                text_hash=text_hash,
                source=source,
                path=doc.path,
                commit=commit,
                line_start=line_start,
                line_end=line_end,
                heading=heading,
                chunk_config=config.hash,
                embed_model=embed_model,
                url=permalink(web_url, commit, doc.path, line_start, line_end),
                language=doc.language,
            )
        )
    return chunks


def measure_tokens(settings: Settings, chunks: list[Chunk]) -> list[dict]:
    """Set each chunk's token count; list those longer than the model's window."""
    window = emb.max_tokens(settings)
    counts = emb.count_tokens(settings, [c.embed_text for c in chunks])
    over = []
    for c, n in zip(chunks, counts):
        c.n_tokens = n
        if window is not None and n > window:
            over.append({"path": c.path, "line_start": c.line_start, "line_end": c.line_end, "tokens": n, "window": window})
    return over
