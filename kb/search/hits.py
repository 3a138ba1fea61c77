"""What a search is asked (:class:`SearchOptions`) and what it returns (:class:`Hit`).

Every hit carries its score (higher is better, in the mode's own scale), the
retriever(s) that found it and its rank in each, so the admin can see why a
chunk came back; these are plain data for the CLI, the pages and the answer chain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from langchain_core.documents import Document

from kb.citations import location
from kb.errors import KBError

MODES = ("dense", "bm25", "hybrid")
SPECIFIC_IDF = 3.0
SCORE_NOTES = {
    "dense": "cosine similarity of the chunk's best passage (or of the chunk), -1..1, higher is better",
    "bm25": "BM25 (Okapi) score, >= 0, higher is better",
    "hybrid": "weighted reciprocal-rank fusion, sum of weight/(k+rank) over dense, bm25, passage bm25 and the lists "
              "of the document signals that found the chunk (the more lists found it, the larger), higher is better",
}
PASSAGE_BM25 = "bm25 passages"
OPENING = "readme opening"
README_SECTION = "readme section"
NEWS = "readme news"
IN_SOURCE = "dense in source"
ALSO_BM25 = "bm25 (other language)"  # the question's translation (SearchOptions.also_as), searched as well
ALSO_DENSE = "dense (other language)"
BM25_LEAD = "bm25 lead"


@dataclass
class SearchOptions:
    k: int = 5
    mode: str = "hybrid"
    threshold: float | None = None  # minimum score, in the mode's own scale
    mmr: bool = False
    source: str | None = None
    path_prefix: str | None = None
    # README "Retrieval tuning": with passages, plain RRF (k=60, equal weights)
    # over dense-on-passages, BM25 on chunks and BM25 on passages is on the
    # dev set's plateau; no retriever needs damping (dense-on-chunks, which
    # did, is left out of the fusion).
    rrf_k: int = 60
    dense_weight: float = 1.0
    bm25_weight: float = 1.0  # both BM25 lists
    # Chunks per retriever, before fusion. Deep lists let a chunk that sits at
    # rank 20-40 in all three outvote one that is first in two; 15-30 is the
    # plateau on both question sets, 40-50 its edge (README "Retrieval tuning").
    candidates: int = 20
    # Document-level signals in hybrid (kb/search/signals.py; README "Retrieval tuning").
    # Tuned on the dev and overview-dev sets (README "Retrieval tuning"), checked on the held-out ones.
    in_source_weight: float = 1.0  # RRF weight of dense search within the named source, as another list
    rest_idf: float = 6.0  # ... which fades as the question's other words get this specific
    opening_weight: float = 5.0  # RRF weight of the named source's root README opening (definitional questions)
    opening_chunks: int = 2  # how many opening chunks that list holds
    summary_opening: bool = True  # ... also for "what are X's main features?" (signals.SUMMARY_WORDS), unfaded
    subject_opening: bool = True  # ... and for "what is X …" with more words after X (signals.names_subject)
    name_compounds: bool = True  # "InternLM3-8B-Instruct" is the source named in full: "8b", "instruct" aren't asked
    name_asides: bool = True  # "OpenCompass（司南）": a bracket glossing the name is the source named again
    readme_weight: float = 5.0  # RRF weight of the named source's README chunks holding the question's other words
    # RRF weight of the named source's README news section (its first chunks) for a question about what is recent
    # (signals.asks_for_news), unfaded: "recent", "最近" are rare words, yet ask for the README's news (0: off)
    news_weight: float = 5.0
    readme_holds_all: bool = True  # ... at full weight, however specific the words, when its best chunk holds them all
    own_words_fade: bool = True  # the in-source list fades only for words the named source itself uses
    # A word written as code ("max_length", "--hf-num-gpus") names an option, a function or a flag, asked about
    # itself: where the named source's README never writes it, its README lists fade out (signals.code_words)
    code_words_fade: bool = True
    each_named: bool = True  # a question naming two sources gets each one's README sections, at half weight
    # BM25's first chunk as a list of its own when its score is this many times the second's (0: off): 1.2-1.35
    # give the same figures on every tuning set, 1.15 and 1.5 less (README "Retrieval tuning").
    bm25_lead: float = 1.3
    bm25_lead_weight: float = 1.0  # ... scaled like BM25's own weight by how specific the question's words are
    # With one source named, both BM25 lists rank that source's chunks only (dense still reads every source): the
    # named source held the gold in all 165 such questions of the six sets (README "Retrieval tuning").
    bm25_in_named: bool = True
    empty_penalty: float = 0.5  # fused score x this for a hit that is only a heading (1: off)
    hidden_penalty: float = 0.5  # ... and for one in a hidden folder (.github, .claude: signals.is_hidden)
    collapse: bool = True  # keep one of near-duplicate hits, the copy that fits the question's language
    # The question in the other language (kb/answer/translate.py; empty: off). Hybrid also ranks by BM25 and dense on
    # it, each list at this RRF weight: the weights that did best in the forty-first stop's experiment (README
    # "Retrieval tuning"). A question asked in one language about a page only the other has is found so.
    also_as: str = ""
    also_as_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KBError(f"unknown search mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 1 <= self.k <= 200:
            raise KBError(f"k must be between 1 and 200, not {self.k}")
        if self.threshold is not None and not math.isfinite(self.threshold):  # nan passed every filter as "no hits"
            raise KBError(f"the threshold must be a number, not {self.threshold}")


@dataclass
class Hit:
    rank: int
    score: float
    mode: str
    source: str
    path: str
    line_start: int
    line_end: int
    commit: str
    url: str
    text: str
    heading: str = ""
    id: str = ""
    found_by: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def citation(self) -> str:
        return location(self.source, self.path, self.line_start, self.line_end, self.commit)


def hit_from_document(doc: Document, score: float, mode: str) -> Hit:
    """A chunk as Chroma (or LangChain's wrapper) returned it, as a hit not yet ranked."""
    m = doc.metadata
    return Hit(
        rank=0, score=round(float(score), 6), mode=mode, source=m["source"], path=m["path"],
        line_start=int(m["line_start"]), line_end=int(m["line_end"]), commit=m.get("commit", ""),
        url=m.get("url", ""), text=doc.page_content, heading=m.get("heading", ""), id=doc.id or "",
    )
