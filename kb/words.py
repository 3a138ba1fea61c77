"""BM25 words: jieba for Chinese runs, lower-cased words as written otherwise.

Computed once per chunk and passage at sync time (stored with each record),
and for each query at search time; both sides must cut text the same way, so
the rule lives here, below ingest and search alike.
"""

from __future__ import annotations

import logging
import re

WORD_RE = re.compile(r"[\w\u3400-\u9fff]+", re.UNICODE)
# Chinese runs, and runs of other letters/digits: only the Chinese runs need jieba
# (most of the corpus is English, and jieba is 6x slower than a regex on it).
PIECE_RE = re.compile(r"[\u3400-\u9fff]+|[^\W_\u3400-\u9fff]+", re.UNICODE)
STOPWORDS = frozenset(
    "的 了 是 在 和 与 及 或 也 就 都 而 及 着 吗 呢 吧 啊 呀 么 什么 哪些 如何 怎么 怎样 为什么 多少 是否 一个 这个 那个 这些 那些 "
    "我 你 他 她 它 我们 你们 他们 请 能 可以 需要 使用 用 对 把 被 让 给 从 到 上 中 下 里 时 "
    "a an the is are was were be been being of to in on at by for with from as and or not no "
    "it its this that these those what which who whom how why when where do does did can could "
    "should would will shall may might i you he she we they me my your our their there here "
    "if then than so such into about over under via per vs".split()
)

# CJK ideographs (the compatibility block too): what makes a text Chinese for the language rule below
CJK_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")

_jieba = None


def language_of(text: str) -> str:
    """"zh" when a tenth of the letters (of the first 20,000 characters) are CJK, else "en".

    One rule for a document, a question and an answer's sentence: a question's language picks the copy of a README
    the loader labelled the same way (the search signals had their own range, without the compatibility block).
    """
    sample = text[:20_000]
    letters = sum(c.isalpha() for c in sample) or 1
    return "zh" if len(CJK_RE.findall(sample)) / letters > 0.1 else "en"


def _cut(text: str) -> list[str]:
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba.lcut(text)


def tokenize(text: str) -> list[str]:
    """Words for BM25: jieba splits Chinese runs; everything is lower-cased.

    Other runs are words as they stand ("internlm2", "7b"); underscores and
    punctuation separate them, and single Latin letters and stop words drop.
    """
    out = []
    for piece in PIECE_RE.findall(text.lower()):
        for word in (_cut(piece) if "\u3400" <= piece[0] <= "\u9fff" else (piece,)):
            if word not in STOPWORDS and not (len(word) == 1 and word.isascii() and not word.isdigit()):
                out.append(word)
    return out


# Colloquial words a question uses where the docs write another: jieba keeps "安装" whole, so "xtuner 怎么装" and
# "pip 直接装还是源码装" matched no install page at all. Query side only: the stored words are the docs' own.
# Measured over the 19 sets (627 questions): hit@1 415 → 417, hit@5 555 → 557, no first or top-five hit lost ("跑" →
# "运行" gained nothing; README "Retrieval tuning").
QUERY_WORDS = {"装": "安装"}


# Names a Chinese question uses that the docs write only in English: "魔搭" (ModelScope's Chinese name) is in no page
# of the six repos, where "ModelScope" is in 49, and jieba cuts it into two characters that match nothing.
QUERY_NAMES = {"魔搭": "ModelScope"}


def glossed(text: str) -> str:
    """The question as the model reads it: such a name followed by the docs' ("魔搭（ModelScope）"). The model did not
    know them for one thing, and answered "不支持按需从魔搭社区加载数据" beside an excerpt on ModelScope's datasets."""
    for name, written in QUERY_NAMES.items():
        if name in text and written.lower() not in text.lower():
            text = text.replace(name, f"{name}（{written}）", 1)
    return text


def query_tokens(text: str) -> list[str]:
    """A question's BM25 words: ``tokenize``'s, with its colloquial words and names written as the docs write them."""
    for name, written in QUERY_NAMES.items():  # glossed or not, the name counts once
        text = text.replace(name, " " if written.lower() in text.lower() else f" {written} ")
    return [QUERY_WORDS.get(w, w) for w in tokenize(text)]
