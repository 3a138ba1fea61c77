"""The BM25 side of one collection (its chunks or its passages), and its copy on disk.

Building it reads every record's words back from Chroma and builds the
matrix: on the six shared repos, seconds that a process's first question
paid, in a thread beside the model's load on the same two cores. So each
one built is also saved under ``KB_HOME/cache/bm25``, named by the
collection and its version (``Manifest.collection_version``, changed by
every sync and re-chunk): the next process reads it back instead. A file
whose version, record count or format doesn't match what it is asked for
is never used; one that can't be read is built again and overwritten.
Only the newest version of each collection is kept.

Each record's words are its stored words and its file's name (``path_words``): the title that a file without
headings lacks, and that a page's later chunks lose. Format 2 on: a format-1 copy (stored words only) is built again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from kb.search import signals
from kb.search.bm25 import BM25Matrix
from kb.words import tokenize

_log = logging.getLogger(__name__)

FORMAT = 2  # 2: the file name's words with each record's (path_words)
PAGE = 5000  # records read from Chroma per call


@dataclass
class Lexical:
    version: str
    matrix: BM25Matrix
    ids: list[str]
    sources: np.ndarray
    paths: np.ndarray
    parents: list[str]  # passages: each one's chunk; chunks: empty
    owners: signals.Sources  # the same sources, counted once for the named-source signals
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per source, as they are asked for

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Each id's row: a passage's chunk and source without reading its metadata back from Chroma."""
        return {cid: i for i, cid in enumerate(self.ids)}

    def of_source(self, source: str) -> np.ndarray:
        """The rows of one source, kept: comparing every row's source per query costs ms at 200k rows."""
        if source not in self.masks:
            self.masks[source] = self.sources == source
        return self.masks[source]


def _lexical(version: str, matrix: BM25Matrix, ids: list[str], sources: list[str], paths: list[str],
             parents: list[str]) -> Lexical:
    owned = np.asarray(sources, dtype=object)
    return Lexical(version, matrix, ids, owned, np.asarray(paths, dtype=object), parents, signals.Sources(owned))


def path_words(path: str) -> list[str]:
    """The BM25 words of a file's name, without its folders and extension: "requirements/optional.txt" gives
    "optional", "docs/en/get_started/installation.md" "installation".

    A document-level signal at no cost to sync: lagent's optional dependencies are a bare list in
    ``requirements/optional.txt``, and "what does lagent list among its optional dependencies?" found it in no mode
    (blind32). Over the 38 sets (1,387 questions), hybrid hit@5 1,264 -> 1,271 (8 sets up, 1 down) and hit@1
    974 -> 977, up in every category; the folder's name as well ("get_started", "requirements") lost 12 overview
    hits at hit@5 (README "Retrieval tuning").
    """
    return tokenize(PurePosixPath(path).stem)


def read_collection(coll, version: str, passages: bool) -> Lexical:
    """Every record's BM25 words (stored at sync time, never re-tokenized) and its file name's, source, path and
    parent, from Chroma."""
    ids, tokens, sources, paths, parents = [], [], [], [], []
    offset = 0
    while True:
        page = coll.get(include=["metadatas"], limit=PAGE, offset=offset)
        for cid, meta in zip(page["ids"], page["metadatas"]):
            ids.append(cid)
            tokens.append((meta.get("bm25") or "").split() + path_words(meta["path"]))
            sources.append(meta["source"])
            paths.append(meta["path"])
            if passages:
                parents.append(meta["parent"])
        if len(page["ids"]) < PAGE:
            break
        offset += PAGE
    return _lexical(version, BM25Matrix(tokens), ids, sources, paths, parents)


def cache_path(folder: Path, collection: str, version: str, passages: bool) -> Path:
    safe = re.sub(r"[^\w.-]", "_", collection)
    return folder / f"{safe}.{'passages' if passages else 'chunks'}.{re.sub(r'[^0-9A-Za-z]', '_', version)}.npz"


def _text(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, ensure_ascii=False).encode(), dtype=np.uint8)


def save(lex: Lexical, path: Path) -> None:
    """Write ``lex`` to ``path`` (under a temporary name, then renamed: a reader never sees half a file) and
    remove the older versions of the same collection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    state = lex.matrix.state()
    header = {"format": FORMAT, "version": lex.version, "size": lex.matrix.size}
    try:
        with open(partial, "wb") as fh:
            np.savez(fh, header=_text(header), data=state["data"], indices=state["indices"], indptr=state["indptr"],
                     idf=state["idf"], vocab=_text(state["vocab"]), ids=_text(lex.ids),
                     sources=_text(list(lex.sources)), paths=_text(list(lex.paths)), parents=_text(lex.parents))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    stem = path.name.rsplit(".", 2)[0]  # "<collection>.<kind>"
    for old in path.parent.glob(f"{stem}.*.npz"):
        if old != path and old.name.count(".") == path.name.count("."):
            old.unlink(missing_ok=True)


def load(path: Path, version: str, count: int) -> Lexical | None:
    """The saved ``Lexical`` if it is of ``version`` and holds ``count`` records; None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes())
            if header.get("format") != FORMAT or header.get("version") != version or header.get("size") != count:
                return None
            vocab = json.loads(z["vocab"].tobytes())
            matrix = BM25Matrix.from_state({"data": z["data"], "indices": z["indices"], "indptr": z["indptr"],
                                            "idf": z["idf"], "vocab": vocab, "size": header["size"]})
            rows = [json.loads(z[k].tobytes()) for k in ("ids", "sources", "paths", "parents")]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        _log.warning("BM25 cache %s can't be read (%s): building it again", path, exc)
        return None
    if not len(rows[0]) == len(rows[1]) == len(rows[2]) == count or (rows[3] and len(rows[3]) != count):
        return None
    return _lexical(version, matrix, *rows)


def read_or_build(coll, collection: str, version: str, passages: bool, folder: Path | None) -> Lexical:
    """The collection's BM25 side: from ``folder`` when a copy of this version is there, else read from Chroma
    (and saved there). ``folder`` None: no copy on disk."""
    path = cache_path(folder, collection, version, passages) if folder is not None else None
    if path is not None:
        found = load(path, version, coll.count())
        if found is not None:
            return found
    lex = read_collection(coll, version, passages)
    if path is not None:
        try:
            save(lex, path)
        except OSError as exc:  # a full or read-only disk costs the next process the build, nothing else
            _log.warning("BM25 cache %s not written: %s", path, exc)
    return lex
