"""The manifest: SQLite bookkeeping of sources, documents and collections.

Chroma holds the vectors; this holds what was indexed from where, so a sync
knows which commit to diff against. It is written only after the vector
writes succeed, so a crash in between is repaired by the next sync.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kb.errors import KBError

SCHEMA = """
CREATE TABLE IF NOT EXISTS sources(
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, url TEXT NOT NULL, web_url TEXT NOT NULL DEFAULT '',
    branch TEXT NOT NULL, repo_path TEXT NOT NULL, extensions TEXT NOT NULL,
    indexed_commit TEXT, indexed_collection TEXT, last_synced REAL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    source TEXT NOT NULL, path TEXT NOT NULL, commit_sha TEXT NOT NULL, sha256 TEXT NOT NULL,
    loader TEXT NOT NULL, size INTEGER NOT NULL, language TEXT NOT NULL, chunks INTEGER NOT NULL,
    status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', PRIMARY KEY(source, path));
CREATE TABLE IF NOT EXISTS collections(
    name TEXT PRIMARY KEY, chunk_config TEXT NOT NULL, embed_model TEXT NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class SourceRow:
    name: str
    kind: str  # git | files
    url: str  # redacted: credentials never stored here
    web_url: str
    branch: str
    repo_path: str
    extensions: tuple[str, ...]
    indexed_commit: str | None
    indexed_collection: str | None
    last_synced: float | None
    created: float

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["extensions"] = list(self.extensions)
        return d


@dataclass
class DocumentRow:
    source: str
    path: str
    commit: str
    sha256: str
    loader: str
    size: int
    language: str
    chunks: int
    status: str  # indexed | skipped
    reason: str = ""


class Manifest:
    """Thin typed access to the SQLite file; one connection per instance."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # every source's clone lives in this data folder's repos/ (add, upload and snapshot import put it there)
        self.repos_root = (path.parent / "repos").resolve()
        self._local = threading.local()
        self.db.executescript(SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        """One connection per thread: the dashboard serves sessions from several threads."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    # sources
    def add_source(self, row: SourceRow) -> None:
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO sources VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (row.name, row.kind, row.url, row.web_url, row.branch, f"repos/{row.name}",
                     json.dumps(list(row.extensions)), row.indexed_commit, row.indexed_collection,
                     row.last_synced, row.created),
                )
        except sqlite3.IntegrityError:
            raise KBError(f"source {row.name!r} already exists") from None

    def _source(self, r: sqlite3.Row) -> SourceRow:
        """A source's row, its clone in this data folder's ``repos/``, whatever path the row holds.

        Rows written before the forty-seventh stop hold the clone's absolute path: a data folder copied or moved
        elsewhere (a backup restored, a second instance) read and wrote the first folder's clones, so ``kb remove``
        in the copy deleted the original's clone and an upload to the copy was committed into the original's.
        """
        d = dict(r)
        d["repo_path"] = str(self.repos_root / d["name"])
        d["extensions"] = tuple(json.loads(d["extensions"]))
        return SourceRow(**d)

    def sources(self) -> list[SourceRow]:
        return [self._source(r) for r in self.db.execute("SELECT * FROM sources ORDER BY name")]

    def source(self, name: str) -> SourceRow:
        r = self.db.execute("SELECT * FROM sources WHERE name=?", (name,)).fetchone()
        if r is None:
            known = ", ".join(s.name for s in self.sources()) or "none yet"
            raise KBError(f"no source named {name!r} (known: {known})")
        return self._source(r)

    def has_source(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sources WHERE name=?", (name,)).fetchone() is not None

    def delete_source(self, con: sqlite3.Connection, name: str) -> None:
        con.execute("DELETE FROM documents WHERE source=?", (name,))
        con.execute("DELETE FROM sources WHERE name=?", (name,))

    def mark_indexed(self, con: sqlite3.Connection, name: str, commit: str, collection: str) -> None:
        con.execute(
            "UPDATE sources SET indexed_commit=?, indexed_collection=?, last_synced=? WHERE name=?",
            (commit, collection, time.time(), name),
        )

    # documents
    def documents(self, source: str | None = None) -> list[DocumentRow]:
        sql, args = "SELECT * FROM documents", ()
        if source:
            sql, args = sql + " WHERE source=?", (source,)
        rows = self.db.execute(sql + " ORDER BY source, path", args)
        return [self._doc(r) for r in rows]

    @staticmethod
    def _doc(r: sqlite3.Row) -> DocumentRow:
        d = dict(r)
        d["commit"] = d.pop("commit_sha")
        return DocumentRow(**d)

    def document(self, source: str, path: str) -> DocumentRow | None:
        r = self.db.execute("SELECT * FROM documents WHERE source=? AND path=?", (source, path)).fetchone()
        return self._doc(r) if r else None

    def put_document(self, con: sqlite3.Connection, d: DocumentRow) -> None:
        con.execute(
            "INSERT OR REPLACE INTO documents VALUES (?,?,?,?,?,?,?,?,?,?)",
            (d.source, d.path, d.commit, d.sha256, d.loader, d.size, d.language, d.chunks, d.status, d.reason),
        )

    def delete_document(self, con: sqlite3.Connection, source: str, path: str) -> None:
        con.execute("DELETE FROM documents WHERE source=? AND path=?", (source, path))

    def counts(self) -> dict[str, int]:
        q = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM sources), "
            "(SELECT COUNT(*) FROM documents WHERE status='indexed'), "
            "(SELECT COUNT(*) FROM documents WHERE status='skipped')"
        ).fetchone()
        return {"sources": q[0], "documents": q[1], "skipped": q[2]}

    # collections and the live pointer
    def put_collection(self, name: str, chunk_config: str, embed_model: str, status: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO collections VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET status=excluded.status",
                (name, chunk_config, embed_model, status, time.time()),
            )

    def collection_rows(self) -> dict[str, dict]:
        return {r["name"]: dict(r) for r in self.db.execute("SELECT * FROM collections")}

    def forget_collection(self, name: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM collections WHERE name=?", (name,))

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else None

    def set_meta(self, con: sqlite3.Connection, key: str, value: str) -> None:
        con.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def collection_version(self, name: str) -> str:
        """Changes whenever a collection's chunks change, so caches (BM25) know to reload."""
        return self.get_meta(f"version:{name}") or "0"

    def touch_collection(self, name: str) -> None:
        with self.db:
            self.set_meta(self.db, f"version:{name}", str(time.time_ns()))

    @property
    def live_collection(self) -> str | None:
        return self.get_meta("live_collection")


class WriteLockBusy(KBError):
    """Another process or job holds the data folder's write lock: nothing was done, and trying again later works."""


def lock_free(home: Path) -> bool:
    """Whether no process holds the write lock now (a look, not a hold: the answer may change at once).

    A collection still marked "building" while nobody holds the lock was left by a re-chunk whose process died
    (a browser review killed one: the page offered to make its 428 of several thousand chunks live).
    """
    try:
        with open(home / ".write.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except BlockingIOError:
        return False
    except OSError:
        return True  # no lock file, or an unreadable one: nobody holds it through this folder
    return True


@contextlib.contextmanager
def write_lock(home: Path, writes: bool = True) -> Iterator[None]:
    """One writer at a time per KB_HOME (the CLI and the dashboard may race).

    Every hold that ``writes`` to the store is numbered, when it starts and when it ends (``write_number``): a
    process that keeps the embedded store open learns from the numbers that another process wrote to it, and opens
    it again (``written_elsewhere``). A hold that only reads (a dry run, an export, a fetch) changes no file.
    """
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".write.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriteLockBusy(f"another writer (a sync, upload, re-chunk, import or repair) is running on {home}; "
                                "try again when it ends") from None
        try:
            if writes:
                _number_write(home)  # as well as at the end: a writer killed half-way leaves its start numbered
            yield
        finally:
            if writes:
                _number_write(home)
            fcntl.flock(fh, fcntl.LOCK_UN)


WRITES = ".writes"  # in KB_HOME: the number of the last start or end of a hold of the write lock
_own_writes: dict[str, set[int]] = {}  # per data folder, the numbers this process wrote
_own_lock = threading.Lock()


def write_number(home: Path) -> int:
    """How many times a writer has started or ended on ``home`` (0 for a folder from before the numbers)."""
    try:
        return int((home / WRITES).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _number_write(home: Path) -> None:
    """The next number, written whole (a reader never sees half of it), and remembered as this process's own."""
    number = write_number(home) + 1
    tmp = home / f"{WRITES}.tmp"
    try:
        tmp.write_text(f"{number}\n")
        os.replace(tmp, home / WRITES)
    except OSError:  # a full disk: the write itself will say so; the readers reopen at the next number
        return
    with _own_lock:
        _own_writes.setdefault(str(home.resolve()), set()).add(number)


def written_elsewhere(home: Path, seen: int) -> tuple[bool, int]:
    """Whether another process held the write lock on ``home`` since number ``seen``, and the number now.

    A process's own writes go through its own client, which sees them; only another process's are unknown to it.
    """
    now = write_number(home)
    if now == seen:
        return False, now
    if now < seen:  # the folder was replaced under this process
        return True, now
    with _own_lock:
        own = _own_writes.get(str(home.resolve()), set())
        foreign = any(n not in own for n in range(seen + 1, now + 1))
        own.difference_update([n for n in own if n <= seen])  # no reader of this process asks about these again
    return foreign, now
