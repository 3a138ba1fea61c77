"""Which lines support each sentence of an answer, or that none does.

A small model often writes no ``[n]`` marker, or the wrong one, so markers
alone can't carry the product's promise. After the answer streams, each
sentence is aligned with the excerpts the model was shown: for every run of
one to three lines, the share of the sentence's words (rarity-weighted, as
BM25 words) found in those lines, plus the embedding model's cosine between
the sentence and the lines. The best run above ``THRESHOLD`` supports the
sentence; a marker the model wrote is kept when its own source clears the bar,
else the sentence is re-attached to the source that does. A sentence with fewer
than two words to check and no figure, or a lead-in ("以下是："), claims nothing and needs no source.
Words the sentence repeats from the question count half: they name what was asked, not what is claimed.
A run of lines is also read with its section's heading or its table's header row when one sits a few
lines above (a changelog dates a change in its heading; a figure in a row means what its column says).
A sentence that states a figure (a version, a default, a count) is supported
only by lines that hold that figure: words and embeddings can't tell 92542
from 92543; a figure the question names and an excerpt states ("浦语·灵笔2.5")
is the subject, not a claim. Names are held to the same rule: a backticked name, a snake_case identifier
or a path (``XTUNER_USE_FLASH_ATTN_2``, `--deepspeed`, ``Dao-AILab/flash-attention-3.git``) must appear letter
for letter, because a wrong flag, variable or path that looks like the right one is the error a reader can least
spot. The path of the file an excerpt was shown under (its ``[n] source/path`` label) counts as spelled out,
too. A figure read from a table cell must sit under the column and in the row the sentence (or else the
question) names. A list item is read with the line that introduces its list, as a row is with its header, and a list
of up to ``MAX_LIST_LINES`` items is also read whole, for a sentence that sums it up. Lines
that hold every figure and name a sentence states support it a little below the bar, and across languages so do
lines that spell out its Latin-script terms ("PyTorch" in a Chinese sentence over English lines). A sentence listing
four names or more ("支持 Llama、Llama2、…") that no run holds is checked item by item, in the excerpts of one file,
its lead against that file's runs. The threshold was chosen on
hand-labelled sentences (README "Answers").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from kb.answer.prompts import EXAMPLE_SENTENCE, EXAMPLE_SUBJECT, LINK_RE, LOOKALIKES
from kb.citations import MARKER_RE, marker_numbers
from kb.markdown import fenced_lines, is_fence
from kb.search.hits import Hit
from kb.words import language_of, tokenize

THRESHOLD = 0.35  # lexical share x LEXICAL + cosine x (1 - LEXICAL); README "Answers" (hand-labelled)
NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
# a comma grouping thousands ("200,000"): a sentence and its line may group a figure differently, or not at all
GROUPING_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# a digit standing alone ("4/5", "8 张", "5%", "set to 1"): a count or a fraction, unlike the digit of "InternLM2",
# "v1" or "8xA100", which belongs to a name
DIGIT_RE = re.compile(r"(?<![A-Za-z0-9_.,])\d(?![A-Za-z0-9_.,])")
CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
IDENTIFIER_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+")  # snake_case and CONSTANT_CASE names
# Paths, repos, URLs and images ("Dao-AILab/flash-attention-3.git", "yhcao6/ixc2.5-ol"): a slash, a letter, and a
# mark that words joined by a slash ("and/or", "TP/DP") and fractions ("4/5") lack.
PATH_RE = re.compile(r"[\w.@+-]+(?:/[\w.@+-]+)+")
PATH_MARK_RE = re.compile(r"(?=.*[A-Za-z]).*(?:[.@_\d-]|/.*/)")
# Latin-script terms (``_terms``): what survives translation; in English, only names in capitals or mixed case
TERM_RE = re.compile(r"[A-Za-z][A-Za-z0-9.+-]*[A-Za-z0-9+]")
MIXED_RE = re.compile(r"(?=.*[A-Z])(?=.*(?:[a-z].*[A-Z]|[A-Z].*[A-Z]|\d))")
# An enumeration ("支持 Llama、Llama2、…、DeepSeek-V3.2", "supports A, B, C and D"): its items, split at list commas
ITEM_SPLIT_RE = re.compile(r"[、，,；;]\s*(?:and\s+|or\s+|和|及|以及)?|\s+(?:and|or)\s+|(?<=[A-Za-z0-9)])\s*(?:和|及|以及)\s*")
# the first part: the lead, up to its last Chinese character or colon (else its last space), then the first item
LEAD_RE = re.compile(r"(.*?[\u3400-\u9fff:：]\s*|.*\s)?([^\u3400-\u9fff]+)$")
MIN_ITEMS = 4  # fewer items are read as an ordinary sentence: the runs of 1–3 lines and short lists hold them
MAX_ITEM_WORDS = 4
ENUMERATION_SPAN = 80  # the most lines an enumeration's citation may span in its file
LEXICAL = 0.6
MAX_LINES = 3
MAX_LIST_LINES = 8  # a list this long at most is also read whole (``_lists``)
# Words that answer a yes-or-no question without saying anything the lines could hold: "Yes, Lagent supports
# asynchronous agents." is checked for what follows them. Over every stored answer (580): 12 sentences more
# cited, 11 of them right (README "Answers"); one right answer shown instead of withheld, none lost.
AFFIRMATIONS = frozenset("yes both indeed certainly 没错 确实 当然".split())
# What turns a line's statement around: "the offline kv quantization was removed". A sentence restating the rest of
# such a clause without it states the opposite (a browser review: "支持…和 kv 离线量化方式" was cited to
# "原来的 kv 离线量化方式移除"). Bare "not" and "不" are left out: "不同", "not only" turn nothing around.
REVERSAL_RE = re.compile(r"\b(?:removed|deprecated|no longer|not supported|unsupported|discontinued|dropped)\b|"
                         r"移除|已删除|不再|不支持|弃用|废弃", re.IGNORECASE)
# A sentence that states an absence ("没有现成的 Docker 镜像", "there is no GUI", "does not support Windows") is
# supported only by lines that negate something too: blind26's "浦语·灵笔2.5 OmniLive 没有现成的 Docker 镜像。" was
# cited to the heading "## Docker 镜像" above the image's pull command. Narrow for the sentence, broad for the lines.
ABSENCE_RE = re.compile(r"没有|并未|尚未|未提供|不提供|不支持|不存在|不包含|无法|不能|"
                        r"\b(?:there (?:is|are) no|no \w+ (?:is|are)|does not|do not|doesn't|don't|is not|isn't|are "
                        r"not|aren't|cannot|can't|not (?:available|provided|supported|mentioned|included))\b",
                        re.IGNORECASE)
NEGATING_RE = re.compile(r"[不无未没非否]|\b(?:no|not|never|none|nothing|without|cannot|only|neither|nor|lacks?|"
                         r"n't|unsupported|unavailable|removed|deprecated)\b|n't\b", re.IGNORECASE)
ASKS_EITHER_RE = re.compile(r"(.)[没不]\1|有没有|是不是|能不能|可不可以")  # 有没有, 支不支持 (its first character)
QUOTED_RE = re.compile(r'"[^"]*"|“[^”]*”|「[^」]*」|`[^`]*`')
CLAUSE_SPLIT_RE = re.compile(r"[，,。；;：:！!？?\n]|\.(?:\s|$)")
RESTATED = 0.75  # the share of a reversed clause's other words that a sentence restating it repeats
ECHO = 0.5  # weight of a word the sentence repeats from the question: the subject, not the claim (README "Answers")
# The bar is this much lower for lines that hold every figure and exact name the sentence states: those are the
# claim, spelled out, and no neighbouring line with the same words but another claim holds them (README "Answers").
EXACT_RELIEF = 0.05
CROSS_LINGUAL_OFFSET = 0.25  # across languages: the cosine less this is the score (README "Answers")
CONTEXT_COST = 0.03  # a run read with its heading or table header: cited only when that adds what the run lacks
CONTEXT_LINES = 10  # how far above a run its heading or table header may be, to be read with it
HEADING_RE = re.compile(r"\s{0,3}#{1,6}\s")
TABLE_RULE_RE = re.compile(r"\s*\|?\s*:?-{3,}")
ASKING_RE = re.compile(r"[?？]|哪|什么|吗|怎么|如何|多少|是否|能不能|行不行|有没有|"
                       r"\b(?:which|what|how|why|where|when|who|whether|does|do|is|are|can)\b", re.IGNORECASE)
LIST_ITEM_RE = re.compile(r"\s*(?:[-*+]|\d{1,3}[.)])\s")
CELL_SPLIT_RE = re.compile(r"((?:`[^`]*`|\\.|[^|\\])*)\|")  # each cell, up to its unescaped bar
NUMERIC_CELL_RE = re.compile(r"[-+~≈]?\d+(?:[.,]\d+)*%?")
# Sentence ends: Chinese full stops anywhere, Latin ones before a space or the end, and line breaks. A Latin "?" or
# "!" ends one only before a space, a quote, Chinese text or the end: one inside a URL ("install?lang=en") split
# the sentence, and the citation put after its first half landed inside the link, which no longer opened.
_LATIN_NEXT = r"[\s\"'”’*_]|$|[\u3400-\u9fff]"
SENTENCE_RE = re.compile(rf"(?:[^。！？!?；\n]|[!?]+(?!{_LATIN_NEXT}))+?"
                         rf"(?:[。！？；]+|[!?]+[\"'”’]*(?={_LATIN_NEXT})|[.](?=\s+[A-Z\u3400-\u9fff*\-\d`\[]|\s*$)|(?=\n)|$)", re.S)


@dataclass
class Sentence:
    text: str  # as the model wrote it, markers included
    claim: bool  # has words to check against the sources
    source: int | None = None  # 1-based excerpt number that supports it
    line_start: int = 0
    line_end: int = 0
    score: float = 0.0
    marked: list[int] = field(default_factory=list)  # the model's own markers
    marker_ok: bool | None = None  # the model's marker names a supporting source (None: no marker)
    asks: bool = False  # a question, not a claim (``is_question``): an answer made only of these is withheld
    echo: bool = False  # the prompt's own example written back (``repeats_example``): never supported

    @property
    def supported(self) -> bool:
        return self.source is not None

    def as_dict(self) -> dict:
        # "cited": DESIGN §6's field, the source numbers the sentence is tied to (none when no source supports it;
        # an operator review found it missing from `kb ask --json`)
        return {**asdict(self), "supported": self.supported, "cited": [self.source] if self.source is not None else []}


def split_sentences(answer: str) -> list[str]:
    """The answer's sentences, each with its trailing markers (``…微调 [1]。`` stays one sentence)."""
    out: list[str] = []
    for m in SENTENCE_RE.finditer(answer):
        text = m.group(0).strip()
        if not text:
            continue
        if out and re.fullmatch(r"(?:\s*" + MARKER_RE.pattern + r")+[。.]?", text):
            out[-1] += text  # "XTuner 支持 QLoRA。[1]" : the marker after the stop belongs to the sentence
            continue
        out.append(text)
    return out


def _claim_words(sentence: str) -> list[str]:
    return [w for w in tokenize(MARKER_RE.sub(" ", sentence)) if not w.isdigit() or len(w) > 1]


def _reversed_clauses(text: str) -> list[set[str]]:
    """The words, less the reversal's own, of each clause a reversal turns around (at least two words)."""
    out = []
    for clause in CLAUSE_SPLIT_RE.split(text):
        if REVERSAL_RE.search(clause):
            words = set(_claim_words(clause)) - set(_claim_words(" ".join(REVERSAL_RE.findall(clause))))
            if len(words) >= 2:
                out.append(words)
    return out


def _squash(text: str) -> str:
    """Spaces out, lower case, and figures ungrouped: "200,000" and "200000" are one figure."""
    return GROUPING_RE.sub("", re.sub(r"\s+", "", text)).lower()


def _ungroup(figure: str) -> str:
    return GROUPING_RE.sub("", figure)


def _figures(sentence: str) -> list[str]:
    """The numbers a sentence states (its markers and list number aside): each must appear in the lines that
    support it. A single digit counts where it stands alone: "4/5 of GPU memory" is a claim about a fraction."""
    text = MARKER_RE.sub(" ", sentence)
    text = text[item.end():] if (item := LIST_ITEM_RE.match(text)) else text
    return [_ungroup(f) for f in NUMBER_RE.findall(text) if len(f) > 1] + DIGIT_RE.findall(text)


def _names(sentence: str) -> list[str]:
    """The exact names a sentence states: backticked spans, snake_case identifiers and paths, squashed."""
    text = MARKER_RE.sub(" ", sentence)
    spans = [m.strip().lstrip("-'\"").rstrip("'\"") for m in CODE_SPAN_RE.findall(text)]
    paths = [p for p in PATH_RE.findall(text) if PATH_MARK_RE.match(p)]
    names = [_squash(n) for n in spans + IDENTIFIER_RE.findall(text) + paths]
    return [n for n in dict.fromkeys(names) if len(n) > 1]


def _terms(sentence: str) -> list[str]:
    """The Latin-script terms a sentence states that survive translation: in a Chinese sentence every Latin word
    ("PyTorch", "Windows"); in an English one, the names written in capitals or mixed case ("ORPO", "InternLM2").

    Across languages these are the only words a sentence and the lines it translates share: "Lagent 的整体设计借鉴了
    PyTorch 的设计理念" over "Lagent is inspired by the design philosophy of PyTorch" scored a cosine of 0.575, under
    the 0.60 asked across languages, and the right answer was withheld (blind21). Lines that spell out every term of
    the sentence's own (the question's aside) get the relief that lines spelling out its figures and names get.
    """
    text = MARKER_RE.sub(" ", sentence)
    words = TERM_RE.findall(text)
    if language_of(text) != "zh":
        words = [w for w in words if MIXED_RE.match(w)]
    return [t for t in dict.fromkeys(_squash(w) for w in words) if len(t) > 1]


def _enumeration(sentence: str) -> tuple[str, list[str]]:
    """The lead and the items of a sentence that lists names ("LMDeploy 支持的模型包括 Llama、Llama2、…"): each item a
    short Latin-script name, squashed; no items unless there are at least ``MIN_ITEMS``.

    A faithful list of twenty models read from a table that two excerpts share was withheld whole: no run of three
    lines, nor any list of eight, holds every figure it names (a browser review). Its items are checked one by one.
    """
    text = MARKER_RE.sub(" ", sentence).strip().rstrip("。.!！")
    parts = [p.strip(" *`'\"") for p in ITEM_SPLIT_RE.split(text)]
    if len(parts) < MIN_ITEMS:
        return text, []
    head = LEAD_RE.match(parts[0])
    if not head or not head.group(1):
        return text, []
    # the lead's closing colon, when full-width ("以下模型：Intern S1、…"), is outside the CJK range: it began the
    # first item, which no line then held, and a faithful list read from a table was withheld (blind26)
    lead, items = head.group(1).strip(), [head.group(2).strip().lstrip(":：").strip(), *parts[1:]]
    if not lead or not all(re.search(r"[A-Za-z]", i) and len(i.split()) <= MAX_ITEM_WORDS
                           and not re.search(r"[\u3400-\u9fff]", i) for i in items):
        return text, []
    return lead, [_squash(i) for i in items]


def is_question(sentence: str, question: str = "") -> bool:
    """The sentence asks rather than states: it ends with a question mark (one in a link's address aside), or it
    is a piece of the question copied whole, its question word included ("pypi 上的 wheel 是用哪个 CUDA 编的").

    The small model sometimes writes the question back as its answer ("OpenCompass 会将机器上所有卡都占了，
    怎么限制它用几张 GPU？"), and its words are all in the lines the question was about: scored as a claim, it
    was cited to them, as if the sources said it (README "Answers"). A restatement that answers ("LMDeploy 支持
    V100") has no question word, and a sentence that goes on past the copied part is no copy.
    """
    text = MARKER_RE.sub("", sentence).strip()
    if text.endswith(("?", "？")) and "](" not in text and "://" not in text:
        return True
    copied = _squash(text.rstrip("。.!！"))
    return len(copied) >= 6 and copied in _squash(question) and bool(ASKING_RE.search(text))


def repeats_example(sentence: str, question: str = "") -> bool:
    """The sentence is the rules' worked example of a marker (``prompts.EXAMPLE_SENTENCE``) and the question does not
    ask about its subject: the model wrote its instructions back, which no source makes an answer."""
    def bare(text: str) -> str:
        return _squash(MARKER_RE.sub("", text)).rstrip("。.!！")

    if bare(sentence) != bare(EXAMPLE_SENTENCE):
        return False
    return EXAMPLE_SUBJECT not in _squash(question)


def is_claim(sentence: str) -> bool:
    """Two words or more, or a figure ("88.3%", "86.6 分。": a terse answer is still one), and not a lead-in
    ending with a colon ("以下是：", "Steps:") nor a question."""
    if MARKER_RE.sub("", sentence).rstrip().endswith((":", "：")) or is_question(sentence):
        return False
    return len(_claim_words(sentence)) >= 2 or bool(_figures(sentence))


def _context(lines: Sequence[str], fenced: Sequence[bool], i: int) -> list[int]:
    """The lines a reader of line ``i`` reads it with: its section's heading; in a table, the header row; in a
    list, the line that introduces it ("以下是训练脚本（`finetune.sh`）的关键参数：").

    The model read the excerpt whole: "v0.1.2 (24/10/2023)" in a changelog is
    the heading a few lines above the change it dates, and "10.291" in a
    benchmark row means RPS only through the table's header. Only lines
    within ``CONTEXT_LINES`` above count, so that a citation stays short.
    """
    out = []
    if LIST_ITEM_RE.match(lines[i]) and not fenced[i]:
        top = i
        while top > 0 and (LIST_ITEM_RE.match(lines[top - 1]) or not lines[top - 1].strip()) and i - top < CONTEXT_LINES:
            top -= 1
        lead = top - 1 if LIST_ITEM_RE.match(lines[top]) or not lines[top].strip() else top
        if 0 <= lead < i - 1 and not fenced[lead] and lines[lead].rstrip().endswith((":", "：")):
            out.append(lead)
    if lines[i].lstrip().startswith("|"):
        top = i
        while top > 0 and lines[top - 1].lstrip().startswith("|"):
            top -= 1
        if i - CONTEXT_LINES <= top < i - 1 and TABLE_RULE_RE.match(lines[top + 1]):
            out.append(top)
    for h in range(i - 1, max(-1, i - CONTEXT_LINES - 1), -1):
        if HEADING_RE.match(lines[h]) and not fenced[h]:
            if h < i - 1:
                out.append(h)
            break
    return sorted(out)


def _cells(line: str) -> tuple[str, ...]:
    """A markdown table row's cells as plain words (bold, code and link marks dropped); a ``|`` inside a code
    span or escaped does not split (`<|im_end|>`)."""
    body = line.strip().removeprefix("|").removesuffix("|")
    return tuple(" ".join(LINK_RE.sub(r"\1", c).replace("*", "").replace("`", "").split())
                 for c in CELL_SPLIT_RE.findall(body + "|"))


@dataclass(frozen=True)
class _Row:
    """A table row of an excerpt, with what a reader reads its figures by: its table's header and row labels."""
    cells: tuple[str, ...]
    header: tuple[str, ...]
    labels: tuple[str, ...]  # the first cell of every row of that table in the excerpt


def _table_rows(lines: Sequence[str]) -> dict[int, _Row]:
    """The excerpt's table data rows by line (0-based)."""
    out: dict[int, _Row] = {}
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        top = i
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            i += 1
        if not (top + 1 < i and TABLE_RULE_RE.match(lines[top + 1])):
            continue  # without its header rule, which row is the header is a guess: its figures are left alone
        header = _cells(lines[top])
        rows = {j: _cells(lines[j]) for j in range(top + 2, i)}
        labels = tuple(cells[0] for cells in rows.values() if cells)
        out.update({j: _Row(cells, header, labels) for j, cells in rows.items()})
    return out


def _named(sentence: str, names: Sequence[str]) -> set[str]:
    """Which of a table's headers or row labels the sentence names, each as a whole word, a longer name winning
    where two overlap ("Chat Hard" names that column, not "Chat")."""
    text = " ".join(sentence.lower().split())
    spans = []
    for name in set(names):
        words = name.lower().split()
        if len(name) < 2 or NUMERIC_CELL_RE.fullmatch(name) or not words:
            continue
        pattern = r"(?<![a-z0-9])" + r"\s*".join(map(re.escape, words)) + r"(?![a-z0-9])"
        spans += [(m.start(), m.end(), name) for m in re.finditer(pattern, text)]
    return {name for a, b, name in spans
            if not any(c <= a and b <= d and d - c > b - a for c, d, _ in spans)}


def _read_right(figure: str, row: _Row, sentence: str, question: str = "") -> bool | None:
    """Whether the sentence reads ``figure`` from this row under the column and row it names.

    None when the figure is no cell of its own in the row. A figure in a
    table means what its column header and row label say: "Chat Hard 98.6"
    read from the row's Chat column is a wrong claim, though the row holds 98.6.
    Only the headers of the row's figure columns count, so "model" in a
    sentence does not name the "Model" column of labels. Where the sentence
    names no column (or no row), the question's do: "86.6 分。" answers the
    "Chat Hard" it was asked about.
    """
    at = [c for c, v in enumerate(row.cells) if NUMERIC_CELL_RE.fullmatch(v) and _ungroup(v.rstrip("%")) == figure]
    if not at:
        return None
    columns = {c: row.header[c] for c, v in enumerate(row.cells) if NUMERIC_CELL_RE.fullmatch(v) and c < len(row.header)}
    said, asked = (_named(text, list(columns.values()) + list(row.labels)) for text in (sentence, question))
    labels = (said if said & set(row.labels) else asked) & set(row.labels)
    named_columns = {c for c, h in columns.items() if h in said} or {c for c, h in columns.items() if h in asked}
    return (not labels or row.cells[0] in labels) and (not named_columns or bool(named_columns.intersection(at)))


def _runs(lines: Sequence[str]) -> list[tuple[int, int, str, int, bool]]:
    """Runs of 1..MAX_LINES consecutive non-blank lines, and whole lists (``_lists``): (first, last, text, context
    lines read, whole list), 0-based.

    Each run also comes with its context lines before it (``_context``), as
    one more run citing from the first of them: a citation then spans the
    heading or header that a figure or a name of the sentence is read from.
    """
    out = []
    fenced = fenced_lines(lines)
    for i in range(len(lines)):
        if not lines[i].strip():
            continue
        context = _context(lines, fenced, i)
        for j in range(i, min(len(lines), i + MAX_LINES)):
            text = "\n".join(lines[i:j + 1])
            out.append((i, j, text, 0, False))
            if context:
                out.append((context[0], j, "\n".join([lines[c] for c in context] + [text]), len(context), False))
    for i, j in _lists(lines, fenced):
        context = _context(lines, fenced, i)
        text = "\n".join(lines[i:j + 1])
        out.append((i, j, text, 0, True))
        if context:
            out.append((context[0], j, "\n".join([lines[c] for c in context] + [text]), len(context), True))
    return out


def _lists(lines: Sequence[str], fenced: Sequence[bool]) -> list[tuple[int, int]]:
    """Lists of more than ``MAX_LINES`` items (up to ``MAX_LIST_LINES``), each as one run: a sentence that sums a
    list up ("Python 3.8+, PyTorch 1.12+, CUDA 11.4+ and flash-attention2") states figures no three lines hold.

    The body of a code block that short is one too: pinned versions ("torch==2.0.1" to "deepspeed==0.12.3", four
    lines of a fence) summed up in one sentence were withheld, right, as no three lines held them (blind29).
    """
    return _spans(lines, lambda i: not fenced[i] and bool(LIST_ITEM_RE.match(lines[i]))) + _spans(
        lines, lambda i: fenced[i] and not is_fence(lines[i]) and bool(lines[i].strip()))


def _spans(lines: Sequence[str], member: Callable[[int], bool]) -> list[tuple[int, int]]:
    """Each maximal span of consecutive member lines longer than ``MAX_LINES`` and at most ``MAX_LIST_LINES``."""
    out, start = [], None
    for i in range(len(lines) + 1):
        inside = i < len(lines) and member(i)
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            if MAX_LINES < i - start <= MAX_LIST_LINES:
                out.append((start, i - 1))
            start = None
    return out


class Aligner:
    """Aligns sentences with the excerpts of one answer."""

    def __init__(self, excerpts: Sequence[Hit], embed: Callable[[list[str]], np.ndarray] | None,
                 question: str = "", sections: Sequence[Sequence[str]] = ()) -> None:
        self.excerpts = list(excerpts)
        self.embed = embed
        # A figure the question names ("浦语·灵笔2.5", "CompassBench 2.0 v1.3") and some excerpt states is the
        # subject, not a claim: the supporting lines need not repeat it. "MI300", which no excerpt states, stays a
        # claim to check.
        stated = {_ungroup(f) for h in self.excerpts for f in NUMBER_RE.findall(h.text)}
        self.asked_figures = set(_figures(question))
        self.given = self.asked_figures & stated
        # words the sentence repeats from the question weigh ECHO: "the tiny qwen3 example needs about 8G" is
        # supported by "only 8G of memory is needed", though the line doesn't repeat the question's words
        self.question = question  # what a table figure's column or row is read by, when the sentence names neither
        self.question_words = set(tokenize(question))
        self.asked = _squash(question)  # a name the question itself spells out is the subject, not a claim
        self.labels = [_squash(f"{h.source}/{h.path}") for h in self.excerpts]  # as the prompt labels each excerpt
        runs = [(n, *run) for n, h in enumerate(self.excerpts, 1) for run in _runs(h.text.split("\n"))]
        self.runs = [run[:4] for run in runs]  # (excerpt number, first, last, text)
        contexts = [run[4] for run in runs]  # the heading or header lines each run is read with
        whole_lists = [run[5] for run in runs]
        tables = [_table_rows(h.text.split("\n")) for h in self.excerpts]
        # each run's own table rows (not the header it is read with), whose figures are read by column and row
        self.run_rows = [[tables[n - 1][i] for i in range(b - text.count("\n") + c, b + 1) if i in tables[n - 1]]
                         for (n, _, b, text), c in zip(self.runs, contexts)]
        self.run_words = [set(tokenize(text)) for *_, text in self.runs]
        # A run holds the figures and names of the headings its excerpt sits under in its file, as a reader of the
        # citation sees them: lines 9-15 of a changelog are v0.1.2's ("### v0.1.2 (24/10/2023)" at line 3), so
        # "the highlight of v0.1.2 was …" is checked against them; another file's lines still can't lend it "v0.1.2".
        above = [" ".join(sections[n - 1]) if n <= len(sections) else "" for n, *_ in self.runs]
        self.run_held = [_squash(f"{text}\n{heads}") for (*_, text), heads in zip(self.runs, above)]
        # among runs that hold the sentence equally well, the fewest lines read (a citation as narrow as it can be)
        # (a whole list, like a heading, is cited only when it adds what its shorter runs lack)
        self._length_cost = np.array([0.01 * (text.count("\n") - c) + (CONTEXT_COST if c else 0.0)
                                      + (CONTEXT_COST if listed else 0.0)
                                      for (*_, text), c, listed in zip(self.runs, contexts, whole_lists)])
        # how rare a word is, among the lines as they stand (a heading repeated in its runs' context counts once)
        docs = [w for w, c in zip(self.run_words, contexts) if not c] or [set()]
        self._n = len(docs)
        self._df: dict[str, int] = {}
        for words in docs:
            for w in words:
                self._df[w] = self._df.get(w, 0) + 1
        self._vectors: np.ndarray | None = None
        self._run_zh = np.array([language_of(text) == "zh" for *_, text in self.runs], dtype=bool)
        self.reversed = [_reversed_clauses(text) for *_, text in self.runs]
        self._negating = np.array([bool(NEGATING_RE.search(text)) for *_, text in self.runs], dtype=bool)

    def _weight(self, word: str) -> float:
        return math.log(1 + self._n / (1 + self._df.get(word, 0))) + 0.5  # unseen words weigh most

    def _run_vectors(self) -> np.ndarray | None:
        if self.embed is None or not self.runs:
            return None
        if self._vectors is None:
            self._vectors = self.embed([text for *_, text in self.runs])
        return self._vectors

    def scores(self, sentence: str) -> np.ndarray:
        """Each run's support for the sentence."""
        words = set(_claim_words(sentence)) - AFFIRMATIONS
        weight = {w: self._weight(w) * (ECHO if w in self.question_words else 1.0) for w in words}
        total = sum(weight.values()) or 1.0
        lexical = np.array([sum(weight[w] for w in words & rw) / total for rw in self.run_words])
        vectors = self._run_vectors()
        if vectors is None:
            return lexical - self._length_cost
        q = self.embed([MARKER_RE.sub(" ", sentence)])[0]
        cosine = vectors @ q
        score = LEXICAL * lexical + (1 - LEXICAL) * cosine
        # a sentence and lines in different languages share few words however exactly one translates the other:
        # there the cosine alone decides, against a higher bar (README "Answers")
        across = self._run_zh != (language_of(sentence) == "zh")
        return np.where(across, np.maximum(score, cosine - CROSS_LINGUAL_OFFSET), score) - self._length_cost

    def _turned(self, sentence: str) -> np.ndarray:
        """Runs a sentence contradicts: it restates a clause of theirs that a reversal turns around, without it."""
        if REVERSAL_RE.search(sentence) or not any(self.reversed):
            return np.zeros(len(self.runs), dtype=bool)
        words = set(_claim_words(sentence))
        return np.array([any(len(words & c) >= RESTATED * len(c) for c in clauses) for clauses in self.reversed],
                        dtype=bool)

    def _states_absence(self, sentence: str) -> bool:
        """The sentence states an absence of its own: not in a quotation (an error message the question quotes,
        "libGL.so.1: cannot open shared object file"), nor in words the question already uses."""
        asked = ASKS_EITHER_RE.sub(" ", self.question.lower())  # "有没有现成的镜像？" asks; it states no absence
        return any(m.group(0).lower() not in asked for m in ABSENCE_RE.finditer(QUOTED_RE.sub(" ", sentence)))

    def _read_right(self, figures: Sequence[str], run: int, sentence: str) -> bool:
        """No figure of the sentence is read from a table cell of the run under another column or row."""
        plain = MARKER_RE.sub(" ", sentence)
        # Of several figures, each is read in its own clause: "IXC2.5-lmdeploy uses 31.81 GB, and 23.21 GB with
        # 4-bit quantization" read both under the row it names, and a right answer was withheld (blind28).
        clauses = CLAUSE_SPLIT_RE.split(plain) if len(set(figures)) > 1 else [plain]
        for f in figures:
            text = next((c for c in clauses if f in _figures(c)), plain)
            verdicts = [v for v in (_read_right(f, row, text, self.question) for row in self.run_rows[run])
                        if v is not None]
            if verdicts and not any(verdicts):
                return False
        return True

    def align(self, sentence: str) -> Sentence:
        marked = sorted({n for m in MARKER_RE.finditer(sentence) for n in marker_numbers(m)})
        asks = is_question(sentence, self.question)
        out = Sentence(sentence, claim=is_claim(sentence) and not asks, marked=marked, asks=asks)
        if out.claim and repeats_example(sentence, self.question):
            out.echo = True
            return out
        sentence = sentence.translate(LOOKALIKES)  # a chat token quoted as the model read it, checked as written
        if not out.claim or not self.runs:
            return out
        scores = np.where(self._turned(sentence), -1.0, self.scores(sentence))
        if self._states_absence(sentence):  # an absence stated over lines that negate nothing states their opposite
            scores = np.where(self._negating, scores, -1.0)
        figures = [f for f in _figures(sentence) if f not in self.given]
        names = [n for n in _names(sentence) if n not in self.asked]
        if names:
            # The sentence states an exact name of its own (a flag, a variable, a path), which the lines must hold;
            # a figure it repeats from the question ("在 H800 这类 Hopper 卡上，…`XTUNER_USE_FA3=1`") is then its
            # premise. Otherwise the question's figure is checked: "XTuner 在 AMD MI300 上用 ROCm 训练" claims it,
            # and a figure of the sentence's own is too weak an anchor ("4bit 量化版比 FP16 少 235B" passed on a
            # Qwen3-235B line when the question's 4 and 16 were let go).
            figures = [f for f in figures if f not in self.asked_figures]
        bar = np.full(len(self.runs), THRESHOLD)
        if figures or names:  # a figure or name the lines don't hold is not supported by them, however alike the words
            in_lines = np.array([all(f in held for f in figures + names) for held in self.run_held])
            # the file an excerpt was shown under ("[2] xtuner/tools/llm_calc/README.md") holds its path, too
            labelled = [all(f in held for f in figures) and all(n in held or n in self.labels[e - 1] for n in names)
                        for (e, *_), held in zip(self.runs, self.run_held)]
            held = [label and self._read_right(figures, i, sentence) for i, label in enumerate(labelled)]
            scores = np.where(held, scores, -1.0)
            bar = np.where(in_lines, THRESHOLD - EXACT_RELIEF, THRESHOLD)  # the claim spelled out in the lines
        terms = [t for t in _terms(sentence) if t not in self.asked]
        if terms:  # across languages, the sentence's own Latin terms spelled out in the lines: a little below the bar
            across = self._run_zh != (language_of(sentence) == "zh")
            spelled = np.array([all(t in _squash(text) for t in terms) for *_, text in self.runs])
            bar = np.where(across & spelled, np.minimum(bar, THRESHOLD - EXACT_RELIEF), bar)
        margin = scores - bar
        best = int(np.argmax(margin))
        own = [i for i, r in enumerate(self.runs) if r[0] in marked]
        if own:
            best_own = max(own, key=lambda i: margin[i])
            out.marker_ok = bool(margin[best_own] >= 0)
            if out.marker_ok:
                best = best_own  # the model's choice, when its source holds the sentence
        if margin[best] >= 0:
            n, a, b, _ = self.runs[best]
            hit = self.excerpts[n - 1]
            out.source, out.line_start, out.line_end = n, hit.line_start + a, hit.line_start + b
        elif (listed := self._enumerated(sentence)) is not None:
            out.source, out.line_start, out.line_end, score = listed
            out.score = round(score, 3)
            return out
        out.score = round(float(scores[best]), 3)
        return out

    def _enumerated(self, sentence: str) -> tuple[int, int, int, float] | None:
        """A sentence listing names, supported when one file's excerpts spell out every item and a run of that file
        supports its lead ("LMDeploy 支持的模型包括" over "# 支持的模型"): (excerpt, first line, last line, score) of the
        file's lines from the first item to the last, or None."""
        lead, items = _enumeration(sentence)
        if not items or len(_claim_words(lead)) < 2:
            return None
        lead_scores = self.scores(lead)
        for key in dict.fromkeys((h.source, h.path) for h in self.excerpts):
            shown = [(n, h) for n, h in enumerate(self.excerpts, 1) if (h.source, h.path) == key]
            where = []  # (file line, excerpt) of each item's first line
            for item in items:
                found = next(((h.line_start + i, n) for n, h in shown for i, line in enumerate(h.text.split("\n"))
                              if item in _squash(line)), None)
                if found is None:
                    break
                where.append(found)
            else:
                first, last = min(where)[0], max(where)[0]
                runs = [i for i, r in enumerate(self.runs) if r[0] in {n for n, _ in shown}]
                lead_score = max((float(lead_scores[i]) for i in runs), default=-1.0)
                if last - first < ENUMERATION_SPAN and lead_score >= THRESHOLD - EXACT_RELIEF:
                    return min(where)[1], first, last, lead_score
        return None


def support(answer: str, excerpts: Sequence[Hit], embed: Callable[[list[str]], np.ndarray] | None,
            question: str = "", sections: Sequence[Sequence[str]] = ()) -> list[Sentence]:
    """Every sentence of the answer with the lines that support it (or none); ``question``: what was asked;
    ``sections``: the headings each excerpt sits under in its file."""
    aligner = Aligner(excerpts, embed, question, sections)
    return [aligner.align(s) for s in split_sentences(answer)]


def coverage(sentences: Sequence[Sentence]) -> float | None:
    """The share of claims that carry a citation."""
    claims = [s for s in sentences if s.claim]
    return round(sum(s.supported for s in claims) / len(claims), 4) if claims else None
