"""The answer's context: a few lines of each hit's file, not the whole chunk.

Prompt processing is the model's slow part on a CPU (about 100 tokens/s with
two threads), so the first word of an answer waits for every prompt token.
Five whole 400-token chunks made a 1,700-token prompt and a 23-28 s wait
(README "Answers"). The retriever has already found *which* chunks answer;
here each chunk is narrowed to the window of its lines that best matches the
question (its words, weighted by how rare they are among the hits, plus the
loaded embedding model's similarity), within a shared token budget. The
excerpts are lines of the file as git numbers them, read at the indexed
commit, so a citation of an excerpt is exact. The budget is counted with the
chat model's own tokenizer where it runs in this process (the estimate from
characters was off by up to a third either way), and estimated for a remote
model, whose tokenizer isn't at hand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from kb.citations import reanchor
from kb.markdown import FENCE_RE, OPTION_LINE_RE, fence_partners, open_fence
from kb.search.hits import Hit
from kb.search.signals import near_duplicate, shingles
from kb.words import tokenize

CJK_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")
CONTEXT_TOKENS = 700  # excerpts in all, by default (KB_CONTEXT_TOKENS): README "Answers" for the trade-off
MIN_TOKENS = 60  # no excerpt is cut below this (a table row and its header need room)
LEXICAL_WEIGHT = 0.5  # share of the question's (rarity-weighted) words in a window, next to the cosine
RANK_SHARES = (4.0, 2.0, 1.0, 1.0, 1.0)  # the budget's split over the hits by rank (README "Answers")
WINDOWS_EMBEDDED = 3  # best windows per hit by words, re-scored with the embedding model

TokenCounter = Callable[[str], int]  # text -> the chat model's tokens (``core.llm.token_counter``)
FenceAt = Callable[[Hit], str | None]  # the fence of a code block a hit's first line sits in (LineReader.open_fence)


def unit_embedder(embeddings) -> Callable[[list[str]], np.ndarray]:
    """The loaded embedding model as texts -> unit vectors (a dot product is then the cosine)."""

    def embed(texts: list[str]) -> np.ndarray:
        v = np.asarray(embeddings.embed_documents(texts), dtype=np.float32)
        return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-9, None)

    return embed


def estimate_tokens(text: str) -> int:
    """Chat-model tokens, roughly: CJK characters cost ~0.7 token each, other text ~1 per 3.2 characters.

    A least-squares fit to the default model's tokenizer on 400 chunks of the
    six repos gave 0.78 per CJK character and one token per 3.7 other
    characters (the median real/estimated ratio is 0.9); an estimate keeps
    this module free of any one model.
    """
    cjk = len(CJK_RE.findall(text))
    return math.ceil(cjk * 0.7 + (len(text) - cjk) / 3.2)


def line_costs(lines: Sequence[str], count: TokenCounter = estimate_tokens) -> list[int]:
    """Each line's tokens as the model reads it (compacted), plus its newline; a window costs their sum."""
    return [count(compact(line)) + 1 if line.strip() else 1 for line in lines]


INNER_SPACE_RE = re.compile(r"(?<=\S)[ \t]{2,}")
RULE_RE = re.compile(r"-{3,}")
# MyST's directive after a fence ("```{code-block} shell", "```{tip}"), and those whose body is code
DIRECTIVE_RE = re.compile(r"\{([\w-]+)\}\s*(\S*).*")
CODE_DIRECTIVES = frozenset({"code-block", "code", "code-cell", "sourcecode"})


def compact(text: str) -> str:
    """Text as the model reads it: runs of spaces inside a line made one, and a table's ``|-----|`` rule ``|---|``.

    Markdown tables pad their cells to line up ("|   Model    |  GPU(FP8) |"),
    and every padding space is a prompt token the first word waits for; a
    model table costs about half as much without it. Leading indentation
    stays, and so does every line, so line numbers and citations don't move.
    """
    return "\n".join(RULE_RE.sub("---", INNER_SPACE_RE.sub(" ", line)) for line in text.split("\n"))


@dataclass
class Window:
    start: int  # 0-based index into the hit's lines
    end: int  # exclusive
    text: str
    score: float = 0.0


def _windows(lines: Sequence[str], costs: Sequence[int], budget: int) -> list[Window]:
    """Runs of consecutive lines within ``budget`` tokens, one starting at each non-blank line."""
    out = []
    for i, first in enumerate(lines):
        if not first.strip():
            continue
        used, j = 0, i
        while j < len(lines):
            cost = costs[j]
            if used + cost > budget and j > i:
                break
            used += cost
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1
        out.append(Window(i, j, "\n".join(lines[i:j])))
        if j == len(lines):  # later starts only lose lines
            break
    return out


def _idf(question_words: set[str], texts: Sequence[str]) -> dict[str, float]:
    """How telling each question word is among these texts (rare across the hits' lines: telling)."""
    n = len(texts) or 1
    docs = [set(tokenize(t)) for t in texts]
    return {w: math.log(1 + n / (1 + sum(w in d for d in docs))) for w in question_words}


def _lexical(words: dict[str, float], text: str) -> float:
    if not words:
        return 0.0
    present = set(tokenize(text))
    return sum(v for w, v in words.items() if w in present) / sum(words.values())


@dataclass
class Excerpt:
    """A hit narrowed to the lines the prompt shows; ``hit`` is what a citation of it points at."""

    hit: Hit
    chunk: Hit  # the whole chunk the retriever found
    read: str = ""  # the text as the model reads it: ``hit.text`` with its fences made plain (``as_read``)

    def for_prompt(self) -> Hit:
        """The excerpt as the prompt shows it."""
        return replace(self.hit, text=self.read) if self.read else self.hit


def _budgets(needs: list[int], total: int, floor: int = MIN_TOKENS) -> list[int]:
    """Split ``total`` by rank (``RANK_SHARES``): short hits take only what they need, and pass the rest down.

    No share is below ``floor`` (which can take more than ``total`` when many hits share a small one).
    """
    budgets = [0] * len(needs)
    left, open_ = total, list(range(len(needs)))
    while open_:
        weights = [RANK_SHARES[min(i, len(RANK_SHARES) - 1)] for i in open_]
        shares = {i: max(floor, int(left * w / sum(weights))) for i, w in zip(open_, weights)}
        small = [i for i in open_ if needs[i] <= shares[i]]
        if not small:
            for i in open_:
                budgets[i] = shares[i]
            break
        for i in small:
            budgets[i] = needs[i]
            left -= needs[i]
        open_ = [i for i in open_ if i not in small]
    return budgets


def excerpts(hits: list[Hit], question: str, lines_of: Callable[[Hit], list[str]],
             embed: Callable[[list[str]], np.ndarray] | None, total: int = CONTEXT_TOKENS,
             count: TokenCounter | None = None, fence_at: FenceAt | None = None) -> list[Excerpt]:
    """Each hit's best window of lines for ``question``, the windows within ``total`` tokens together.

    ``lines_of(hit)`` gives the hit's lines ``line_start..line_end`` as git
    numbers them; ``embed`` turns texts into unit vectors (None: words alone decide);
    ``count`` is the chat model's tokenizer (None: ``estimate_tokens``);
    ``fence_at(hit)`` the fence of a code block the hit starts in (None: the hit's lines alone tell).
    Two windows with the same text (one guide copied into another) are shown
    once, and what the budget has left once the windows are cut to whole lines
    goes to the hits that were cut short, in rank order: a model table cut
    after its header answers nothing.
    """
    all_lines = [lines_of(h) for h in hits]
    costs = [line_costs(ls, count or estimate_tokens) for ls in all_lines]  # once per line, not once per window
    needs = [sum(c) for c in costs]
    idf = _idf(set(tokenize(question)), [line for ls in all_lines for line in ls])

    def choose(i: int, budget: int) -> Window:
        lines = all_lines[i]
        if needs[i] <= budget or not lines:
            return Window(0, len(lines), "\n".join(lines))
        return _best_window(_windows(lines, costs[i], budget), question, idf, embed)

    budgets = _budgets(needs, total)
    chosen = {i: choose(i, b) for i, b in enumerate(budgets)}
    distinct = _distinct(chosen)
    chosen = {i: w for i, w in chosen.items() if i in distinct}
    cost = {i: sum(costs[i][w.start:w.end]) for i, w in chosen.items()}
    short = [i for i in chosen if cost[i] < needs[i]]
    left = total - sum(cost.values())
    if short and left >= MIN_TOKENS // 2:
        # on top of what each window costs, not of its budget: the part of a budget that whole lines left
        # unused is already in ``left`` (counting it twice overshot the total by up to a third)
        for i, extra in zip(short, _budgets([needs[i] - cost[i] for i in short], left, floor=0)):
            chosen[i] = choose(i, cost[i] + extra)
    out = []
    for i, best in sorted(chosen.items()):
        hit = hits[i]
        a, b = hit.line_start + best.start, hit.line_start + max(best.end, best.start + 1) - 1
        narrowed = replace(hit, line_start=a, line_end=b, text=best.text, url=reanchor(hit.url, a, b))
        opened = open_fence(all_lines[i], best.start, fence_at(hit) if fence_at else None)
        out.append(Excerpt(narrowed, hit, "\n".join(as_read(all_lines[i][best.start:best.end], opened))))
    return out


def as_read(lines: Sequence[str], opened: str | None = None) -> list[str]:
    """The lines as the model reads them: every fence paired within them, MyST's directives as plain Markdown.

    A window often holds half a code block: it starts at the block's closing
    fence (the code went with the chunk before), or ends after its opening one.
    Read alone, a lone fence *opens* a block, so the prose after it reads as
    code, the next excerpts' labels with it, and the model copied the fence
    into its answer (README "Answers"): a lone fence is blanked. MyST's
    ``{code-block} shell`` becomes ``shell`` without its ``:caption:`` lines,
    which answers copied into their code; an admonition's fences (``{tip}``,
    ``{note}``) go, its text being prose. Blank lines keep every line number.
    """
    out, partners = list(lines), fence_partners(lines, opened)
    for i, j in partners.items():
        if j < i:
            continue  # a closing fence: decided with its opening one (or blanked below when lone)
        paired = j < len(lines)
        m = FENCE_RE.fullmatch(lines[i])
        directive = DIRECTIVE_RE.fullmatch(m.group(2).strip()) if m else None
        if paired and directive is None:
            continue
        if paired and directive.group(1) in CODE_DIRECTIVES:
            out[i] = lines[i][: m.start(2)] + directive.group(2)
        else:
            out[i] = ""
            if paired:
                out[j] = ""
        k = i + 1
        while k < len(lines) and k != j and OPTION_LINE_RE.fullmatch(lines[k]) and lines[k].strip():
            out[k], k = "", k + 1
    for i, j in partners.items():
        if j == -1:
            out[i] = ""
    return out


def _distinct(chosen: dict[int, Window]) -> set[int]:
    """The windows whose text no better-ranked window already shows (near-duplicates, as in retrieval)."""
    kept: list[tuple[int, set[str]]] = []
    for i, w in sorted(chosen.items()):
        sh = shingles(w.text)
        if not any(near_duplicate(sh, other) for _, other in kept):
            kept.append((i, sh))
    return {i for i, _ in kept}


def _best_window(windows: list[Window], question: str, idf: dict[str, float],
                 embed: Callable[[list[str]], np.ndarray] | None) -> Window:
    """The shortlist by words (and the chunk's opening), re-scored with the embedding model's cosine."""
    for w in windows:
        w.score = LEXICAL_WEIGHT * _lexical(idf, w.text)
    shortlist = sorted(windows, key=lambda w: -w.score)[:WINDOWS_EMBEDDED]
    if windows[0] not in shortlist:  # a chunk's opening often states what the rest details
        shortlist.append(windows[0])
    if embed is not None and len(shortlist) > 1:
        vectors = embed([question] + [w.text for w in shortlist])
        for w, v in zip(shortlist, vectors[1:]):
            w.score += float(np.dot(vectors[0], v))
    return max(shortlist, key=lambda w: w.score)
