"""Chinese <-> English words, mined from the corpus's own translated pages.

A question in one language whose answer the docs give only in the other
("lagent 的工具有异步版本吗？", answered by an English README that says
"asynchronous") shares no word with it, so BM25 can't find it, and the
multilingual embedding model alone often ranks it past the top 20. The six
repos translate most of their docs (``docs/en/x.md`` and ``docs/zh_cn/x.md``,
``README.md`` and ``README_zh-CN.md``), section for section. Across those
pairs, an English word and a Chinese word that keep appearing in the same
aligned sections translate each other (Dice coefficient over sections); the
question's words are then looked up, and BM25 searches the translation as one
more list (``engine``: "bm25 translated").

Nothing is downloaded and no model is asked: the table comes from the indexed
chunks, once per collection version.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

CJK_RE = re.compile(r"[\u3400-\u9fff]")
LANG_DIR_RE = re.compile(r"(^|/)(en|zh_cn|zh-cn|zh|cn)(?=/)", re.I)
LANG_SUFFIX_RE = re.compile(r"[_-](zh[_-]cn|cn|zh|en)(?=\.\w+$)", re.I)
MIN_PAIRS = 3  # sections a word pair must share
MIN_DICE = 0.4  # how consistently (2 x shared / (sections of one + sections of the other))
PER_WORD = 2  # translations kept per word, the best first


@dataclass(frozen=True)
class ChunkWords:
    """What the miner needs of a chunk: where it is, its heading path and its BM25 words."""

    source: str
    path: str
    line_start: int
    heading: str
    tokens: Sequence[str]


def parallel_key(path: str) -> str:
    """The path with its language marked out: ``docs/en/a.md`` and ``docs/zh_cn/a.md`` share one."""
    return LANG_SUFFIX_RE.sub("", LANG_DIR_RE.sub(r"\1@", path))


def is_chinese(word: str) -> bool:
    return bool(CJK_RE.search(word))


def in_chinese(tokens: Sequence[str]) -> bool:
    """A chunk's language, by its words: a fifth of them Chinese (code and names are Latin in both copies)."""
    return sum(map(is_chinese, tokens)) > 0.2 * max(1, len(tokens))


def _language(tokens: Sequence[str]) -> str:
    return "zh" if in_chinese(tokens) else "en"


def _sections(chunks: list[ChunkWords]) -> list[set[str]]:
    """A file's words by section (consecutive chunks under one heading path), in order."""
    out: list[tuple[str, set[str]]] = []
    for c in sorted(chunks, key=lambda c: c.line_start):
        if not out or out[-1][0] != c.heading:
            out.append((c.heading, set()))
        out[-1][1].update(c.tokens)
    return [words for _, words in out]


def _aligned(en: list[ChunkWords], zh: list[ChunkWords]) -> list[tuple[set[str], set[str]]]:
    """Sections side by side when both copies have as many; else chunks by their place in the file."""
    se, sz = _sections(en), _sections(zh)
    if len(se) == len(sz):
        return list(zip(se, sz))
    en, zh = sorted(en, key=lambda c: c.line_start), sorted(zh, key=lambda c: c.line_start)
    return [(set(c.tokens), set(zh[min(len(zh) - 1, round(i * len(zh) / len(en)))].tokens))
            for i, c in enumerate(en)]


def segments(chunks: Iterable[ChunkWords]) -> list[tuple[set[str], set[str]]]:
    """Aligned (English words, Chinese words) sections of every page that has a copy in the other language."""
    files: dict[tuple[str, str], list[ChunkWords]] = defaultdict(list)
    for c in chunks:
        files[(c.source, c.path)].append(c)
    groups: dict[tuple[str, str], dict[str, list[ChunkWords]]] = defaultdict(dict)
    for (source, path), cs in sorted(files.items()):
        lang = _language([t for c in cs for t in c.tokens])
        groups[(source, parallel_key(path))].setdefault(lang, cs)
    out = []
    for copies in groups.values():
        if "en" in copies and "zh" in copies:
            out += _aligned(copies["en"], copies["zh"])
    return out


def mine(chunks: Iterable[ChunkWords]) -> dict[str, tuple[str, ...]]:
    """Each word's translations, both ways; a word both copies of a section share (a name, a flag) is none."""
    segs = segments(chunks)
    en_vocab: dict[str, int] = {}
    zh_vocab: dict[str, int] = {}
    er, ec, zr, zc = [], [], [], []
    for s, (en, zh) in enumerate(segs):
        for w in en - zh:
            if not is_chinese(w) and len(w) > 1 and not w.isdigit():
                er.append(s)
                ec.append(en_vocab.setdefault(w, len(en_vocab)))
        for w in zh:
            if is_chinese(w):
                zr.append(s)
                zc.append(zh_vocab.setdefault(w, len(zh_vocab)))
    if not er or not zr:
        return {}
    e = sparse.csr_matrix((np.ones(len(er)), (er, ec)), shape=(len(segs), len(en_vocab)))
    z = sparse.csr_matrix((np.ones(len(zr)), (zr, zc)), shape=(len(segs), len(zh_vocab)))
    shared = (e.T @ z).tocoo()
    dice = 2 * shared.data / (np.asarray(e.sum(0)).ravel()[shared.row] + np.asarray(z.sum(0)).ravel()[shared.col])
    keep = (shared.data >= MIN_PAIRS) & (dice >= MIN_DICE)
    en_words, zh_words = list(en_vocab), list(zh_vocab)
    found: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r, c, d in zip(shared.row[keep], shared.col[keep], dice[keep]):
        found[en_words[r]].append((float(d), zh_words[c]))
        found[zh_words[c]].append((float(d), en_words[r]))
    return {w: tuple(t for _, t in sorted(ts, key=lambda x: (-x[0], x[1]))[:PER_WORD]) for w, ts in found.items()}


def translate(tokens: Sequence[str], table: dict[str, tuple[str, ...]]) -> list[str]:
    """The question's words in the other language; names and flags (Latin words the table lacks) as they stand.

    A Chinese word without a translation is dropped: this list is for the
    pages the question's own words can't reach.
    """
    out: list[str] = []
    for w in tokens:
        out += table.get(w, () if is_chinese(w) else (w,))
    return out
