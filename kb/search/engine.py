"""Retrieval over the live collection: dense, BM25 and their fusion.

The engine runs each retriever (``kb/search/bm25.py``, Chroma for dense),
fuses them (``kb/search/fusion.py``), optionally reranks
(``kb/search/rerank.py``) and returns :class:`~kb.search.hits.Hit` s.
``KBRetriever`` wraps the same search as a LangChain ``BaseRetriever``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Protocol

import numpy as np
from langchain_chroma import Chroma
from langchain_chroma.vectorstores import maximal_marginal_relevance
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever

from core.settings import Settings
from kb import log as runlog
from kb.errors import KBError
from kb.ingest.chunking import ChunkConfig
from kb.search.fusion import fuse, specificity
from kb.search import lexical, signals
from kb.search.lexical import Lexical
from kb.search.hits import (ALSO_BM25, ALSO_DENSE, BM25_LEAD, IN_SOURCE, NEWS, OPENING, PASSAGE_BM25, README_SECTION,
                            Hit, SearchOptions, hit_from_document)
from kb.search.rerank import CrossEncoderReranker
from kb.store.index import VectorIndex, once_more_if_reopened, reachable
from kb.store.manifest import Manifest
from kb.words import glossed, language_of, query_tokens, tokenize

_log = logging.getLogger(__name__)

IN_SOURCE_DEPTH = 300  # passages read when a source is named, to rank its own chunks too
# BM25's and dense's first hits compared for KB_TRANSLATE_QUESTIONS=auto: with no chunk in common among five, 42 of the
# 87 cross-lingual questions of the forty-third stop's sample were translated against 56 of 159 others
AGREE_K = 5
CHUNK_CACHE = 20_000  # chunks kept in memory for the next searches (about 40 MB at most), per collection version


class SearchableKB(Protocol):
    """What the engine needs of the knowledge base; ``KnowledgeBase`` (the facade) is one."""

    settings: Settings
    manifest: Manifest

    @property
    def index(self) -> VectorIndex: ...

    @property
    def embeddings(self) -> Embeddings: ...

    def where(self, source: str | None = None, path_prefix: str | None = None) -> dict | None: ...

    def live(self) -> tuple[str, ChunkConfig]: ...

    def read_document(self, source: str, path: str): ...


class SearchEngine:
    """Searches the live collection; caches the BM25 matrix per collection version."""

    def __init__(self, kb: SearchableKB) -> None:
        self.kb = kb
        self._lexical: dict[str, Lexical] = {}
        self._stores: dict[tuple[str, str, int], Chroma] = {}
        self._passages_of: dict[tuple[str, str, int], object] = {}
        self._lock = threading.Lock()
        self._reranker: CrossEncoderReranker | None = None
        # document-level facts (root README chunks, sources' name words), kept for the collection version they were
        # read at: (kind, collection[, source]) -> (version, value), so old versions don't pile up in a long-lived server
        self._doc_facts: dict[tuple, tuple[str, object]] = {}
        self._chunks: tuple[tuple[str, str], dict[str, Document]] = (("", ""), {})  # (collection, version), chunks

    # building blocks
    def _store(self, coll) -> Chroma:
        """LangChain's wrapper over a collection, kept: building one costs a round trip to Chroma per query."""
        index = self.kb.index
        # a dropped and rebuilt collection has a new id; a reopened store (another process wrote) a new client
        key = (coll.name, str(coll.id), index.opened)
        store = self._stores.get(key)
        if store is None:
            self._stores = {k: v for k, v in self._stores.items() if k[2] == index.opened}
            store = self._stores[key] = Chroma(client=index.client, collection_name=coll.name,
                                               embedding_function=self.kb.embeddings)
        return store

    def _where(self, opts: SearchOptions) -> dict | None:
        return self.kb.where(opts.source, opts.path_prefix)

    def lexical(self, collection: str, passages: bool = False) -> Lexical | None:
        """The BM25 matrix of a collection (or of its passages), rebuilt only when a sync changed it."""
        version = self.kb.manifest.collection_version(collection)
        key = (collection, passages)
        with self._lock:
            cached = self._lexical.get(key)
            if cached and cached.version == version:
                return cached
            coll = self.kb.index.passages(collection) if passages else self.kb.index.get(collection)
            if coll is None:
                return None
            lex = lexical.read_or_build(coll, collection, version, passages, self.kb.settings.cache_path / "bm25")
            self._lexical[key] = lex
            return lex

    def _dense(self, coll, query: str, n: int, opts: SearchOptions) -> list[tuple[Document, float]]:
        store = self._store(coll)
        where = self._where(opts)
        wanted = max(n, opts.k * 4) if opts.mmr else n
        scored = store.similarity_search_with_relevance_scores(query, k=wanted, filter=where)
        exact = self._exact_if_short(coll, query, wanted, where, len(scored), mmr_k=n if opts.mmr else None)
        if exact is not None:
            return exact
        if not opts.mmr:
            return scored
        by_id = {d.id: s for d, s in scored}
        picked = store.max_marginal_relevance_search(query, k=n, fetch_k=wanted, filter=where)
        return [(d, by_id.get(d.id, 0.0)) for d in picked]

    def _exact_if_short(self, coll, query: str, n: int, where: dict | None, got: int,
                        mmr_k: int | None = None) -> list[tuple[Document, float]] | None:
        """Every record the filter matches, scored by cosine, when the graph search returned fewer than it holds.

        Identical vectors (a chunk repeated in a file, each copy stored with
        its own record) can cut Chroma's HNSW graph apart, and a filtered
        query then returns a short list, or nothing, with no error (README
        "How indexing works"). The passages skip repeats; the chunk collection,
        read here by MMR and by a configuration without passages, can't, so a
        short answer is checked against the filter's count and, if records
        were missed, the search is done exactly (with ``mmr_k``, then MMR picks
        that many, as LangChain's wrapper would). None: nothing was missed.
        """
        if got >= n:
            return None
        held = coll.count() if where is None else len(coll.get(where=where, include=[])["ids"])
        if held <= got:
            return None
        rows = coll.get(where=where, include=["embeddings", "documents", "metadatas"])
        vectors = np.asarray(rows["embeddings"], dtype=np.float32)
        q = np.asarray(self.kb.embeddings.embed_query(query), dtype=np.float32)
        cos = vectors @ q / np.clip(np.linalg.norm(vectors, axis=1) * np.linalg.norm(q), 1e-9, None)
        top = np.argsort(-cos, kind="stable")[:n]
        _log.warning("dense search returned %d of the %d records its filter holds: searched them exactly", got, held)
        if mmr_k is not None:  # in similarity order, as LangChain's wrapper returns its picks
            top = top[sorted(maximal_marginal_relevance(q, [vectors[i] for i in top], k=mmr_k))]
        return [(Document(page_content=rows["documents"][i], metadata=rows["metadatas"][i], id=rows["ids"][i]),
                 float(cos[i])) for i in top]

    def _bm25_top(self, lex: Lexical, tokens: list[str], n: int, opts: SearchOptions,
                  within: str | None = None) -> list[tuple[int, float]]:
        """The top rows, within the filter's source (or else ``within``, the one source the question names)."""
        mask = None
        source = opts.source or within
        if source or opts.path_prefix:
            mask = np.ones(len(lex.ids), dtype=bool)
            if source:
                mask &= lex.of_source(source)
            if opts.path_prefix:
                mask &= np.fromiter((p.startswith(opts.path_prefix) for p in lex.paths), bool, len(lex.paths))
        return lex.matrix.top(tokens, n, mask)

    @staticmethod
    def _ranked(scored_ids: list[tuple[str, float]], n: int) -> list[tuple[str, float]]:
        """The first ``n`` distinct ids, best first: a chunk named by two of its passages keeps its best place."""
        best: dict[str, float] = {}
        for cid, s in scored_ids:
            if cid not in best:
                best[cid] = s
                if len(best) == n:
                    break
        return list(best.items())

    def _passages(self, coll, config: ChunkConfig):
        """The live collection's passages (kept, as the wrappers are), or None when it was built without."""
        if not config.passage_size:
            return None
        index = self.kb.index
        # a rebuilt collection has a new id, and new passages; a reopened store a new client
        key = ("passages " + coll.name, str(coll.id), index.opened)
        if key not in self._passages_of:
            self._passages_of = {k: v for k, v in self._passages_of.items() if k[2] == index.opened}
            self._passages_of[key] = index.passages(coll.name)
        return self._passages_of[key]

    def _dense_passages(self, pcoll, collection: str, query: str, n: int, opts: SearchOptions,
                        also_in: str | None = None) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Chunks ranked by their best passage's similarity (2n passages are read to find n chunks).

        With ``also_in``, the same query also ranks that source's chunks alone
        (from the top 300 passages): the in-source list of the named-source
        signal, without a second, filtered search.
        Passages keep no text (kb/passages.py), and LangChain's wrapper drops
        records without text, so this one query goes to Chroma directly; the
        score is the wrapper's cosine relevance, 1 - distance. Each passage's
        chunk and source come from the passages' BM25 rows, which hold both:
        reading 300 passages' metadata back from Chroma took longer than the
        nearest-neighbour search itself (README "Search latency").
        """
        got = pcoll.query(query_embeddings=[self.kb.embeddings.embed_query(query)],
                          n_results=max(2 * n, IN_SOURCE_DEPTH) if also_in else 2 * n,
                          where=self._where(opts), include=["distances"])
        owners = self._passage_owners(pcoll, collection, got["ids"][0])
        scored = [(owners[pid][0], 1.0 - d, owners[pid][1]) for pid, d in zip(got["ids"][0], got["distances"][0])
                  if pid in owners]
        in_source = self._ranked([(c, sc) for c, sc, src in scored if src == also_in], n) if also_in else []
        return self._ranked([(c, sc) for c, sc, _ in scored], n), in_source

    def _passage_owners(self, pcoll, collection: str, ids: list[str]) -> dict[str, tuple[str, str]]:
        """Each passage's (chunk, source), from the BM25 rows; one read for any a sync added since they were built."""
        lex = self.lexical(collection, passages=True)
        owners: dict[str, tuple[str, str]] = {}
        missing = []
        for pid in ids:
            row = lex.row_of.get(pid) if lex is not None else None
            if row is None:
                missing.append(pid)
            else:
                owners[pid] = (lex.parents[row], lex.sources[row])
        if missing:
            got = pcoll.get(ids=missing, include=["metadatas"])
            owners.update((pid, (m["parent"], m["source"])) for pid, m in zip(got["ids"], got["metadatas"]))
        return owners

    def _bm25(self, lex: Lexical, tokens: list[str], n: int, opts: SearchOptions,
              within: str | None = None) -> list[tuple[str, float]]:
        """Chunk ids by BM25; over passages (``lex.parents``), each passage's chunk."""
        if not lex.parents:
            return [(lex.ids[i], s) for i, s in self._bm25_top(lex, tokens, n, opts, within)]
        return self._ranked([(lex.parents[i], s) for i, s in self._bm25_top(lex, tokens, 2 * n, opts, within)], n)

    def _documents(self, coll, collection: str, ids: set[str], docs: dict[str, Document]) -> None:
        """Fill ``docs`` with the chunks ``ids``: those read before (for this collection version) from memory, the
        rest in one round trip. Questions on one subject share most of their candidates, and reading 60 chunks
        back took a fifth of a search (README "Search latency")."""
        version = self.kb.manifest.collection_version(collection)
        if self._chunks[0] != (collection, version) or len(self._chunks[1]) > CHUNK_CACHE:
            self._chunks = ((collection, version), {})
        cache = self._chunks[1]
        missing = [i for i in ids if i not in docs and i not in cache]
        if missing:
            got = coll.get(ids=missing, include=["documents", "metadatas"])
            for i, t, m in zip(got["ids"], got["documents"], got["metadatas"]):
                cache[i] = Document(page_content=t, metadata=m, id=i)
        docs.update((i, cache[i]) for i in ids if i not in docs and i in cache)

    def check(self) -> None:
        """Raise now if the index can't be read (a Chroma server down), before a caller starts slower work."""
        with reachable(self.kb.settings):
            collection, _ = self.kb.live()
            self._live_collection(collection)

    def warm(self) -> None:
        """Read what a process's first searches would otherwise each read once: the BM25 matrices, the sources'
        names and their root READMEs (a first question about a source took up to 140 ms, later ones 30), and
        jieba's dictionary (0.6 s); a knowledge base that loads its own embedding model (the CLI's) loads it here
        too (0.7 s), while the dashboard's shared one is loaded by its preload."""
        self.kb.embeddings  # noqa: B018
        tokenize("预热")
        with reachable(self.kb.settings):
            collection, config = self.kb.live()
            coll, count = self._live_collection(collection)
            if coll is None or count == 0:
                return
            self.lexical(collection)
            if config.passage_size:
                self.lexical(collection, passages=True)
            for source in self._aliases(collection):
                self._readmes(coll, collection, source)

    # the search
    def search(self, query: str, opts: SearchOptions | None = None) -> list[Hit]:
        """The hits for ``query``; a Chroma server outage is an error naming it, never an empty list."""
        opts = opts or SearchOptions()
        t0 = time.perf_counter()
        with reachable(self.kb.settings):
            hits = once_more_if_reopened(lambda: self.kb.index, lambda: self._search(query, opts))
        runlog.log_search(self.kb.settings, query, opts, hits, (time.perf_counter() - t0) * 1000)
        return hits

    def _search(self, query: str, opts: SearchOptions) -> list[Hit]:
        if not query.strip():
            raise KBError("the query is empty")
        collection, config = self.kb.live()
        coll, count = self._live_collection(collection)
        if coll is None or count == 0:  # a fresh knowledge base: nothing indexed yet
            return []
        query = self._respelled(collection, query)
        n = max(opts.candidates, opts.k) if opts.mode == "hybrid" else opts.k
        pcoll = self._passages(coll, config)
        ranked: dict[str, list[tuple[str, float]]] = {}
        docs: dict[str, Document] = {}
        named: list[str] = []
        if opts.mode == "hybrid":
            lex, tokens = self.lexical(collection), query_tokens(query)
            if not opts.source:
                named = signals.named_sources(lex.matrix, lex.owners, tokens, self._aliases(collection))
        if opts.mode in ("dense", "hybrid"):
            if pcoll is not None and not opts.mmr:
                in_source = named[0] if len(named) == 1 and opts.in_source_weight else None
                ranked["dense"], ranked[IN_SOURCE] = self._dense_passages(
                    pcoll, collection, query, n, opts, also_in=in_source)
                if not in_source:
                    del ranked[IN_SOURCE]
            else:
                scored = self._dense(coll, query, n, opts)
                docs.update((d.id, d) for d, _ in scored)
                ranked["dense"] = [(d.id, s) for d, s in scored]
        if opts.mode in ("bm25", "hybrid"):
            if opts.mode == "bm25":
                lex, tokens = self.lexical(collection), query_tokens(query)
            within = named[0] if opts.bm25_in_named and len(named) == 1 else None
            ranked["bm25"] = self._bm25(lex, tokens, n, opts, within)
            if opts.mode == "hybrid" and pcoll is not None:
                ranked[PASSAGE_BM25] = self._bm25(self.lexical(collection, passages=True), tokens, n, opts, within)
        if opts.mode == "hybrid" and opts.also_as.strip():
            self._also_as(lex, pcoll, coll, collection, opts.also_as, n, opts, ranked, docs)
        self._documents(coll, collection, {i for lst in ranked.values() for i, _ in lst}, docs)
        lists = {m: [(docs[i], s) for i, s in lst if i in docs] for m, lst in ranked.items()}
        if opts.mode == "hybrid":
            hits = self._hybrid(coll, collection, query, lex, tokens, named, lists, opts)
        else:
            hits = self._single(lists[opts.mode], opts.mode)
        if self.kb.settings.reranker_path:
            if self._reranker is None or self._reranker.path != self.kb.settings.reranker_path:
                self._reranker = CrossEncoderReranker(self.kb.settings.reranker_path)
            hits = self._reranker.rerank(query, hits)
        if opts.threshold is not None:
            hits = [h for h in hits if h.score >= opts.threshold]
        hits = hits[: opts.k]
        for r, h in enumerate(hits, 1):
            h.rank = r
        return hits

    def _also_as(self, lex: Lexical, pcoll, coll, collection: str, other: str, n: int, opts: SearchOptions,
                 ranked: dict, docs: dict) -> None:
        """BM25 and dense lists for the question's translation: every source, as the user's words would not name one
        in the other language the same way."""
        ranked[ALSO_BM25] = self._bm25(lex, query_tokens(other), n, opts)
        if pcoll is not None and not opts.mmr:
            ranked[ALSO_DENSE], _ = self._dense_passages(pcoll, collection, other, n, opts)
        else:
            scored = self._dense(coll, other, n, opts)
            docs.update((d.id, d) for d, _ in scored)
            ranked[ALSO_DENSE] = [(d.id, s) for d, s in scored]

    def retrievers_disagree(self, query: str, opts: SearchOptions | None = None) -> bool:
        """Whether BM25's and dense's first ``AGREE_K`` hits share no chunk: the question's words and its meaning
        point at different pages, as they do when its answer is written in the other language (the gate of
        ``KB_TRANSLATE_QUESTIONS=auto``; README "Retrieval tuning"). Not logged as searches of their own."""
        opts = replace(opts or SearchOptions(), k=AGREE_K, also_as="")
        with reachable(self.kb.settings):
            first = [{(h.source, h.path, h.line_start) for h in self._search(query, replace(opts, mode=mode))}
                     for mode in ("bm25", "dense")]
        return bool(first[0] | first[1]) and not first[0] & first[1]  # neither found anything: nothing to disagree on

    def searched_as(self, query: str) -> str:
        """The question as every mode searches it: what the Retrieval lab shows beside the hits when it differs."""
        with reachable(self.kb.settings):
            return self._respelled(self.kb.live()[0], query)

    def _respelled(self, collection: str, query: str) -> str:
        """The question with a slipped or split source name ("lmdepoy", "open compass") written as the docs write it,
        and a name they never write glossed with theirs ("魔搭（ModelScope）", ``words.glossed``): every mode then
        searches for the name (``signals.respell``)."""
        query = glossed(query)
        lex = self.lexical(collection)
        if lex is None:
            return query
        names = set().union(*self._aliases(collection).values())
        return signals.respell(query, names, lambda w: w in lex.matrix.vocab)

    def _hybrid(self, coll, collection: str, query: str, lex: Lexical, tokens: list[str], named: list[str],
                lists: dict[str, list[tuple[Document, float]]], opts: SearchOptions) -> list[Hit]:
        """Fuse the lists, with the document-level signals of ``kb/search/signals.py``."""
        language = language_of(query)
        extra, weights = self._named_source_lists(coll, collection, query, lex, tokens, named, language, opts)
        bm25_scale = specificity(lex.matrix, tokens)
        lead = lists.get("bm25") or []
        if opts.bm25_lead and lead and (len(lead) == 1 or lead[0][1] >= opts.bm25_lead * lead[1][1]):
            # A chunk whose BM25 score clearly leads the next one's is a confident lexical match; where dense
            # misses it, plain RRF lets two middling lists outvote it (README "Retrieval tuning").
            extra[BM25_LEAD] = lead[:1]
            weights[BM25_LEAD] = opts.bm25_lead_weight * bm25_scale
        weights.update({m: opts.also_as_weight for m in (ALSO_BM25, ALSO_DENSE) if m in lists})
        hits = fuse({**lists, **extra}, opts, bm25_scale=bm25_scale, extra_weights=weights)
        if opts.empty_penalty != 1.0 or opts.hidden_penalty != 1.0:
            for h in hits:
                if signals.is_empty(h):
                    h.score *= opts.empty_penalty
                if signals.is_hidden(h.path):
                    h.score *= opts.hidden_penalty
            hits.sort(key=lambda h: -h.score)
        if opts.collapse:
            # Past k distinct hits nothing is shown, unless a threshold or the reranker may drop or reorder some.
            whole = opts.threshold is not None or bool(self.kb.settings.reranker_path)
            hits = signals.collapse_duplicates(hits, language, limit=None if whole else opts.k)
        for h in hits:
            h.score = round(h.score, 6)
        return hits

    def _fade(self, lex: Lexical, rest: list[str], source: str, opts: SearchOptions) -> float:
        """1 for a question whose other words are generic, down to 0 as they get specific.

        With ``own_words_fade``, only the words the source itself uses count: a
        word it never uses ("异步" for Lagent, whose docs say "async") can't be
        found in it by BM25, which leaves dense search within it the only way in.
        """
        if opts.own_words_fade:
            rest = [w for w in rest if signals.uses(lex.matrix, lex.owners, source, w)]
        return 1.0 - min(1.0, lex.matrix.max_idf(rest) / opts.rest_idf) if rest else 1.0

    def _named_source_lists(self, coll, collection: str, query: str, lex: Lexical, tokens: list[str],
                            named: list[str], language: str, opts: SearchOptions) -> tuple[dict, dict]:
        """The lists a named source adds (its README's opening and sections), and every signal list's weight.

        A question about what the source is ("InternLM 是什么？书生·浦语大模型是干什么的？") wants its
        opening; one asking about something generic in it ("How do I install LMDeploy?") its README's section
        on that. Both fade as the question's other words get specific, unless the README's best section
        holds them all. A question naming two sources ("怎么用 LMDeploy 给浦语·灵笔2.5 加速推理？") gets each
        one's sections, ranked by the words that are not its own name, at a share of the weight.
        """
        if not named:
            return {}, {}
        aliases = self._aliases(collection)
        in_full = query if opts.name_compounds else ""  # names written in full are names (signals.name_compounds)
        lists: dict[str, list[tuple[Document, float]]] = {}
        weights: dict[str, float] = {}
        if len(named) == 1:
            # "OpenCompass（司南）是什么？": the bracket names the source again (signals.name_asides)
            plain, asides = (signals.name_asides(query, named[0], aliases, lex.matrix, lex.owners)
                             if opts.name_asides else (query, set()))
            rest = signals.asked_about(tokens, named, aliases, in_full, asides)
            fade = self._fade(lex, rest, named[0], opts)
            # "What are X's highlights?": its words are rare in the corpus, yet ask for the README's introduction
            summary = opts.summary_opening and signals.asks_for_summary(rest)
            # "What is X …? Is it …?": X itself is asked about, whatever the other words (signals.names_subject)
            subject = opts.subject_opening and signals.names_subject(plain, aliases.get(named[0], set()))
            opening_fade = 1.0 if summary or subject else fade
            readmes = None if opts.path_prefix else self._readmes(coll, collection, named[0])
            code = signals.code_words(plain) if opts.code_words_fade else []
            if code and readmes and signals.writes_none(readmes, code):
                fade_readme = opening_fade = 0.0  # "max_length": an option the README never names
            else:
                fade_readme = fade
            weights[IN_SOURCE] = opts.in_source_weight * fade
            if readmes and opts.opening_weight and (not rest or summary or signals.definitional(query)) \
                    and opening_fade > 0:
                lists[OPENING] = [(d, 0.0) for d in signals.opening(
                    readmes, language, opts.opening_chunks, frozenset(aliases.get(named[0], ())))]
                weights[OPENING] = opts.opening_weight * opening_fade
            self._sections(lists, weights, README_SECTION, readmes, language, rest, fade_readme, 1.0, opts)
            if readmes and opts.news_weight and signals.asks_for_news(plain):
                news = signals.news_section(readmes, language, opts.opening_chunks)
                if news:
                    lists[NEWS], weights[NEWS] = [(d, 0.0) for d in news], opts.news_weight
        elif opts.each_named and not opts.path_prefix:
            for src in named:
                rest = signals.asked_about(tokens, [src], aliases, in_full)
                self._sections(lists, weights, f"{README_SECTION} ({src})", self._readmes(coll, collection, src),
                               language, rest, self._fade(lex, rest, src, opts), 1.0 / len(named), opts)
        return lists, weights

    @staticmethod
    def _sections(lists: dict, weights: dict, name: str, readmes: list[Document], language: str, rest: list[str],
                  fade: float, share: float, opts: SearchOptions) -> None:
        """A README's sections on the question's other words, as list ``name``."""
        if not (readmes and opts.readme_weight and rest):
            return
        found = signals.readme_sections(readmes, language, rest, opts.opening_chunks)
        if found and opts.readme_holds_all and signals.holds_all(found[0], rest):
            fade = 1.0
        if found and fade > 0:
            lists[name] = [(d, 0.0) for d in found]
            weights[name] = opts.readme_weight * fade * share

    def _doc_fact(self, key: tuple, collection: str, read):
        """``read()`` once per collection version (a sync changes the version), cached under ``key``."""
        version = self.kb.manifest.collection_version(collection)
        cached = self._doc_facts.get(key)
        if cached is None or cached[0] != version:
            cached = self._doc_facts[key] = (version, read())
        return cached[1]

    def _live_collection(self, collection: str) -> tuple[object, int]:
        """The collection and its size, read once per version: two round trips to Chroma a search saved."""

        def read() -> tuple[object, int]:
            coll = self.kb.index.find(collection)
            return coll, coll.count() if coll is not None else 0

        # the collection object belongs to the store's client: a reopened store (another process wrote) reads anew
        opened = self.kb.index.opened
        for old in [k for k in self._doc_facts if k[0] == "collection" and k[2] != opened]:
            self._doc_facts.pop(old, None)
        return self._doc_fact(("collection", collection, opened), collection, read)

    def _readmes(self, coll, collection: str, source: str) -> list[Document]:
        """The chunks of ``source``'s root READMEs."""

        def read() -> list[Document]:
            paths = [d.path for d in self.kb.manifest.documents(source)
                     if d.status == "indexed" and signals.is_root_readme(d.path)]
            got = coll.get(where={"$and": [{"source": source}, {"path": {"$in": paths or ["\0"]}}]},
                           include=["documents", "metadatas"])
            return [Document(page_content=t, metadata=m, id=i)
                    for i, t, m in zip(got["ids"], got["documents"], got["metadatas"])]

        return self._doc_fact(("readmes", collection, source), collection, read)

    def _aliases(self, collection: str) -> dict[str, set[str]]:
        """Each source's name words: its name and its root READMEs' titles, as BM25 words, and their short forms."""

        def read() -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for src in self.kb.manifest.sources():
                words = set(tokenize(src.name)) | signals.acronyms(src.name)
                for d in self.kb.manifest.documents(src.name):
                    if d.status == "indexed" and signals.is_root_readme(d.path):
                        try:
                            title = signals.readme_title(self.kb.read_document(src.name, d.path).text)
                            words |= set(tokenize(title)) | signals.acronyms(title)
                        except KBError:  # the clone lost the commit: its name still counts
                            pass
                out[src.name] = {w for w in words if not w.isdigit()}
            return out

        return self._doc_fact(("aliases", collection), collection, read)

    def _single(self, scored: list[tuple[Document, float]], mode: str) -> list[Hit]:
        hits = []
        for r, (doc, s) in enumerate(scored, 1):
            h = hit_from_document(doc, s, mode)
            h.found_by, h.ranks, h.scores = [mode], {mode: r}, {mode: round(float(s), 6)}
            hits.append(h)
        return hits

class KBRetriever(BaseRetriever):
    """The search as a LangChain retriever; hit details ride in the metadata."""

    engine: SearchEngine
    options: SearchOptions

    model_config = {"arbitrary_types_allowed": True}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [
            Document(page_content=h.text, metadata={k: v for k, v in h.as_dict().items() if k != "text"}, id=h.id)
            for h in self.engine.search(query, self.options)
        ]
