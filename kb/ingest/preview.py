"""Re-chunk previews: what a candidate chunk config would make of one document, before building it.

- :func:`preview_chunks` splits one document with a candidate :class:`ChunkConfig`
  exactly as a sync would, and measures every chunk in embedding-model tokens
  against the model's window, so an admin sees before re-chunking how many
  chunks would be cut by the model.
- :func:`length_histogram`, :func:`line_cover` and :func:`annotated_lines` turn
  that into a chart and a line-numbered view with the chunks marked.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from core import embeddings as emb
from core.settings import Settings
from kb.ingest.chunking import Chunk, ChunkConfig, make_splitter, measure_tokens, split_document
from kb.ingest.loaders import LoadedDocument

# ---------------------------------------------------------------------------- re-chunk preview


@dataclass
class ChunkPreview:
    """One document split with a candidate config, each chunk measured in model tokens."""

    config: ChunkConfig
    chunks: list[Chunk]
    tokens: list[int]  # with special tokens, as the embedding model sees each chunk
    window: int | None  # the model's max_seq_length: tokens past it are never embedded; None: no limit
    chars: list[int] = field(default_factory=list)

    @property
    def over_window(self) -> int:
        return sum(1 for t in self.tokens if over_window(t, self.window))

    @property
    def tokens_lost(self) -> int:
        """Tokens past the window, summed: text the model never sees."""
        return sum(max(0, t - self.window) for t in self.tokens) if self.window else 0

    def summary(self) -> dict:
        t = self.tokens
        return {
            "config": self.config.label(),
            "chunks": len(t),
            "window": self.window,
            "over_window": self.over_window,
            "tokens_lost": self.tokens_lost,
            "max_tokens": max(t) if t else 0,
            "median_tokens": round(statistics.median(t), 1) if t else 0,
            "mean_tokens": round(statistics.fmean(t), 1) if t else 0,
        }

    def rows(self) -> list[dict]:
        return [
            {"#": i, "lines": f"{c.line_start}-{c.line_end}", "tokens": n, "chars": len(c.text),
             "over window": over_window(n, self.window), "heading": c.heading, "start": c.text[:80]}
            for i, (c, n) in enumerate(zip(self.chunks, self.tokens), 1)
        ]


def preview_chunks(
    doc: LoadedDocument, config: ChunkConfig, settings: Settings, *, source: str = "preview",
    commit: str = "", web_url: str = "", embed_model: str = "",
) -> ChunkPreview:
    """Split ``doc`` with ``config`` as sync would, and count each chunk's model tokens."""
    token_len = emb.token_counter(settings) if config.unit == "tokens" else None
    chunks = split_document(
        doc, source=source, commit=commit, web_url=web_url, config=config,
        embed_model=embed_model or emb.model_name(settings), splitter=make_splitter(config, token_len),
    )
    measure_tokens(settings, chunks)
    return ChunkPreview(config, chunks, [c.n_tokens for c in chunks], emb.max_tokens(settings), [len(c.text) for c in chunks])


def _nice_step(top: int, max_bins: int) -> int:
    step = 8
    while math.ceil(top / step) > max_bins:
        step *= 2
    return step


def over_window(tokens: int, window: int | None) -> bool:
    """A chunk the model cuts; a model without a window (USE) cuts none."""
    return window is not None and tokens > window


def length_histogram(tokens: Sequence[int], window: int | None, max_bins: int = 24) -> list[dict]:
    """Chunk counts per token-length bin; bins are powers of two wide, so the window is an edge.

    Each row: ``start``, ``end`` (exclusive), ``label``, ``count`` and ``over``
    (the bin lies past the window). Empty bins up to the window are kept so the
    chart's axis is honest.
    """
    if not tokens:
        return []
    top = max(max(tokens) + 1, window or 0)
    step = _nice_step(top, max_bins)
    n_bins = math.ceil(top / step)
    counts = [0] * n_bins
    for t in tokens:
        counts[min(t // step, n_bins - 1)] += 1
    return [
        {"start": i * step, "end": (i + 1) * step, "label": f"{i * step}-{(i + 1) * step - 1}",
         "count": c, "over": window is not None and i * step >= window}
        for i, c in enumerate(counts)
    ]


# ---------------------------------------------------------------------------- chunks on a document


def line_cover(n_lines: int, spans: Iterable[tuple[int, int]]) -> list[list[int]]:
    """For each line (index 0 is line 1): the 1-based numbers of the chunks covering it."""
    cover: list[list[int]] = [[] for _ in range(n_lines)]
    for n, (a, b) in enumerate(spans, 1):
        for line in range(max(a, 1), min(b, n_lines) + 1):
            cover[line - 1].append(n)
    return cover


def annotated_lines(text: str, spans: Sequence[tuple[int, int]], first: int = 1, last: int | None = None) -> str:
    """The text with a gutter: line number, then the chunk(s) covering the line (overlap shows two).

    ``first``/``last`` limit the view to a line range (1-based, inclusive).
    """
    lines = text.split("\n")
    last = len(lines) if last is None else min(last, len(lines))
    cover = line_cover(len(lines), spans)
    width = len(str(last))
    tag_width = max([len(",".join(map(str, c))) for c in cover[first - 1 : last]] + [1])
    out = []
    for i in range(first, last + 1):
        tag = ",".join(map(str, cover[i - 1])) or "·"
        out.append(f"{i:>{width}} │ {tag:<{tag_width}} │ {lines[i - 1]}")
    return "\n".join(out)
