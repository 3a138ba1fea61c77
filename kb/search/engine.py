"""Retrieval over the live collection: dense, BM25 and their fusion.

The engine runs each retriever (``kb/search/bm25.py``, Chroma for dense),
fuses them (``kb/search/fusion.py``), optionally reranks
(``kb/search/rerank.py``) and returns :class:`~kb.search.hits.Hit` s.
``KBRetriever`` wraps the same search as a LangChain ``BaseRetriever``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from langchain_chroma import Chroma
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever

from core.settings import Settings
from kb.errors import KBError
from kb.ingest.chunking import ChunkConfig
from kb.search.bm25 import BM25Matrix
from kb.search.fusion import fuse, specificity
from kb.search.hits import PASSAGE_BM25, Hit, SearchOptions, hit_from_document
from kb.search.rerank import CrossEncoderReranker
from kb.store.index import VectorIndex
from kb.store.manifest import Manifest
from kb.words import tokenize


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


@dataclass
class _Lexical:
    version: str
    matrix: BM25Matrix
    ids: list[str]
    sources: np.ndarray
    paths: np.ndarray
    parents: list[str]  # passages: each one's chunk; chunks: empty


class SearchEngine:
    """Searches the live collection; caches the BM25 matrix per collection version."""

    def __init__(self, kb: SearchableKB) -> None:
        self.kb = kb
        self._lexical: dict[str, _Lexical] = {}
        self._stores: dict[tuple[str, str], Chroma] = {}
        self._passages_of: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        self._reranker: CrossEncoderReranker | None = None

    # building blocks
    def _store(self, coll) -> Chroma:
        """LangChain's wrapper over a collection, kept: building one costs a round trip to Chroma per query."""
        key = (coll.name, str(coll.id))  # a dropped and rebuilt collection has a new id
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = Chroma(client=self.kb.index.client, collection_name=coll.name,
                                               embedding_function=self.kb.embeddings)
        return store

    def _where(self, opts: SearchOptions) -> dict | None:
        return self.kb.where(opts.source, opts.path_prefix)

    def lexical(self, collection: str, passages: bool = False) -> _Lexical | None:
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
            ids, tokens, sources, paths, parents = [], [], [], [], []
            offset = 0
            while True:
                page = coll.get(include=["metadatas"], limit=5000, offset=offset)
                for cid, meta in zip(page["ids"], page["metadatas"]):
                    ids.append(cid)
                    tokens.append((meta.get("bm25") or "").split())
                    sources.append(meta["source"])
                    paths.append(meta["path"])
                    if passages:
                        parents.append(meta["parent"])
                if len(page["ids"]) < 5000:
                    break
                offset += 5000
            lex = _Lexical(version, BM25Matrix(tokens), ids, np.asarray(sources, dtype=object),
                           np.asarray(paths, dtype=object), parents)
            self._lexical[key] = lex
            return lex

    def _dense(self, coll, query: str, n: int, opts: SearchOptions) -> list[tuple[Document, float]]:
        store = self._store(coll)
        where = self._where(opts)
        scored = store.similarity_search_with_relevance_scores(query, k=max(n, opts.k * 4) if opts.mmr else n, filter=where)
        if not opts.mmr:
            return scored
        by_id = {d.id: s for d, s in scored}
        picked = store.max_marginal_relevance_search(query, k=n, fetch_k=max(n, opts.k * 4), filter=where)
        return [(d, by_id.get(d.id, 0.0)) for d in picked]

    def _bm25_top(self, lex: _Lexical, tokens: list[str], n: int, opts: SearchOptions) -> list[tuple[int, float]]:
        mask = None
        if opts.source or opts.path_prefix:
            mask = np.ones(len(lex.ids), dtype=bool)
            if opts.source:
                mask &= lex.sources == opts.source
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
        key = ("passages " + coll.name, str(coll.id))  # a rebuilt collection has a new id, and new passages
        if key not in self._passages_of:
            self._passages_of[key] = self.kb.index.passages(coll.name)
        return self._passages_of[key]

    def _dense_passages(self, pcoll, query: str, n: int, opts: SearchOptions) -> list[tuple[str, float]]:
        """Chunks ranked by their best passage's similarity (2n passages are read to find n chunks).

        Passages keep no text (kb/passages.py), and LangChain's wrapper drops
        records without text, so this one query goes to Chroma directly; the
        score is the wrapper's cosine relevance, 1 - distance.
        """
        got = pcoll.query(query_embeddings=[self.kb.embeddings.embed_query(query)], n_results=2 * n,
                          where=self._where(opts), include=["metadatas", "distances"])
        return self._ranked([(m["parent"], 1.0 - d) for m, d in zip(got["metadatas"][0], got["distances"][0])], n)

    def _bm25(self, lex: _Lexical, tokens: list[str], n: int, opts: SearchOptions) -> list[tuple[str, float]]:
        """Chunk ids by BM25; over passages (``lex.parents``), each passage's chunk."""
        if not lex.parents:
            return [(lex.ids[i], s) for i, s in self._bm25_top(lex, tokens, n, opts)]
        return self._ranked([(lex.parents[i], s) for i, s in self._bm25_top(lex, tokens, 2 * n, opts)], n)

    @staticmethod
    def _documents(coll, ids: set[str], docs: dict[str, Document]) -> None:
        """Read the chunks not yet in ``docs``, all in one round trip."""
        missing = [i for i in ids if i not in docs]
        if missing:
            got = coll.get(ids=missing, include=["documents", "metadatas"])
            for i, t, m in zip(got["ids"], got["documents"], got["metadatas"]):
                docs[i] = Document(page_content=t, metadata=m, id=i)

    # the search
    def search(self, query: str, opts: SearchOptions | None = None) -> list[Hit]:
        opts = opts or SearchOptions()
        if not query.strip():
            raise KBError("the query is empty")
        collection, config = self.kb.live()
        try:
            coll = self.kb.index.get(collection)
        except KBError:  # a fresh knowledge base: nothing indexed yet
            return []
        if coll.count() == 0:
            return []
        n = max(opts.candidates, opts.k) if opts.mode == "hybrid" else opts.k
        pcoll = self._passages(coll, config)
        ranked: dict[str, list[tuple[str, float]]] = {}
        docs: dict[str, Document] = {}
        if opts.mode in ("dense", "hybrid"):
            if pcoll is not None and not opts.mmr:
                ranked["dense"] = self._dense_passages(pcoll, query, n, opts)
            else:
                scored = self._dense(coll, query, n, opts)
                docs.update((d.id, d) for d, _ in scored)
                ranked["dense"] = [(d.id, s) for d, s in scored]
        if opts.mode in ("bm25", "hybrid"):
            lex, tokens = self.lexical(collection), tokenize(query)
            ranked["bm25"] = self._bm25(lex, tokens, n, opts)
            if opts.mode == "hybrid" and pcoll is not None:
                ranked[PASSAGE_BM25] = self._bm25(self.lexical(collection, passages=True), tokens, n, opts)
        self._documents(coll, {i for lst in ranked.values() for i, _ in lst}, docs)
        lists = {m: [(docs[i], s) for i, s in lst if i in docs] for m, lst in ranked.items()}
        if opts.mode == "hybrid":
            hits = fuse(lists, opts, bm25_scale=specificity(lex.matrix, tokens))
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
