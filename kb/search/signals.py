"""Document-level signals that no chunk-level retriever sees.

Measured on overview questions ("xtuner是什么？", "What is LMDeploy?", "怎么安装
opencompass"), which the chunk retrievers miss most (README "Retrieval
tuning"): their one content word is the project's name, which hundreds of
chunks share, often in *other* repositories (InternLM's own LMDeploy guide
outranks LMDeploy's README). Three general signals help, none a rule for one
repository:

- **which source the question names** (:func:`named_sources`): how the
  question's words are spread over the sources' chunks. "lmdeploy" is far
  more frequent in the lmdeploy repository's chunks than anywhere else, so a
  question about it leans there; a question whose words are everywhere leans
  nowhere;
- **the named source's root README**: the introduction (or the install
  section) an overview question wants, found by the dense retriever within
  that source's root READMEs (the engine's ``_readme``);
- **a hit with no content** (:func:`is_empty`): a chunk that is only a title
  ("# 已支持的模型") answers nothing, however well its words match;

plus near-duplicate collapsing (:func:`collapse_duplicates`): the same
passage in README.md and docs/get_started must not take two of five slots.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from kb.search.bm25 import BM25Matrix
from kb.search.hits import Hit
from kb.search.section_words import equivalents
from kb.words import tokenize

HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s")
MARKUP_RE = re.compile(r"<[^>]+>|!?\[[^\]]*\]\([^)]*\)|https?://\S+|[`*_>#|\-=~:]+")
WORD_RE = re.compile(r"[\u3400-\u9fff]|[A-Za-z0-9]+")
README_RE = re.compile(r"^readme([_.-][\w-]+)?\.(md|markdown|rst|txt)$", re.IGNORECASE)
CONTENT_WORDS = 8  # fewer words than this beyond headings and markup: an empty hit
OPENING_WORDS = 30  # a README chunk with fewer words is badges, logos or links, not its opening
# Headings under which documentation introduces itself (the README convention, in both languages).
INTRO_HEADING_RE = re.compile(r"introduction|overview|about|what is|welcome|简介|介绍|概述|概览|欢迎|关于", re.IGNORECASE)
# Questions about what is recent, and the headings a README's news go under (newest first, by convention).
RECENT_RE = re.compile(r"\b(recent(ly)?|lately|latest|newest|news)\b|what'?s\s+new|最近|最新|近期|新进展|新闻|近况",
                       re.IGNORECASE)
# ... unless it only qualifies a version ("its default in recent versions", "最新版本需要什么依赖？")
RECENT_VERSION_RE = re.compile(r"\b(recent|latest|newest)\s+versions?\b|最新的?版本?", re.IGNORECASE)
NEWS_HEADING_RE = re.compile(r"\bnews\b|what'?s\s+new|\bupdates\b|最新进展|新闻|最新动态|更新日志|(?<!\w)更新(?!\w)",
                             re.IGNORECASE)
# Words that ask "what is it" without saying what about it (BM25 already drops 是/什么/what/is), and a newcomer's
# framing ("第一次用 X，安装步骤是怎样的？"): rare words in the corpus, whose rarity faded X's README lists away.
QUESTION_WORDS = frozenset("干嘛 干什么 做什么 用来 用途 作用 介绍 简介 一下 讲讲 说说 第一次 首次 初次 新手 小白 初学 "
                           "introduce introduction overview about explain describe tell".split())


def is_root_readme(path: str) -> bool:
    return "/" not in path and bool(README_RE.match(path))


class Sources:
    """Which source each BM25 row belongs to, with the per-source counts every share needs, computed once."""

    def __init__(self, sources: np.ndarray) -> None:
        self.names, self.inverse = np.unique(sources, return_inverse=True)
        self.sizes = np.bincount(self.inverse, minlength=len(self.names))


def _source_shares(matrix: BM25Matrix, sources: Sources, token: str) -> dict[str, float]:
    """For one word: how its chunks spread over the sources, each source's share normalised by its size.

    A big repository is not named just because it holds many chunks; the
    shares sum to 1.
    """
    col = matrix.vocab.get(token)
    if col is None:
        return {}
    rows = matrix.weights.indices[matrix.weights.indptr[col] : matrix.weights.indptr[col + 1]]
    if not len(rows):
        return {}
    share = np.bincount(sources.inverse[rows], minlength=len(sources.names)) / sources.sizes
    share = share / share.sum()
    return {str(n): float(v) for n, v in zip(sources.names, share) if v > 0}


def uses(matrix: BM25Matrix, sources: Sources, source: str, token: str) -> bool:
    """Whether any of ``source``'s chunks holds the word."""
    return source in _source_shares(matrix, sources, token)


TITLE_RE = re.compile(r"^#\s+(.+)$|<b>(?:<[^>]+>)*([^<]+)")


def readme_title(text: str, lines: int = 30) -> str:
    """The project's names as its README writes them: the first ``# Title`` and the first bold ``<b>`` title.

    Both, because a README often carries its code name as the heading and its
    spoken name in a banner ("# InternLM" above "<b>书生·浦语 官网</b>").
    """
    found: dict[int, str] = {}
    for line in text.splitlines()[:lines]:
        m = TITLE_RE.search(line.strip())
        if m:
            group = 1 if m.group(1) else 2
            found.setdefault(group, (m.group(group) or "").strip())
    return " · ".join(found[g] for g in sorted(found))


CAMEL_PART_RE = re.compile(r"[A-Z][a-z]+|[A-Z]+(?![a-z])|[a-z]+")


def acronyms(name: str) -> set[str]:
    """The short forms a project's docs write for a name of three or more parts: "IXC" for InternLM-XComposer.

    The parts are the name's words and camel-case humps (Intern, LM, X,
    Composer); a short form keeps the first and the last part's initial and
    any of those between, three letters at least. Only a form the source's
    own chunks use far more than any other's names it (:func:`named_sources`).
    """
    out: set[str] = set()
    for compound in re.split(r"[\s·]+", name):  # a title may hold several names ("InternLM · 书生·浦语")
        initials = [p[0].lower() for p in CAMEL_PART_RE.findall(re.sub(r"[\d.]+", " ", compound))]
        if len(initials) < 3:
            continue
        first, middle, last = initials[0], initials[1:-1], initials[-1]
        out |= {first + "".join(c for c, keep in zip(middle, mask) if keep) + last
                for mask in itertools.product((False, True), repeat=len(middle)) if sum(mask) + 2 >= 3}
    return out


def named_sources(matrix: BM25Matrix, sources: Sources, tokens: Sequence[str],
                  aliases: dict[str, set[str]], margin: float = 1.5) -> list[str]:
    """The sources the question names.

    A word names a source when it is one of the source's name words (its
    name, or its README's title: "xtuner", "浦语", "灵笔") *and* it lives in
    that source's chunks ``margin`` times more than anywhere else, so
    "internlm" in a question about xtuner's InternLM configs does not name
    the InternLM repository unless the question is about it.
    """
    named: dict[str, set[str]] = {}
    for t in dict.fromkeys(tokens):
        owners = [s for s, words in aliases.items() if t in words or _versioned(t) in words]
        if not owners:
            continue
        ranked = sorted(_source_shares(matrix, sources, t).items(), key=lambda kv: -kv[1])
        if ranked and ranked[0][0] in owners and (len(ranked) == 1 or ranked[0][1] >= margin * ranked[1][1]):
            named.setdefault(ranked[0][0], set()).add(t)
    # "InternLM-XComposer" names XComposer, not also InternLM: a source named only by
    # words that are all part of another named source's name is that other source's.
    return [s for s, words in named.items()
            if not any(o != s and words <= aliases.get(o, set()) and words < named[o] | words for o in named)]


VERSION_SUFFIX_RE = re.compile(r"(?<=[a-z])v?\d+$")


def _versioned(token: str) -> str:
    """A name with its version run on, without it: "internlm3" -> "internlm" (BM25 keeps "InternLM3" one word)."""
    return VERSION_SUFFIX_RE.sub("", token) if token.isascii() else token


def naming_words(tokens: Sequence[str], source: str, aliases: dict[str, set[str]]) -> set[str]:
    """The question's words that name ``source`` (what is left says what is asked about it)."""
    return {t for t in tokens if t in aliases.get(source, set())}


# "an intro to X", "an overview of X", "X 简介" ask the same (the forty-third stop: "a quick intro to InternLM3 - how
# big is …" ranked a guide's "Introduction" above the README's)
DEFINITIONAL_RE = re.compile(r"是什么|什么是|是干什么|干什么|做什么|是啥|是干嘛|是个什么|到底是|介绍一下|介绍下|简介|概述|"
                             r"\bwhat\s+(is|are)\b|\bwhat's\b|\bintroduce\b|\btell me about\b|"
                             r"\bintro(?:duction)?\s+(?:to|of)\b|\boverview\s+of\b", re.IGNORECASE)
# Of those, the ones the subject follows ("什么是 X", "What is X"); it comes before the others ("X 是什么").
SUBJECT_FOLLOWS = ("什么是", "介绍", "what", "introduce", "tell", "intro", "overview")
CLAUSE_MARK_RE = re.compile(r"[，,。？?！!；;：:\n]")


# Words that ask for a project's feature list without naming a feature ("XTuner 有哪些核心功能？", "What are the
# highlights of OpenCompass?"): the README's introduction, where projects list them, answers. Rare words in the
# corpus ("亮点", "highlights"), so without this they read as specific and faded the README lists away.
VERSION_RE = re.compile(r"v?\d+", re.IGNORECASE)
# "selling points", "what is special about", "到底" (a filler): from the misses of the features held-out set and blind3
SUMMARY_WORDS = frozenset("特点 特性 功能 亮点 优势 优点 特色 能力 主要 核心 有 "
                          "features feature highlights highlight characteristics capabilities capability "
                          "strengths advantages offer offers main key core selling points 卖点 special 特别 actually 到底".split())


def asks_for_summary(rest: Sequence[str]) -> bool:
    """Whether every word asked about the source is a summary word (a version of its name, "2.5", "V1", aside)."""
    return bool(rest) and all(w in SUMMARY_WORDS or VERSION_RE.fullmatch(w) for w in rest)


CODE_WORD_RE = re.compile(r"(?<![\w-])(?:--[A-Za-z][\w-]*|[A-Za-z]\w*_\w+)")


def code_words(query: str) -> list[str]:
    """The words a question writes as code: flags ("--hf-num-gpus") and identifiers ("max_length").

    BM25 splits "max_length" into "max" and "length", two common words, so the
    question looks generic to the fade; yet it asks about one option.
    """
    return CODE_WORD_RE.findall(query)


def writes_none(docs: Sequence, words: Sequence[str]) -> bool:
    """Whether none of the chunks writes any of the words: a README that never names an option can't explain it."""
    wanted = [w.lower() for w in words]
    return not any(w in d.page_content.lower() for d in docs for w in wanted)


def definitional(query: str) -> bool:
    """Whether the question asks what something is ("…是什么？", "What is …?", "介绍一下 …")."""
    return bool(DEFINITIONAL_RE.search(query))


def names_subject(query: str, names: set[str]) -> bool:
    """Whether the question asks what the source itself is, its name right beside the asking words.

    Unlike :func:`definitional`, which any "what is …" question trips, this
    holds only when the thing asked about is one of ``names`` ("what is xtuner
    v1 actually for? is it just another finetuning toolkit?", "X 是什么？主要能干些啥"):
    the source's own introduction then answers it, whatever else the question
    goes on to ask. "What is the default port of LMDeploy?" puts other words
    between, and "What is LMDeploy's TurboMind?" asks about something of it.
    """
    def is_name(words: list[str]) -> bool:
        words = [w for w in words if not VERSION_RE.fullmatch(w)]
        return bool(words) and (words[0] in names or _versioned(words[0]) in names)

    for m in DEFINITIONAL_RE.finditer(query):
        if m.group(0).lower().startswith(SUBJECT_FOLLOWS):
            after = CLAUSE_MARK_RE.split(query[m.end():])[0]
            word = re.match(r"\s*(?:the\s+)?([^\s'’]+)(?=\s|$)", after, re.IGNORECASE)  # "X's …" is not X
            if word and is_name(tokenize(word.group(1).replace("-", " "))[:1]):
                return True
        elif is_name(tokenize(CLAUSE_MARK_RE.split(query[: m.start()])[-1])[::-1]):
            return True
    return False


LATIN_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*")
JOIN_RE = re.compile(r"[\s-]+")  # what may stand between the two halves of a split name
SLIP_MIN = 6  # a name this long at least is read through one slip: "lagent" for "lagnet", not "lmd" for "lm"


def one_slip(word: str, name: str) -> bool:
    """Whether ``word`` is ``name`` with one letter left out, added, changed or two swapped ("lmdepoy")."""
    if word == name or abs(len(word) - len(name)) > 1:
        return False
    i = next((k for k, (a, b) in enumerate(zip(word, name)) if a != b), min(len(word), len(name)))
    if len(word) == len(name):
        return word[i + 1:] == name[i + 1:] or (word[i:i + 2] == name[i:i + 2][::-1] and word[i + 2:] == name[i + 2:])
    short, long = (word, name) if len(word) < len(name) else (name, word)
    return short[i:] == long[i + 1:]


def respell(query: str, names: set[str], known: Callable[[str], bool]) -> str:
    """The question with a source's name written as its docs write it, where the user slipped.

    Users misspell a name ("lmdepoy") or split it ("open compass", "X-Tuner"), and then no list sees the
    name: BM25 has no such word, the named-source signals stay off, and the answer drifts to another repository.
    A word no document uses (``known`` is false) one slip from a name of ``SLIP_MIN`` letters or more is read as
    that name; two words that join into a name are read as it. Known words stay ("agent" is not "lagent").
    """
    long_names = {n for n in names if n.isascii() and len(n) >= SLIP_MIN}
    words = list(LATIN_WORD_RE.finditer(query))
    out, at, i = [], 0, 0
    while i < len(words):
        m = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if nxt and JOIN_RE.fullmatch(query[m.end():nxt.start()]) and (m.group(0) + nxt.group(0)).lower() in long_names:
            out += [query[at:m.start()], m.group(0) + nxt.group(0)]
            at, i = nxt.end(), i + 2
            continue
        out += [query[at:m.start()], _named_as(m.group(0), long_names, known)]
        at, i = m.end(), i + 1
    return "".join(out) + query[at:]


def _named_as(word: str, names: set[str], known: Callable[[str], bool]) -> str:
    low = word.lower()
    if len(low) < SLIP_MIN - 1 or low in names or known(low):
        return word
    close = [n for n in names if one_slip(low, n)]
    return close[0] if len(close) == 1 else word


def _name_words(named: Sequence[str], aliases: dict[str, set[str]]) -> set[str]:
    return set().union(*(aliases.get(s, set()) for s in named)) if named else set()


COMPOUND_RE = re.compile(r"[A-Za-z][\w.]*(?:-[\w.]+)+")


def name_compounds(query: str, named: Sequence[str], aliases: dict[str, set[str]]) -> set[str]:
    """The words of hyphenated names that start with a source's name ("InternLM3-8B-Instruct": "8b", "instruct"):
    a model the project ships, named in full, is still the project named, not something asked about it."""
    names = _name_words(named, aliases)
    out: set[str] = set()
    for compound in COMPOUND_RE.findall(query):
        words = tokenize(compound.replace("-", " "))
        if words and (words[0] in names or _versioned(words[0]) in names):
            out.update(words)
    return out


ASIDE_RE = re.compile(r"([^\s（(]+)\s*[（(]([^（）()]{1,40})[）)]")  # "OpenCompass（司南）", "浦语灵笔2.5 (IXC-2.5)"
ASIDE_WORDS = 3  # a gloss of a name is short: "(the older config-based version)" is not one


def name_asides(query: str, source: str, aliases: dict[str, set[str]], matrix: BM25Matrix, sources: Sources,
                margin: float = 1.5) -> tuple[str, set[str]]:
    """The question without a parenthesis that glosses the source's name, and the words in it.

    "OpenCompass（司南）是什么？" gives the project's other name in brackets: its words are the source named again,
    not something asked about it, so the question is still definitional. A bracket counts as a gloss when it follows
    one of the source's names, holds at most ``ASIDE_WORDS`` words, and each of them lives in the source's chunks
    ``margin`` times more than anywhere else, as a name does (:func:`named_sources`): "XTuner（旧版文档）", legacy
    docs, is a qualifier ("文档" is everywhere) and stays in the question.
    """
    names = aliases.get(source, set())
    found: set[str] = set()

    def gloss(m: re.Match) -> str:
        before = tokenize(m.group(1).replace("-", " "))
        inside = tokenize(m.group(2).replace("-", " "))
        if not before or not (before[-1] in names or _versioned(before[-1]) in names):
            return m.group(0)
        if not 0 < len(inside) <= ASIDE_WORDS or not all(_lives_in(matrix, sources, w, source, margin)
                                                         for w in inside if not VERSION_RE.fullmatch(w)):
            return m.group(0)
        found.update(inside)
        return m.group(1)

    return ASIDE_RE.sub(gloss, query), found


def _lives_in(matrix: BM25Matrix, sources: Sources, word: str, source: str, margin: float) -> bool:
    ranked = sorted(_source_shares(matrix, sources, word).items(), key=lambda kv: -kv[1])
    return bool(ranked) and ranked[0][0] == source and (len(ranked) == 1 or ranked[0][1] >= margin * ranked[1][1])


def asked_about(tokens: Sequence[str], named: Sequence[str], aliases: dict[str, set[str]],
                query: str = "", asides: set[str] = frozenset()) -> list[str]:
    """The question's words once the source's names (and parts of them) and the bare question words are taken out.

    None left: a definitional question ("xtuner是什么？", "What is LMDeploy?"). With ``query``, the words of
    a name written in full ("InternLM3-8B-Instruct") are taken out too (:func:`name_compounds`), and so are
    ``asides``, the words of a bracket glossing the name (:func:`name_asides`).
    """
    names = _name_words(named, aliases)
    in_full = name_compounds(query, named, aliases) if query else set()
    rest = [t for t in tokens if t not in names and _versioned(t) not in names and t not in QUESTION_WORDS
            and not _part_of_name(t, names) and t not in in_full and t not in asides]
    # Numbers alone ("浦语·灵笔2.5 是什么？" leaves "2", "5") are the version in the name: the question is definitional.
    return [] if all(t.isdigit() for t in rest) else rest


def _part_of_name(word: str, names: set[str]) -> bool:
    """"deploy" in LMDeploy, "compass" in OpenCompass: the name restated, not something asked about it.

    "Which models can I deploy with LMDeploy?" asks which models; "deploy"
    would otherwise read as a specific word and fade the README's model list.
    """
    return word.isascii() and len(word) >= 4 and any(word in n and word != n for n in names)


def in_language(docs: Sequence, language: str, min_words: int = OPENING_WORDS) -> list:
    """The chunks of at least ``min_words`` words of the root README copy in the question's language (the shortest
    name otherwise), in line order."""
    by_path: dict[str, list] = {}
    for d in sorted(docs, key=lambda d: int(d.metadata["line_start"])):
        if content_words(d.page_content) >= min_words:
            by_path.setdefault(d.metadata["path"], []).append(d)
    if not by_path:
        return []
    zh = language == "zh"
    return by_path[min(by_path, key=lambda p: (zh != any(m in p.lower() for m in ("zh", "_cn", "-cn")), len(p)))]


def opening(docs: Sequence, language: str, n: int, names: frozenset[str] = frozenset()) -> list:
    """A root README's opening: its introduction section, else its first chunks with content.

    ``docs`` are LangChain documents of the source's root READMEs; the copy in
    the question's language is used. Chunks under an introduction heading
    ("Introduction", "简介", "Welcome") come first, or, where there is none,
    the first chunk with a line that starts with one of the project's
    ``names`` and defines it; then the first chunks with content, since
    badges, logos and link rows (fewer than ``OPENING_WORDS`` words) are skipped.
    """
    chunks = in_language(docs, language)
    intro = [d for d in chunks if any(INTRO_HEADING_RE.search(h) for h in _own_headings(d))]
    if not intro and names:
        intro = [d for d in chunks if _defines(d.page_content, names)][:1]
    return (intro + [d for d in chunks if d not in intro])[:n]


def asks_for_news(query: str) -> bool:
    """Whether the question asks what is recent ("What's new in X lately?", "X 最近有哪些新进展？")."""
    return bool(RECENT_RE.search(RECENT_VERSION_RE.sub(" ", query)))


def news_section(docs: Sequence, language: str, n: int) -> list:
    """The first chunks of a root README's news section ("News", "Latest News", "What's New", "最新进展"), the copy
    in the question's language: a project's README lists its news newest first, so they hold what is recent.

    BM25 can't find them for "What's the most recent update announced for
    OpenCompass?" (its heading is "What's New", its lines dated items), nor
    dense, and the README's other sections hold the words "update" or
    "recent" as often; older news pages (docs/*/notes/news.md) lack the latest.
    """
    chunks = in_language(docs, language, CONTENT_WORDS)  # a news section of one line is news too
    first = next((i for i, d in enumerate(chunks) if any(NEWS_HEADING_RE.search(h) for h in _own_headings(d))), None)
    return [] if first is None else chunks[first:first + n]


DEFINING_WORDS = 12  # a line that starts with the project's name and goes on this long says what it is


def _defines(text: str, names: frozenset[str]) -> bool:
    """Whether a line of ``text`` starts with the project's name and goes on as prose.

    Without an introduction heading, a README still defines its project in
    the first sentence that begins with its name ("**InternLM-XComposer-2.5**
    excels in…", "**浦语·灵笔2.5**是基于…", "LMDeploy is a toolkit…"),
    after the news, badges and project lists above it.
    """
    for line in text.splitlines():
        plain = MARKUP_RE.sub(" ", line)
        words = tokenize(plain)
        if words and words[0] in names and len(WORD_RE.findall(plain)) >= DEFINING_WORDS:
            return True
    return False


def _own_headings(doc) -> list[str]:
    """The chunk's nearest heading and those that start inside it (not the document title above everything)."""
    path = [h for h in doc.metadata.get("heading", "").split(" > ") if h]
    return path[-1:] + [HEADING_RE.sub("", l).strip() for l in doc.page_content.splitlines() if HEADING_RE.match(l)]


TABLE_RULE_RE = re.compile(r"^\s*\|?\s*:?-{3,}")


def _labels(doc) -> list[str]:
    """What a chunk says it is about: its own headings, and its tables' header rows.

    A table's header names what it lists, as a heading does: XTuner's model
    table sits under "Training Engine", and only its "| Model | GPU(FP8) |"
    row says that it is the list of supported models.
    """
    lines = doc.page_content.splitlines()
    headers = [l for l, nxt in zip(lines, lines[1:]) if l.lstrip().startswith("|") and TABLE_RULE_RE.match(nxt)]
    return _own_headings(doc) + headers


@functools.lru_cache(maxsize=8192)
def _word_set(text: str) -> frozenset[str]:
    """BM25 words of a README chunk, kept: the same chunks are read for every question naming the source."""
    return frozenset(tokenize(text))


def _stem_match(wanted: set[str], words: set[str]) -> set[str]:
    """The wanted words found in ``words``; a Latin word also by a shared stem ("install" in "installation",
    "support" in "supported", "models" in "model"), since BM25's words are not stemmed."""
    found = wanted & words
    by_prefix = _by_prefix(frozenset(words))
    for w in wanted - found:
        if w.isascii() and len(w) >= 5 and any(_same_stem(w, v) for v in by_prefix.get(w[:5], ())):
            found.add(w)
    return found


@functools.lru_cache(maxsize=8192)
def _by_prefix(words: frozenset[str]) -> dict[str, list[str]]:
    """A chunk's Latin words by their first five letters: a shared stem is at least that long."""
    out: dict[str, list[str]] = {}
    for v in words:
        if v.isascii() and len(v) >= 5:
            out.setdefault(v[:5], []).append(v)
    return out


def _same_stem(a: str, b: str) -> bool:
    common = len(os.path.commonprefix([a, b]))
    return common >= 5 and common >= min(len(a), len(b)) - 2


def readme_sections(docs: Sequence, language: str, rest: Sequence[str], n: int) -> list:
    """The chunks of a root README (the copy in the question's language) that hold the question's other words.

    For "xtuner支持哪些模型？" or "How do I install LMDeploy?": the source is
    named and the rest is generic ("支持", "模型", "install"), so BM25 spreads
    it over hundreds of pages, while the README's own section on it (a model
    table, an install block) is what a user means. As documentation search
    ranks a match in a section's title above one in its text: first by the
    words in the chunk's own headings, then by those in the chunk, each word
    weighed by its rarity among the README's chunks (so the "Installation" or
    "Supported Models" section comes before a news line that mentions
    installing). Chunks holding none are left out.
    """
    wanted = set(rest)
    if not docs or not wanted:
        return []
    copy = opening(docs, language, len(docs))  # the chunks with content of the copy in the question's language
    found = [(_section_words(d, wanted), _found(wanted, _word_set(" ".join(_labels(d))))) for d in copy]
    df = {w: sum(w in body for body, _ in found) for w in wanted}
    idf = {w: math.log(1 + (len(copy) - n + 0.5) / (n + 0.5)) for w, n in df.items()}
    scored = [(-sum(idf[w] for w in heading), -sum(idf[w] for w in body), int(d.metadata["line_start"]), d)
              for d, (body, heading) in zip(copy, found) if body]
    return [d for *_, d in sorted(scored, key=lambda t: t[:3])][:n]


def _section_words(doc, wanted: set[str]) -> set[str]:
    return _found(wanted, _word_set(doc.metadata.get("heading", "") + "\n" + doc.page_content))


def _found(wanted: set[str], words: set[str]) -> set[str]:
    """The wanted words in ``words``, by stem, or by a section word of the other language ("协议" in "License")."""
    found = _stem_match(wanted, words)
    for w in wanted - found:
        alts = equivalents(w)
        if alts and _stem_match(set(alts), words):
            found.add(w)
    return found


def holds_all(doc, rest: Sequence[str]) -> bool:
    """Whether a README chunk holds every word the question asks about besides the source's name.

    Then it is that README's own answer, however specific the words (a rare
    word such as "Ascend" that the README's feature list states), and the
    README list need not fade as specific questions make it.
    """
    return bool(rest) and _section_words(doc, set(rest)) == set(rest)


@functools.lru_cache(maxsize=16384)
def content_words(text: str) -> int:
    """Words beyond headings and markup (a CJK character counts as a word)."""
    body = "\n".join(l for l in text.splitlines() if not HEADING_RE.match(l))
    return len(WORD_RE.findall(MARKUP_RE.sub(" ", body)))


def is_hidden(path: str) -> bool:
    """Whether a file sits in a hidden folder (``.github/``, ``.claude/``): a tool's templates and agent
    instructions, written for contributors' tools rather than for the project's users."""
    return any(part.startswith(".") for part in path.split("/")[:-1])


def is_empty(hit: Hit) -> bool:
    return content_words(hit.text) < CONTENT_WORDS


@functools.lru_cache(maxsize=16384)
def shingles(text: str, n: int = 5) -> frozenset[str]:
    flat = re.sub(r"\s+", " ", MARKUP_RE.sub(" ", text.lower())).strip()
    return frozenset({flat[i : i + n] for i in range(max(1, len(flat) - n + 1))})


def near_duplicate(a: set[str], b: set[str], threshold: float = 0.8) -> bool:
    """Jaccard similarity of character 5-grams: the same passage, reformatted or lightly edited."""
    if not a or not b or min(len(a), len(b)) < threshold * max(len(a), len(b)):  # sizes alone rule most pairs out
        return False
    common = len(a & b) if len(a) <= len(b) else len(b & a)
    return common / (len(a) + len(b) - common) >= threshold


def fit(hit: Hit, language: str) -> tuple[int, int, int]:
    """How well a copy fits: the question's language, then a root README, then a shallow path (lower is better)."""
    lang = hit.path.lower()
    zh_path = any(m in lang for m in ("zh", "_cn", "-cn", "chinese"))
    same = (language == "zh") == zh_path
    return (0 if same else 1, 0 if is_root_readme(hit.path) else 1, hit.path.count("/"))


def collapse_duplicates(hits: list[Hit], language: str, limit: int | None = None) -> list[Hit]:
    """Keep one hit per near-duplicate text, the copy that best fits; the next distinct hit moves up.

    The kept copy takes the best place of its group, so collapsing never
    pushes the information itself down. With ``limit``, once that many
    distinct hits are kept the rest can only replace a kept copy, never join
    (nothing past the limit is shown).
    """
    kept: list[tuple[Hit, set[str]]] = []
    for h in hits:
        sh = shingles(h.text)
        twin = next((i for i, (k, ks) in enumerate(kept) if near_duplicate(sh, ks)), None)
        if twin is None:
            if limit is None or len(kept) < limit:
                kept.append((h, sh))
        elif fit(h, language) < fit(kept[twin][0], language):
            h.score, h.found_by = kept[twin][0].score, sorted(set(h.found_by) | set(kept[twin][0].found_by))
            kept[twin] = (h, sh)
    return [h for h, _ in kept]
