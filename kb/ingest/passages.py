"""Passages: small pieces of each chunk, searched to find the chunk.

A chunk is what a user reads and cites (about 400 tokens, so the answer has
context), but it is a poor unit to *match*: the packaged USE encoder is a
sentence encoder, and one vector for 400 tokens blurs the one line a question
is about; BM25 on a long chunk dilutes a rare term too. So each chunk is also
split into passages of ``ChunkConfig.passage_size`` (120 tokens by default),
which get their own vectors and BM25 words in a sibling Chroma collection.
A passage hit counts for its parent chunk (LangChain's parent-document
pattern, with Chroma metadata as the parent link). Measured on the dev set,
README "Retrieval tuning": dense hit@5 0.54 over chunks, 0.83 over passages.

A passage record keeps its vector, its BM25 words and its parent, but not its
text: that is a slice of its chunk's, which is what a user reads, and Chroma
indexes every stored text for full-text search by default, which nothing
here uses. Writing the passages' text cost 15 s of a 125 s ingest of the six
repos. (A collection ``Schema`` without that index saves less: README
"Benchmarks".)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from kb.ingest.chunking import Chunk, ChunkConfig, make_splitter

@dataclass
class Passage:
    id: str
    parent: str  # the chunk's id
    source: str
    path: str
    embed_text: str
    text_hash: str
    bm25_tokens: str = ""
    document = None  # Chroma stores no text for a passage (see the module's docstring)

    def metadata(self) -> dict[str, str]:
        return {"parent": self.parent, "source": self.source, "path": self.path,
                "text_hash": self.text_hash, "bm25": self.bm25_tokens}


def passage_splitter(config: ChunkConfig, token_len: Callable[[str], int] | None):
    """The chunk splitter's separators, at the passage size."""
    return make_splitter(replace(config, size=config.passage_size, overlap=config.passage_overlap, passage_size=0), token_len)


def split_passages(chunks: list[Chunk], config: ChunkConfig, token_len: Callable[[str], int] | None) -> list[Passage]:
    """Each chunk's passages; a chunk no longer than a passage is its own one passage.

    A chunk that repeats an earlier chunk of its document word for word gets none: its copy's passages have the
    same vectors and find the same text. Stored, hundreds of identical vectors (one sentence repeated down a file)
    cut Chroma's HNSW graph apart, and searches then silently missed other records (README "How indexing works").
    """
    if not config.passage_size:
        return []
    splitter = passage_splitter(config, token_len)
    out: list[Passage] = []
    firsts: set[tuple[str, str, str]] = set()
    for c in chunks:
        key = (c.source, c.path, c.text_hash)
        if key in firsts:
            continue
        firsts.add(key)
        pieces = [p for p in splitter.split_text(c.text) if p.strip()] or [c.text]
        for j, piece in enumerate(pieces):
            text = config.embed_text(c.heading, piece)
            text_hash = hashlib.sha256(text.encode()).hexdigest()
            pid = hashlib.sha256(f"{c.id}\0{j}".encode()).hexdigest()[:32]
            out.append(Passage(pid, c.id, c.source, c.path, text, text_hash))
    return out
