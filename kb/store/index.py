"""Chroma collections: one per chunk config and embedding model.

The embedded default is a ``PersistentClient`` in ``KB_HOME/chroma``;
``KB_CHROMA_URL`` switches to a Chroma server. Collections never get Chroma's
default embedding function (it downloads a model): we always supply vectors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import chromadb
import httpx
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import ChromaError, NotFoundError

from core.settings import Settings, redact
from kb.errors import KBError
from kb.progress import Progress, no_progress
from kb.store.manifest import write_number, written_elsewhere


class ChromaUnreachable(KBError):
    """The Chroma server did not answer: every operation fails alike, so a sync stops at once."""


@contextlib.contextmanager
def reachable(settings: Settings) -> Iterator[None]:
    """A Chroma server that stops answering becomes one error naming it, never an empty result.

    Nothing is cached on the way out, so the same process works again once the
    server is back. The embedded store has no network to lose.
    """
    try:
        yield
    except httpx.TransportError as exc:
        raise unreachable(settings, exc) from None


def unreachable(settings: Settings, exc: Exception) -> ChromaUnreachable:
    """One line naming the server (without its credentials), and a timeout as what it is."""
    where = redact(settings.chroma_url)
    if isinstance(exc, httpx.TimeoutException):
        return ChromaUnreachable(f"the Chroma server at {where} did not answer within {settings.chroma_timeout:g} s "
                                 f"(KB_CHROMA_TIMEOUT): it is running but stuck or overloaded")
    return ChromaUnreachable(f"cannot reach the Chroma server at {where}: {exc}")


READ_BATCH = 500

# How far Chroma's HNSW search looks (hnswlib's ``ef``; Chroma's default is 100). The graph is approximate, and
# depends on the order, batches and threads the vectors went in with: at 100, on the six-repo knowledge base
# (18,197 passages, the 24 dev questions) Chroma left out 37 of the exact top-40 passages (15 questions) and 375 of
# the top 300, and the copy a snapshot import built missed others, so 4-6 of the 72 searches of `bench.run snapshot`
# changed after an import (1-2 in their hits). At 2,000 it misses none of the top 40 (1 of the 7,200 of the top
# 300; none with the graph built as below), before an import and after: the same hits in the same order, for 2-4 ms
# more a dense query (hnswlib's cost grows with ef, hardly with the collection's size: +5 ms at 250,000 vectors).
EF_SEARCH = 2000

# How the graph is built (hnswlib's M and ef_construction; Chroma's defaults are 16 and 100). A search can only find
# a vector the graph links to, and pruning a crowded neighbour list can leave an outlying vector with no link in:
# then no query finds it, at any ef. On the two-bundle index of tests/test_snapshot.py (1,699 passages, its tiny
# random embedding model, where outliers are common) 3 of 24 snapshot imports at Chroma's defaults left a passage
# that no query could reach (0 of 24 synced builds); 0 of 40 imports and 0 of 40 synced builds at these. New
# collections only: Chroma can't change them on one that exists. On the six-repo index (18,129 passages, the
# default model) neither setting left one unreachable in 3 builds each; these build it in 4.7 s against 2.8 s and
# answer a top-40 query in 3.1 against 2.9 ms (medians).
MAX_NEIGHBORS = 32
EF_CONSTRUCTION = 200


# chromadb keeps one shared "system" per path or server and builds it on a client's first use; two threads
# building it at once (two browser sessions opening the dashboard together) see it half made: "'RustBindingsAPI'
# object has no attribute 'bindings'", "Could not connect to tenant default_tenant" (4 of 5 tries with 8 threads).
_CLIENT_LOCK = threading.Lock()


def make_client(settings: Settings) -> "chromadb.ClientAPI":
    with _CLIENT_LOCK:
        return _make_client(settings)


def _make_client(settings: Settings) -> "chromadb.ClientAPI":
    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if settings.chroma_url:
        return _server_client(settings, chroma_settings)
    settings.chroma_path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chroma_path), settings=chroma_settings)


def _server_client(settings: Settings, chroma_settings: ChromaSettings) -> "chromadb.ClientAPI":
    """A client for ``KB_CHROMA_URL``: its path (a server behind a proxy), its credentials, and a timeout.

    chromadb builds its ``httpx`` client with no timeout, so a server that accepts and never answers (stopped,
    swapping, a proxy whose backend is gone) held a search, a sync or a page forever; and it takes a host, so a
    URL's ``/prefix`` and ``user:password@`` were dropped. The server is asked for its heartbeat here first,
    within the timeout, because chromadb's constructor already talks to it.
    """
    url = urlsplit(settings.chroma_url)
    if url.scheme not in {"http", "https"} or not url.hostname:
        raise KBError(f"KB_CHROMA_URL={redact(settings.chroma_url)!r} is not an http(s) URL")
    try:
        port = url.port or (443 if url.scheme == "https" else 8000)
    except ValueError:
        raise KBError(f"KB_CHROMA_URL={redact(settings.chroma_url)!r} has no valid port") from None
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    base = urlunsplit((url.scheme, f"{host}:{port}", url.path.rstrip("/"), "", ""))
    timeout = httpx.Timeout(settings.chroma_timeout, connect=min(settings.chroma_timeout, 10.0))
    auth = (unquote(url.username), unquote(url.password or "")) if url.username else None
    try:
        httpx.get(f"{base}/api/v2/heartbeat", timeout=timeout, auth=auth).raise_for_status()
    except httpx.TransportError as exc:
        raise unreachable(settings, exc) from None
    except httpx.HTTPStatusError as exc:
        raise ChromaUnreachable(f"the Chroma server at {redact(settings.chroma_url)} answered "
                                f"HTTP {exc.response.status_code} to its heartbeat: check KB_CHROMA_URL") from None
    if auth:  # Chroma's own basic-auth provider: the server's `basic_authn`, or a proxy asking for it
        chroma_settings.chroma_client_auth_provider = "chromadb.auth.basic_authn.BasicAuthClientProvider"
        chroma_settings.chroma_client_auth_credentials = f"{auth[0]}:{auth[1]}"
    try:
        client = chromadb.HttpClient(host=base, port=port, ssl=url.scheme == "https", settings=chroma_settings)
    except (httpx.TransportError, ValueError) as exc:  # ValueError: chromadb's "Could not connect to a Chroma server"
        raise unreachable(settings, exc) from None
    client._server._session.timeout = timeout  # type: ignore[attr-defined]  # chromadb's own client, timeout=None
    return client


def collection_name(config_hash: str, model_slug: str) -> str:
    """One collection per chunk config and embedding model: ``kb-<config hash>-<model>``."""
    return f"kb-{config_hash}-{model_slug}"[:63].rstrip("-._")


PREFIX = "kbp-"
STAGING_PREFIX = PREFIX + "import-"  # a snapshot import's staging collections: hidden, like passage collections


def passage_collection(chunk_collection: str) -> str:
    """The passages' collection beside a chunk collection ("kb-…" → "kbp-…")."""
    return (PREFIX + chunk_collection.removeprefix("kb-"))[:63].rstrip("-._")


def is_passage_collection(name: str) -> bool:
    return name.startswith(PREFIX)


class Record(Protocol):
    """What the index writes: a chunk or a passage (``document`` is the stored text, None for none)."""

    id: str
    document: str | None

    def metadata(self) -> dict: ...


def _batches(seq: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


T = TypeVar("T")


def once_more_if_reopened(index: Callable[[], "VectorIndex"], read: Callable[[], T]) -> T:
    """``read()``, run once more when another thread reopened the store under it (``VectorIndex.reopen``).

    A read that took a collection from the old client fails on it with chromadb's "'RustBindingsAPI' object has no
    attribute 'bindings'": a search, and a page's read (Collections' record browser, a document's chunks) alike.
    Anything else, and the same error on a client nobody reopened, is raised as it came.
    """
    opened = index().opened
    try:
        return read()
    except AttributeError:
        if index().opened == opened:
            raise
        return read()


PROBE = 10  # the first records (the oldest: written into the graph first) whose vectors must read back


def first_vectors(coll) -> list | None:
    """The first records' vectors, or None when they can't be read back: the collection's vector graph is lost.

    Chroma keeps the records in SQLite and their vectors in the graph's files of its own: with those files gone (a
    backup that skipped them, a disk error) counts, metadata and BM25 look whole, while a dense search reaches only
    the records added since the graph was last written (a review saw one hit of four) and reading a vector fails
    with "Error finding id". Counting what a query reaches is no test: hundreds of identical vectors leave a healthy
    graph's duplicates unreachable too (``test_repeated_line_keeps_other_sources_dense_searchable``).
    """
    try:
        embs = coll.get(limit=PROBE, include=["embeddings"])["embeddings"]
    except ChromaError:
        return None
    return [] if embs is None else list(embs)


def index_lost(coll) -> bool:
    return first_vectors(coll) is None


class VectorIndex:
    """The operations sync, re-chunk and the pages need, on raw Chroma collections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen = self._write_number()  # before the client opens: a write after it is caught by ``stale``
        self.client = make_client(settings)
        self.opened = 1  # how many clients this index has opened: caches of collection wrappers key on it
        self._ef_checked: set = set()  # ids of the collections known to have EF_SEARCH

    def _write_number(self) -> int:
        return 0 if self.settings.chroma_url else write_number(self.settings.home)

    def stale(self) -> bool:
        """Whether another process wrote to the embedded store since this client opened it.

        chromadb's embedded client loads a collection's vector graph once per process and never reads the disk
        again: a dashboard left open while ``kb sync`` ran in a terminal searched the graph it had loaded, never
        found the new chunks, and failed its next write on ids the other process had deleted ("Error finding id").
        A Chroma server is one process for every client, so it is never stale.
        """
        if self.settings.chroma_url:
            return False
        foreign, now = written_elsewhere(self.settings.home, self.seen)
        if not foreign:
            self.seen = now
        return foreign

    def reopen(self) -> None:
        """A new client, which reads the store as it is on disk now.

        chromadb shares one client system per folder within a process and stops it when its last client closes:
        this index's client is the only one in the dashboard and the CLI, so the next opens afresh. A query another
        thread had started on the old client ends normally; a search or a page's read that had taken a collection from
        it before the reopen fails on it, and runs once more on the new client (``once_more_if_reopened``).
        """
        self.seen = self._write_number()
        self.client.close()
        self.client = make_client(self.settings)
        self.opened += 1
        self._ef_checked.clear()

    def _with_ef_search(self, coll):
        """``coll``, with ``ef_search`` raised to EF_SEARCH when it has less (a collection made before it was set).

        Checked once per collection and VectorIndex, and written once per store. Chroma reads ``ef_search`` when it
        loads a collection's index into a process, so this comes before the first query; a process (or a Chroma
        server) that had already queried the collection uses the new value once it loads the index again.
        """
        if coll.id in self._ef_checked:
            return coll
        hnsw = (coll.configuration or {}).get("hnsw") or {}
        if hnsw and int(hnsw.get("ef_search") or 0) < EF_SEARCH:
            try:
                coll.modify(configuration={"hnsw": {"ef_search": EF_SEARCH}})
            except (ChromaError, ValueError):  # e.g. a server that refuses the change: search as before
                return coll
        self._ef_checked.add(coll.id)
        return coll

    def get(self, name: str):
        try:
            return self._with_ef_search(self.client.get_collection(name, embedding_function=None))
        except NotFoundError:
            raise KBError(f"no collection named {name!r}") from None

    def exists(self, name: str) -> bool:
        return name in self.names()

    def names(self) -> list[str]:
        """Chunk collections; their passage collections go with them and are not listed."""
        return sorted(c.name for c in self.client.list_collections() if not is_passage_collection(c.name))

    def passages(self, name: str):
        """The passage collection of chunk collection ``name``, or None when it has none."""
        try:
            return self._with_ef_search(self.client.get_collection(passage_collection(name), embedding_function=None))
        except NotFoundError:
            return None

    def create(self, name: str, chunk_config: str, embed_model: str):
        """The collection ``name``: a new one is made for cosine similarity, built with MAX_NEIGHBORS and
        EF_CONSTRUCTION and searched with EF_SEARCH (an existing one keeps its settings, but gets EF_SEARCH)."""
        return self._with_ef_search(self.client.get_or_create_collection(
            name,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine", "ef_search": EF_SEARCH, "max_neighbors": MAX_NEIGHBORS,
                                    "ef_construction": EF_CONSTRUCTION}},
            metadata={"chunk_config": chunk_config, "embed_model": embed_model},
        ))

    def drop(self, name: str) -> None:
        self.client.delete_collection(name)
        if self.passages(name) is not None:
            self.client.delete_collection(passage_collection(name))

    def describe(self, name: str) -> dict:
        coll = self.get(name)
        meta = coll.metadata or {}
        passages = self.passages(name)
        # the vector graph's files gone (``kb verify``'s lost_vector_index): listed as such, not a traceback
        embs = first_vectors(coll)
        lost = embs is None or (passages is not None and index_lost(passages))
        dim = len(embs[0]) if embs else None
        return {
            "name": name,
            "count": coll.count(),
            "passages": passages.count() if passages is not None else 0,
            "dimension": dim,
            "vectors_lost": lost,
            "embed_model": meta.get("embed_model", ""),
            "chunk_config": meta.get("chunk_config", ""),
        }

    @staticmethod
    def passage_ids(pcoll, source: str, paths: Sequence[str] | None = None) -> set[str]:
        """Ids of a source's stored passages, all of them or those of some paths."""
        out: set[str] = set()
        if paths is not None and not paths:
            return out
        for part in ([None] if paths is None else list(_batches(sorted(set(paths)), READ_BATCH))):
            where = {"source": source} if part is None else {"$and": [{"source": source}, {"path": {"$in": list(part)}}]}
            offset = 0
            while True:
                page = pcoll.get(where=where, include=[], limit=5000, offset=offset)
                out.update(page["ids"])
                if len(page["ids"]) < 5000:
                    break
                offset += 5000
        return out

    def ping(self) -> None:
        """Ask the store to answer (a no-op sync touches nothing else, and must not report "up to date" from a dead server)."""
        self.client.heartbeat()

    def find(self, name: str):
        """The collection, or None when there is none (never creates one)."""
        try:
            return self._with_ef_search(self.client.get_collection(name, embedding_function=None))
        except NotFoundError:
            return None

    @staticmethod
    def source_chunks(coll, source: str) -> dict[str, dict[str, str]]:
        """path -> {chunk id: text_hash} for one source, read in pages."""
        out: dict[str, dict[str, str]] = {}
        offset = 0
        while True:
            page = coll.get(where={"source": source}, include=["metadatas"], limit=5000, offset=offset)
            for cid, meta in zip(page["ids"], page["metadatas"]):
                out.setdefault(meta["path"], {})[cid] = meta.get("text_hash", "")
            if len(page["ids"]) < 5000:
                return out
            offset += 5000

    @staticmethod
    def vectors_for_hashes(coll, hashes: Sequence[str]) -> dict[str, list[float]]:
        """Stored vectors of texts we already embedded, keyed by text hash."""
        found: dict[str, list[float]] = {}
        for batch in _batches(list(hashes), READ_BATCH):
            page = coll.get(where={"text_hash": {"$in": list(batch)}}, include=["metadatas", "embeddings"])
            for meta, vec in zip(page["metadatas"], page["embeddings"]):
                found.setdefault(meta["text_hash"], list(vec))
        return found

    def upsert(self, coll, chunks: Sequence[Record], vectors: Sequence[Sequence[float]], progress: Progress = no_progress) -> None:
        """Write records in the largest batches Chroma takes, each with the text it keeps (``document``; a passage none)."""
        size = self.client.get_max_batch_size()
        done = 0
        for i in range(0, len(chunks), size):
            part = chunks[i : i + size]
            documents = [c.document for c in part]
            coll.upsert(
                ids=[c.id for c in part],
                embeddings=[list(v) for v in vectors[i : i + size]],
                documents=None if documents[0] is None else documents,
                metadatas=[c.metadata() for c in part],
            )
            done += len(part)
            progress("store", done, len(chunks), coll.name)

    def update_metadata(self, coll, chunks: Sequence[Record]) -> None:
        size = self.client.get_max_batch_size()
        for part in _batches(list(chunks), size):
            coll.update(ids=[c.id for c in part], metadatas=[c.metadata() for c in part])

    def delete_where(self, coll, key: str, values: Iterable[str]) -> None:
        """Delete the records whose metadata ``key`` is one of ``values`` (passages by parent)."""
        for part in _batches(sorted(set(values)), READ_BATCH):
            coll.delete(where={key: {"$in": list(part)}})

    def delete_ids(self, coll, ids: Iterable[str]) -> None:
        ids = list(ids)
        size = self.client.get_max_batch_size()
        for part in _batches(ids, size):
            coll.delete(ids=list(part))
