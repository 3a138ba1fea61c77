"""The consistency check behind ``kb verify``: the manifest against what Chroma holds, and the clones.

The manifest says which documents are indexed, at which commit, in how many
chunks; the live collection holds the chunks and the passage collection their
passages. A crash, a server restored from an old backup or a folder deleted
by hand can leave them disagreeing, with nothing looking wrong until search
quietly misses. Each kind of problem is counted per source (and per document
where it is one), so ``--repair`` re-indexes only what is inconsistent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import git

from kb.ingest.chunking import ChunkConfig
from kb.store.index import VectorIndex, index_lost, passage_collection
from kb.store.manifest import Manifest

READ_PAGE = 5000
# problem kinds, in the order a person should read them
KINDS = {
    "no_live_collection": "the live collection is missing from the vector store",
    "lost_vector_index": "the live collection's vector index is lost or damaged: dense search finds almost nothing",
    "missing_commit": "the source's clone lacks the indexed commit",
    "missing_chunks": "a document has fewer chunks stored than indexed",
    "extra_chunks": "chunks are stored for a document that the manifest does not list with them",
    "foreign_records": "records of another chunk config or embedding model",
    "chunks_without_passages": "chunks whose passages are missing (dense search cannot find them)",
    "orphan_passages": "passages whose chunk is gone",
    "unknown_source": "records of a source that is not registered",
}
# what a full, checked rebuild of the source repairs; the rest is deleted directly
REBUILD = {"no_live_collection", "lost_vector_index", "missing_commit", "missing_chunks", "extra_chunks", "chunks_without_passages",
           "foreign_records", "orphan_passages"}


@dataclass
class Problem:
    kind: str
    source: str
    path: str = ""
    count: int = 1
    commit: str = ""  # the commit a problem is about (missing_commit), which sat in ``path`` before

    def as_dict(self) -> dict:
        return asdict(self)


def _all(coll, keys: tuple[str, ...]) -> list[tuple[str, dict]]:
    """Every record's id and the metadata ``keys``, read in pages."""
    out, offset = [], 0
    while True:
        page = coll.get(include=["metadatas"], limit=READ_PAGE, offset=offset)
        out += [(i, {k: m.get(k) for k in keys}) for i, m in zip(page["ids"], page["metadatas"])]
        if len(page["ids"]) < READ_PAGE:
            return out
        offset += READ_PAGE


def _missing_commits(manifest: Manifest, live: str) -> list[Problem]:
    out = []
    for src in manifest.sources():
        if not src.indexed_commit:
            continue
        try:
            git.Repo(src.repo_path).commit(src.indexed_commit)
        except (ValueError, git.BadName, git.NoSuchPathError, git.InvalidGitRepositoryError):
            out.append(Problem("missing_commit", src.name, commit=src.indexed_commit[:12]))
    return out




def check(manifest: Manifest, index: VectorIndex, live: str, config: ChunkConfig, embed_model: str) -> list[Problem]:
    """Every inconsistency between the manifest, the live collection, its passages and the clones."""
    sources = {s.name: s for s in manifest.sources()}
    indexed = {n for n, s in sources.items() if s.indexed_commit and s.indexed_collection == live}
    problems = _missing_commits(manifest, live)
    coll = index.find(live)
    if coll is None:
        return problems + [Problem("no_live_collection", name) for name in sorted(indexed)]
    pcoll = index.find(passage_collection(live)) if config.passage_size else None
    if any(index_lost(c) for c in (coll, pcoll) if c is not None):
        problems += [Problem("lost_vector_index", name) for name in sorted(indexed)]
    chunks = _all(coll, ("source", "path", "chunk_config", "embed_model", "text_hash"))
    stored = Counter((m["source"], m["path"]) for _, m in chunks)
    expected = {(d.source, d.path): d.chunks for d in manifest.documents()
                if d.source in indexed and d.status == "indexed"}
    for key, n in sorted(expected.items()):
        if stored.get(key, 0) < n:
            problems.append(Problem("missing_chunks", key[0], key[1], n - stored.get(key, 0)))
    for key, n in sorted(stored.items()):
        if key[0] in indexed and n > expected.get(key, 0):
            problems.append(Problem("extra_chunks", key[0], key[1], n - expected.get(key, 0)))
    per_source = Counter()
    for _, m in chunks:
        if m["source"] not in sources:
            per_source[("unknown_source", m["source"])] += 1
        elif m["chunk_config"] != config.hash or m["embed_model"] != embed_model:
            per_source[("foreign_records", m["source"])] += 1
    if config.passage_size:
        passages = _all(pcoll, ("parent", "source")) if pcoll is not None else []
        parents = {m["parent"] for _, m in passages}
        ids = {i for i, _ in chunks}
        # A chunk repeating another of its document word for word has no passages of its own (kb/ingest/passages.py).
        found = {(m["source"], m["path"], m["text_hash"]) for i, m in chunks if i in parents}
        for i, m in chunks:
            if i not in parents and m["source"] in sources and (m["source"], m["path"], m["text_hash"]) not in found:
                per_source[("chunks_without_passages", m["source"])] += 1
        for _, m in passages:
            if m["parent"] not in ids:
                per_source[("orphan_passages" if m["source"] in sources else "unknown_source", m["source"])] += 1
    problems += [Problem(kind, source, "", n) for (kind, source), n in sorted(per_source.items())]
    return sorted(problems, key=lambda p: (list(KINDS).index(p.kind), p.source, p.path))


def report(problems: list[Problem], repaired: bool = False) -> dict:
    """The ``kb verify --json`` object: healthy, every problem, totals per kind, and whether a repair ran."""
    totals = Counter()
    for p in problems:
        totals[p.kind] += p.count
    return {"healthy": not problems, "problems": [p.as_dict() for p in problems],
            "totals": dict(totals), "repaired": repaired}
