"""The knowledge-base service: the one entry point for the CLI, tests and pages.

It wires settings to the manifest, the Chroma index and the embedding model
(loaded lazily, and injectable so tests can count embedding calls), and
exposes the operations a person performs (add, sync, upload, re-chunk) and
the read models the pages show (:meth:`KnowledgeBase.source_overview`,
:meth:`~KnowledgeBase.health`, :meth:`~KnowledgeBase.records`, ...), as plain
data: no page touches the manifest, the Chroma client or raw records.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import git
import httpx
from langchain_core.embeddings import Embeddings

from core import embeddings as emb
from core.settings import Settings, load_settings, redact
from kb import log as runlog
from kb import schedule
from kb import verify as consistency
from kb.errors import KBError
from kb.ingest import sources
from kb.ingest.chunking import ChunkConfig
from kb.ingest.loaders import LoadedDocument, SkipFile, decode, git_lines, load_document
from kb.ingest.sync import SyncContext, SyncReport, read_blob, sync_source
from kb.progress import Progress, no_progress
from kb.store.index import (
    ChromaUnreachable, VectorIndex, collection_name, once_more_if_reopened, passage_collection, reachable,
)
from kb.store import server_owner
from kb.store.manifest import DocumentRow, Manifest, SourceRow, WriteLockBusy, lock_free, write_lock

_log = logging.getLogger(__name__)


HEX_RE = re.compile(r"[0-9a-f]{7,40}")  # a commit id as a link carries it
F = TypeVar("F", bound=Callable)


def reaching_chroma(method: F) -> F:
    """Run a method that touches the vector store so that a Chroma server outage is one clear error."""

    @functools.wraps(method)
    def wrapper(self: "KnowledgeBase", *args, **kwargs):
        with reachable(self.settings):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def reading_chroma(method: F) -> F:
    """``reaching_chroma`` for a method that only reads: run once more when another thread reopened the store under
    it (another process wrote), so a page's read doesn't fail once and work on reload."""

    @functools.wraps(method)
    def wrapper(self: "KnowledgeBase", *args, **kwargs):
        with reachable(self.settings):
            return once_more_if_reopened(lambda: self.index, lambda: method(self, *args, **kwargs))

    return wrapper  # type: ignore[return-value]


def config_label(raw: str) -> str:
    """A stored chunk config as a person reads it; an unknown or older format as stored."""
    try:
        return ChunkConfig.from_json(raw).label()
    except (ValueError, TypeError, KBError):  # not JSON, unknown fields, or values out of range
        return raw or "?"


def open_home(settings: Settings) -> Manifest:
    """The data folder's manifest, the folder made if missing; a ``KB_HOME`` that is a file, or can't be written,
    is one error naming it (it was a traceback from ``mkdir`` or SQLite)."""
    home = settings.home
    if home.exists() and not home.is_dir():
        raise KBError(f"KB_HOME {home} is a file, not a folder: point KB_HOME at a folder (it is made if missing)")
    try:
        home.mkdir(parents=True, exist_ok=True)
        return Manifest(settings.manifest_path)
    except (OSError, sqlite3.Error) as exc:
        raise KBError(f"cannot use the data folder KB_HOME {home}: {exc}") from exc


class KnowledgeBase:
    def __init__(self, settings: Settings | None = None, embeddings: Embeddings | None = None) -> None:
        self.settings = settings or load_settings()
        self.manifest = open_home(self.settings)
        self._index: VectorIndex | None = None
        self._embeddings = embeddings
        self.embed_model = emb.model_name(self.settings)
        self._loading = threading.Lock()  # every page shares one KnowledgeBase: its resources are made once
        self._index_lock = threading.Lock()  # apart: a search needn't wait for the embedding model to load

    # shared resources, loaded on first use
    @property
    def index(self) -> VectorIndex:
        """The vector store, opened again when another process (``kb sync``, ``kb watch``) wrote to it since."""
        with self._index_lock:
            if self._index is None:
                index = VectorIndex(self.settings)
                if self.settings.chroma_url:  # one data folder per server (kb/store/server_owner.py)
                    with reachable(self.settings):
                        server_owner.claim(index.client, self.manifest, self.settings.home,
                                          redact(self.settings.chroma_url))
                self._index = index
            elif self._index.stale():
                _log.info("another process wrote to %s: reopening the vector store", self.settings.chroma_path)
                self._index.reopen()
        return self._index

    @property
    def embeddings(self) -> Embeddings:
        if self._embeddings is None:
            with self._loading:
                if self._embeddings is None:
                    self._embeddings = emb.load_embeddings(self.settings)
        return self._embeddings

    def _context(self) -> SyncContext:
        return SyncContext(self.settings, self.manifest, self.index, lambda: self.embeddings, self.embed_model)

    # the live collection
    def default_config(self) -> ChunkConfig:
        s = self.settings
        return ChunkConfig(splitter=s.splitter, size=s.chunk_size, overlap=s.chunk_overlap, unit=s.length_unit,
                           heading_prefix=s.heading_prefix, passage_size=s.passage_size)

    def where(self, source: str | None = None, path_prefix: str | None = None, path: str | None = None) -> dict | None:
        """A Chroma metadata filter: one source, one path, or every indexed path under a prefix."""
        clauses: list[dict] = []
        if source:
            clauses.append({"source": source})
        if path_prefix:
            known = sorted({d.path for d in self.manifest.documents(source) if d.path.startswith(path_prefix)})
            clauses.append({"path": {"$in": known or ["\0"]}})  # no such path: match nothing
        if path:
            clauses.append({"path": path})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def _live_row(self) -> tuple[str | None, dict | None]:
        name = self.manifest.live_collection
        return name, (self.manifest.collection_rows().get(name) if name else None)

    def live_config(self) -> ChunkConfig:
        """The live collection's chunking, whichever model embedded it: a rebuild starts from it."""
        _, row = self._live_row()
        return ChunkConfig.from_json(row["chunk_config"]) if row else self.default_config()

    def live(self) -> tuple[str, ChunkConfig]:
        """The live collection's name and config; a new KB starts from the settings' defaults.

        Only reads: the pointer is written by the first sync (``_ensure_live``,
        under the write lock), so opening a page or a dry run writes nothing.
        """
        name, row = self._live_row()
        if row:
            if row["embed_model"] != self.embed_model:
                raise KBError(
                    f"the live collection {name} was embedded with {row['embed_model']}, but the configured "
                    f"model is {self.embed_model}: rebuild with it (`kb rechunk --chunk-size {self.settings.chunk_size} "
                    f"--chunk-overlap {self.settings.chunk_overlap}`; the old collection stays until you drop it), "
                    "or set KB_EMBED_MODEL / KB_EMBED_BACKEND back"
                )
            return name, ChunkConfig.from_json(row["chunk_config"])
        config = self.default_config()
        return collection_name(config.hash, emb.model_slug(self.settings)), config

    def _ensure_live(self) -> tuple[str, ChunkConfig]:
        """The live collection, its row and pointer written if this is the first sync (hold the write lock)."""
        name, config = self.live()
        if self.manifest.live_collection != name:
            self.manifest.put_collection(name, config.to_json(), self.embed_model, "ready")
            with self.manifest.transaction() as con:
                self.manifest.set_meta(con, "live_collection", name)
        return name, config

    # sources
    @runlog.job("add", lambda row: {"source": row.name, "source_kind": row.kind, "url": row.url,
                                    "branch": row.branch})
    def add_source(
        self, name: str, url: str, branch: str | None = None, web_url: str | None = None,
        extensions: tuple[str, ...] | None = None, progress: Progress = no_progress,
    ) -> SourceRow:
        """Validate, clone into KB_HOME/repos/NAME and register; nothing is left behind on failure."""
        sources.validate_name(name)
        extensions = sources.validate_extensions(tuple(extensions)) if extensions else None
        spec = sources.SourceSpec(name, sources.validate_url(url), sources.validate_branch(branch))
        web_url = sources.validate_web_url(web_url)
        if self.manifest.has_source(name):
            raise KBError(f"source {name!r} already exists")
        dest = self.settings.repos_path / name
        self._refuse_twin(spec.display_url, spec.branch or self._twin_candidate_branch(spec))  # before cloning
        with write_lock(self.settings.home):
            followed = sources.clone(spec, dest, progress)
            try:
                self._refuse_twin(spec.display_url, followed)
            except KBError:
                shutil.rmtree(dest, ignore_errors=True)
                raise
            row = SourceRow(
                name=name, kind="git", url=spec.display_url,
                web_url=web_url if web_url is not None else sources.web_url_for(spec.url),
                branch=followed, repo_path=str(dest.resolve()),
                extensions=tuple(extensions or self.settings.extensions),
                indexed_commit=None, indexed_collection=None, last_synced=None, created=time.time(),
            )
            self._register(row)
        return row

    def _twin_candidate_branch(self, spec: sources.SourceSpec) -> str | None:
        """The remote's default branch, asked only when a source already follows the same remote: a twin is then
        refused before a clone of minutes (a browser review), and no other add pays the extra round trip."""
        if not any(s.kind == "git" and s.url == spec.display_url for s in self.manifest.sources()):
            return None
        return sources.remote_head_branch(spec.url)

    def _refuse_twin(self, url: str, branch: str | None) -> None:
        """A second source following the same branch of the same remote returns every hit twice (a browser review
        added lagent's bundle again under another name: the first five hits were pairs); another branch is fine."""
        twin = next((s for s in self.manifest.sources()
                     if s.kind == "git" and s.url == url and branch is not None and s.branch == branch), None)
        if twin is not None:
            raise KBError(f"{url} (branch {branch}) is already the source {twin.name!r}: a second copy would return "
                          f"every hit twice; sync {twin.name} instead, or name another branch to follow")

    def _register(self, row: SourceRow) -> SourceRow:
        """Write a new source's manifest row; if that fails, its new folder goes too (nothing half-made stays)."""
        try:
            self.manifest.add_source(row)
        except BaseException:
            shutil.rmtree(row.repo_path, ignore_errors=True)
            raise
        return row

    def add_defaults(self, progress: Progress = no_progress) -> list[dict]:
        """Register the tutorial's six gitee repositories; one failing doesn't stop the others."""
        results = []
        for name, url in sources.DEFAULT_SOURCES.items():
            if self.manifest.has_source(name):
                results.append({"name": name, "url": url, "ok": True, "message": "already registered"})
                continue
            try:
                self.add_source(name, url, progress=progress)
                results.append({"name": name, "url": url, "ok": True, "message": "cloned"})
            except KBError as exc:
                results.append({"name": name, "url": url, "ok": False, "message": str(exc)})
        return results

    @reaching_chroma
    def remove_source(self, name: str) -> int:
        """Delete a source, its chunks in every collection, and its clone."""
        src = self.manifest.source(name)
        removed = 0
        with write_lock(self.settings.home):
            for cname in self.index.names():
                coll = self.index.get(cname)
                ids = coll.get(where={"source": name}, include=[])["ids"]
                self.index.delete_ids(coll, ids)
                passages = self.index.passages(cname)
                if passages is not None:
                    self.index.delete_where(passages, "source", [name])
                self.manifest.touch_collection(cname)
                removed += len(ids)
            with self.manifest.transaction() as con:
                self.manifest.delete_source(con, name)
            shutil.rmtree(src.repo_path, ignore_errors=True)
        runlog.log_job(self.settings, "remove", {"source": name, "chunks_removed": removed})
        return removed

    def sources(self) -> list[SourceRow]:
        return self.manifest.sources()

    # sync and uploads
    @runlog.job("sync", lambda reports: {"sources": [r.as_dict() for r in reports]},
                when=lambda a: not a["dry_run"])  # a dry run writes nothing, not even a log line
    @reaching_chroma
    def sync(self, names: list[str] | None = None, dry_run: bool = False, progress: Progress = no_progress) -> list[SyncReport]:
        # a name given twice is synced once (`kb sync lagent lagent` synced and reported it twice)
        rows = [self.manifest.source(n) for n in dict.fromkeys(names)] if names else self.manifest.sources()
        if not rows:
            raise KBError("no sources yet: add one with `kb add NAME URL_OR_PATH`")
        with write_lock(self.settings.home, writes=not dry_run):
            return self._sync_locked(rows, dry_run, progress)

    def _sync_locked(self, rows: list[SourceRow], dry_run: bool = False, progress: Progress = no_progress,
                     full: bool = False) -> list[SyncReport]:
        """Sync ``rows`` into the live collection; the caller holds the write lock."""
        self.index.ping()
        collection, config = self.live() if dry_run else self._ensure_live()
        reports = []
        for src in rows:
            try:
                reports.append(sync_source(self._context(), src, collection, config, dry_run=dry_run, full=full,
                                           progress=progress))
            except ChromaUnreachable:
                raise  # every source would fail alike: one error, not one per source
            except KBError as exc:
                reports.append(SyncReport(src.name, src.indexed_commit, None, dry_run=dry_run, error=str(exc)))
            except Exception as exc:  # a bug or an unforeseen store error: this source's, the others still sync
                if getattr(exc, "cancelled", False):  # kb.jobs.Cancelled ends the whole job
                    raise
                if self.settings.chroma_url and isinstance(exc, httpx.TransportError):
                    raise  # the server went away mid-sync: `reachable` names it, and no other source is tried
                reports.append(SyncReport(src.name, src.indexed_commit, None, dry_run=dry_run,
                                          error=runlog.unexpected(self.settings, exc, f"sync of {src.name}")))
        return reports

    @runlog.job("upload", lambda report: {"sources": [report.as_dict()]})
    @reaching_chroma
    def upload(self, files: dict[str, bytes], source: str, progress: Progress = no_progress) -> SyncReport:
        """Add files to a files-only source (created on first use) and index them."""
        sources.validate_name(source)
        s = self.settings
        checked: dict[str, bytes] = {}
        for raw, data in files.items():
            name = sources.safe_upload_name(raw, s.upload_extensions)
            sources.check_upload_size(name, len(data), s.upload_max_bytes)
            checked[name] = data
        if not checked:
            raise KBError("no files given")
        with write_lock(s.home):  # all of it: a failure leaves no folder or row behind
            self.index.ping()  # a store that is down fails the upload before anything is written
            if self.manifest.has_source(source):
                src = self.manifest.source(source)
                if src.kind != "files":
                    raise KBError(f"source {source!r} is a git repository; uploads go to a files-only source")
                sources.commit_uploads(source, Path(src.repo_path), checked)
            else:
                src = self._new_upload_source(source)
                try:
                    sources.commit_uploads(source, Path(src.repo_path), checked)
                except BaseException:  # the first upload failed: the new source goes with it
                    with self.manifest.transaction() as con:
                        self.manifest.delete_source(con, source)
                    shutil.rmtree(src.repo_path, ignore_errors=True)
                    raise
            report = self._sync_locked([self.manifest.source(source)], progress=progress)[0]
            self._still_skipped(report, source, checked)
            return report

    def _still_skipped(self, report: SyncReport, source: str, files: dict[str, bytes]) -> None:
        """A file sent again unchanged that was skipped before is still not indexed: listed among the skipped, with
        its reason (it was counted "unchanged", as if indexed: an operator review)."""
        listed = {x["path"] for x in report.skipped}
        for name in files:
            path = f"{sources.UPLOADS_DIR}/{name}"
            doc = self.manifest.document(source, path)
            if path not in listed and doc is not None and doc.status == "skipped":
                report.skipped.append({"path": path, "reason": f"{doc.reason} (unchanged since it was skipped)"})

    def _new_upload_source(self, source: str) -> SourceRow:
        """A files-only source: its repository and manifest row, or neither (the caller holds the lock)."""
        dest = self.settings.repos_path / source
        if dest.exists():
            raise KBError(f"folder {dest} already exists; remove it first")
        branch = sources.init_files_repo(dest)
        return self._register(SourceRow(source, "files", "(uploads)", "", branch, str(dest.resolve()),
                                        tuple(self.settings.upload_extensions), None, None, None, time.time()))

    # scheduled sync (kb/jobs.py: KB_SYNC_EVERY, kb watch)
    def fetch_source(self, name: str, progress: Progress = no_progress) -> str:
        """Fetch a git source's remote into its clone, indexing nothing; returns the branch's new head commit.

        A remote that cannot be reached raises a KBError and leaves the clone and the index as they were.
        """
        src = self.manifest.source(name)
        if src.kind != "git":
            raise KBError(f"source {name!r} is not a git repository: there is nothing to fetch")
        with write_lock(self.settings.home, writes=False):  # a sync may be fetching into the same clone
            return sources.fetch(Path(src.repo_path), src.branch, src.url, progress)

    def schedule_status(self) -> dict:
        """``every`` (KB_SYNC_EVERY in seconds, 0: off), ``last_run``, ``origin``, ``next_run`` (epoch seconds)."""
        return schedule.schedule_status(self.settings.home, self.settings.sync_every)

    def sync_failures(self) -> list[dict]:
        """Sources whose scheduled fetch or sync is failing now: ``source, failures, last_error, last_failure,
        next_try, last_ok`` (times in epoch seconds); empty when every remote answered at its last try."""
        return schedule.sync_failures(self.settings.home, [s.name for s in self.manifest.sources()])

    # collections
    @reading_chroma
    def collections(self) -> list[dict]:
        live = self.manifest.live_collection
        rows = self.manifest.collection_rows()
        out = []
        for name in self.index.names():
            info = self.index.describe(name)
            info["live"] = name == live
            info["status"] = rows.get(name, {}).get("status", "unknown")
            if info["status"] == "building" and lock_free(self.settings.home):
                info["status"] = "interrupted"  # its re-chunk died: incomplete, never to be made live
            if info["vectors_lost"]:
                info["status"] = "vectors lost: kb verify --repair"
            info["chunk_config_label"] = config_label(info["chunk_config"])
            out.append(info)
        return out

    @reaching_chroma
    def drop_collection(self, name: str) -> None:
        if name == self.manifest.live_collection:
            raise KBError(f"{name} is the live collection; make another one live first")
        if not self.index.exists(name):
            raise KBError(f"no collection named {name!r}")
        with write_lock(self.settings.home):
            self.index.drop(name)
            self.manifest.forget_collection(name)

    @reaching_chroma
    def set_live(self, name: str) -> None:
        """Point the knowledge base at another complete collection."""
        row = self.manifest.collection_rows().get(name)
        if not self.index.exists(name) or not row:
            raise KBError(f"no collection named {name!r}")
        if row["status"] != "ready":
            raise KBError(f"{name} is not complete (status {row['status']}); rebuild it with `kb rechunk`")
        if row["embed_model"] != self.embed_model:
            raise KBError(f"{name} was embedded with {row['embed_model']}, not the configured {self.embed_model}")
        with write_lock(self.settings.home), self.manifest.transaction() as con:
            self.manifest.set_meta(con, "live_collection", name)

    def rechunk_config(self, *, splitter: str | None = None, size: int | None = None, overlap: int | None = None,
                       unit: str | None = None, heading_prefix: bool | None = None,
                       passage_size: int | None = None) -> ChunkConfig:
        """The one rule for a re-chunk's config, shared by the CLI and the Documents page.

        What is not given comes from the live collection; the passage size
        defaults to ``KB_PASSAGE_SIZE``, clamped to the chunk size (a
        passage can't be longer than its chunk: ``--chunk-size 100`` works).
        """
        live = self.live_config()
        size = live.size if size is None else int(size)
        if passage_size is None:
            passage_size = min(self.settings.passage_size, size)
        return ChunkConfig(
            splitter=splitter or live.splitter, size=size,
            overlap=live.overlap if overlap is None else int(overlap), unit=unit or live.unit,
            heading_prefix=live.heading_prefix if heading_prefix is None else heading_prefix,
            passage_size=int(passage_size),
        )

    def is_live(self, config: ChunkConfig) -> bool:
        """Whether re-chunking with ``config`` would build the live collection again: nothing to do."""
        # by name: the live collection may be another model's, which is what a rebuild fixes
        return collection_name(config.hash, emb.model_slug(self.settings)) == self.manifest.live_collection

    @runlog.job("rechunk", dict)
    @reaching_chroma
    def rechunk(self, config: ChunkConfig, progress: Progress = no_progress) -> dict:
        """Build a collection with ``config`` beside the live one; switch only when complete."""
        name = collection_name(config.hash, emb.model_slug(self.settings))
        if self.is_live(config):
            raise KBError(f"{name} with these settings is already the live collection")
        live = self.manifest.live_collection  # by name: it may be another model's, which is what a rebuild fixes
        t0 = time.perf_counter()
        with write_lock(self.settings.home):
            if self.index.exists(name):
                self.index.drop(name)  # a leftover, maybe half-built: start clean
            self.manifest.put_collection(name, config.to_json(), self.embed_model, "building")
            reports = self._build_at_indexed(name, config, "rechunk", progress)
        return {
            "collection": name, "previous": live, "chunk_config": config.label(),
            "chunks": sum(r.chunks_embedded + r.chunks_reused for r in reports),
            "chunks_embedded": sum(r.chunks_embedded for r in reports),
            "chunks_overlong": sum(len(r.chunks_overlong) for r in reports),
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def _build_at_indexed(self, name: str, config: ChunkConfig, stage: str, progress: Progress) -> list[SyncReport]:
        """Build collection ``name`` from every source at its indexed commit, fetching nothing, and make it live
        (the caller holds the write lock and has dropped any collection of that name)."""
        self.index.create(name, config.to_json(), self.embed_model)
        reports = []
        for src in self.manifest.sources():
            if src.indexed_commit:
                progress(stage, len(reports), None, src.name)
                reports.append(sync_source(self._context(), src, name, config, rebuild_at=src.indexed_commit,
                                           progress=progress))
        self.manifest.put_collection(name, config.to_json(), self.embed_model, "ready")
        with self.manifest.transaction() as con:
            for rep in reports:
                for row in rep.documents:
                    self.manifest.put_document(con, row)
                self.manifest.mark_indexed(con, rep.name, rep.commit_after, name)
            self.manifest.set_meta(con, "live_collection", name)
        return reports

    def _rebuild_lost_index(self, problems: list, live: str, config: ChunkConfig, progress: Progress) -> list:
        """A live collection whose vector graph is lost, built anew at the indexed commits (its vectors can't be read
        back). Nothing is fetched, and nothing is dropped while a clone lacks its indexed commit: a repair that
        fetched first lost every chunk of a source whose remote was away (a review)."""
        lacking = sorted({p.source for p in problems if p.kind == "missing_commit"})
        if lacking:
            raise KBError(f"the live collection's vector index is lost, and the clone of {', '.join(lacking)} lacks its "
                          f"indexed commit: sync {'them' if len(lacking) > 1 else 'it'} first (kb sync "
                          f"{' '.join(lacking)}), then repair again; nothing was changed")
        self.index.drop(live)
        return self._build_at_indexed(live, config, "rebuild", progress)

    # read models for the pages and the CLI
    @runlog.job("verify", dict, when=lambda a: a["repair"])  # a check alone is not logged: Home runs one per view
    @reaching_chroma
    def verify(self, repair: bool = False, progress: Progress = no_progress) -> dict:
        """Check the manifest against the vector store and the clones; ``repair`` re-indexes only what is wrong.

        Records of another chunk config or model and of unknown sources are
        deleted; every source with a problem gets a full, checked rebuild
        (``sync_source(full=True)``), which embeds only what is missing.
        """
        from kb import snapshot

        live, config = self.live()
        problems = consistency.check(self.manifest, self.index, live, config, self.embed_model)
        leftovers = self._import_leftovers()
        if not repair or not (problems or leftovers):
            return {**consistency.report(problems), "not_indexed": self.not_indexed(), "import_leftovers": leftovers}
        with write_lock(self.settings.home):
            snapshot.recover(self)
            # leftovers alone touch nothing else: a sync of no source still writes the live pointer, and an empty
            # knowledge base would refuse the import that its user was about to retry
            reports = self._repair(problems, live, config, progress) if problems else []
        out = consistency.report(consistency.check(self.manifest, self.index, live, config, self.embed_model),
                                 repaired=True)
        out["reports"] = [r.as_dict() for r in reports]
        out["not_indexed"] = self.not_indexed()
        out["import_leftovers"] = self._import_leftovers()
        return out

    def _repair(self, problems: list, live: str, config: ChunkConfig, progress: Progress) -> list[SyncReport]:
        """Stray records deleted, each affected source rebuilt in full; the caller holds the write lock."""
        reports = []
        if any(p.kind == "lost_vector_index" for p in problems):
            reports = self._rebuild_lost_index(problems, live, config, progress)
            problems = consistency.check(self.manifest, self.index, live, config, self.embed_model)
        self._delete_strays(problems, live, config)
        names = sorted({p.source for p in problems
                        if p.kind in consistency.REBUILD and self.manifest.has_source(p.source)})
        return reports + self._sync_locked([self.manifest.source(n) for n in names], progress=progress, full=True)

    def _import_leftovers(self) -> list[str]:
        """A killed import's leftovers (:func:`kb.snapshot.import_leftovers`); none while a writer runs, which may
        be an import holding the very same things."""
        from kb import snapshot

        try:
            with write_lock(self.settings.home, writes=False):
                return snapshot.import_leftovers(self)
        except (WriteLockBusy, OSError):  # OSError: a data folder this process may read but not lock (read-only)
            return []

    def not_indexed(self) -> list[dict]:
        """Sources whose clone holds commits not yet indexed (``{"source", "head"}``): not an inconsistency, but
        files committed and unsearchable until a sync (a killed upload, a fetch whose sync never ran), which
        ``kb verify`` said nothing about (an operator review)."""
        out = []
        for src in self.manifest.sources():
            head = self._unindexed_head(src)  # a source never synced, too: its files are committed, not indexed
            if head:
                out.append({"source": src.name, "head": head})
        return out

    def _delete_strays(self, problems: list, live: str, config: ChunkConfig) -> None:
        """Records no rebuild would touch: another config's or model's, and those of unknown sources."""
        coll = self.index.find(live)
        if coll is None:
            return
        pcoll = self.index.find(passage_collection(live))
        unknown = sorted({p.source for p in problems if p.kind == "unknown_source"})
        if unknown:
            self.index.delete_where(coll, "source", unknown)
            if pcoll is not None:
                self.index.delete_where(pcoll, "source", unknown)
        for src in sorted({p.source for p in problems if p.kind == "foreign_records"}):
            got = coll.get(where={"source": src}, include=["metadatas"])
            foreign = [i for i, m in zip(got["ids"], got["metadatas"])
                       if m.get("chunk_config") != config.hash or m.get("embed_model") != self.embed_model]
            self.index.delete_ids(coll, foreign)
            if pcoll is not None:
                self.index.delete_where(pcoll, "parent", foreign)
        self.manifest.touch_collection(live)

    @reaching_chroma
    def check_store(self) -> None:
        """Fail now, with the server's name, if the vector store does not answer: pages call it first, so an
        outage is an error on every page rather than an empty list on some."""
        self.index.ping()

    def source(self, name: str) -> SourceRow:
        return self.manifest.source(name)

    def documents(self, source: str | None = None, status: str | None = None, path_contains: str = "") -> list[DocumentRow]:
        """Documents of one source (or all), optionally only ``indexed``/``skipped`` ones, or paths containing a text."""
        docs = self.manifest.documents(source)
        if status:
            docs = [d for d in docs if d.status == status]
        needle = path_contains.strip().lower()
        return [d for d in docs if needle in d.path.lower()] if needle else docs

    def document(self, source: str, path: str) -> DocumentRow | None:
        """One document's row (a deep link's), without listing its source's thousands."""
        return self.manifest.document(source, path)

    def source_overview(self) -> list[dict]:
        """One row per source: where it is, what is indexed of it, and whether it is in the live collection."""
        live = self.manifest.live_collection
        per: dict[str, dict[str, int]] = {}
        for d in self.manifest.documents():
            n = per.setdefault(d.source, {"documents": 0, "skipped": 0, "chunks": 0})
            n["documents" if d.status == "indexed" else "skipped"] += 1
            n["chunks"] += d.chunks
        return [
            {**r.as_dict(), **per.get(r.name, {"documents": 0, "skipped": 0, "chunks": 0}),
             "in_live_collection": bool(r.indexed_commit) and r.indexed_collection == live}
            for r in self.manifest.sources()
        ]

    def health(self) -> list[dict]:
        """What is stale: sources never synced or indexed elsewhere, and collections that are not live.

        Each problem: ``kind``, ``subject`` (a source or collection name) and
        a ``message`` for a person; an empty list means nothing is stale.
        """
        live_name, live_cfg = self.live()
        problems = []
        for r in self.manifest.sources():
            if not r.indexed_commit:
                problems.append({"kind": "never_synced", "subject": r.name,
                                 "message": f"Source {r.name} has never been synced: it has no chunks yet."})
            elif r.indexed_collection != live_name:
                problems.append({"kind": "other_collection", "subject": r.name,
                                 "message": f"Source {r.name} was indexed into {r.indexed_collection}, not the live "
                                            "collection: its chunks were built with another chunk config or model."})
            elif (head := self._unindexed_head(r)) is not None:
                what = "uploaded files" if r.kind == "files" else "fetched commits"
                problems.append({"kind": "not_indexed", "subject": r.name,
                                 "message": f"Source {r.name} has {what} not yet indexed: its branch is at {head[:8]}, "
                                            f"its chunks at {r.indexed_commit[:8]}. A sync indexes them."})
        for name, c in sorted(self.manifest.collection_rows().items()):
            if name == live_name:
                continue
            cfg = config_label(c["chunk_config"])
            diff = []
            if cfg != live_cfg.label():
                diff.append(f"chunking {cfg} (live: {live_cfg.label()})")
            if c["embed_model"] != self.embed_model:
                diff.append(f"model {c['embed_model']} (live: {self.embed_model})")
            problems.append({"kind": "not_live", "subject": name,
                             "message": f"Collection {name} is not live ({c['status']}): "
                                        + ("; ".join(diff) or "same settings as the live one") + "."})
        return problems

    @staticmethod
    def _unindexed_head(src: SourceRow) -> str | None:
        """The clone's branch head where it is ahead of the indexed commit (None: level, or no clone to read).

        An upload killed between its commit and its index left the files committed and unsearchable while every
        check said healthy (a browser review, ``kill -9`` mid-upload); a fetch killed before its sync, the same.
        """
        try:
            head = sources.head_commit(Path(src.repo_path), src.branch)
        except (KBError, git.GitError, OSError, ValueError):
            return None
        return head if head != src.indexed_commit else None

    def model_window(self) -> int | None:
        """The embedding model's token window (None: it has none, nothing is cut)."""
        return emb.max_tokens(self.settings)

    @reading_chroma
    def records(self, collection: str, source: str | None = None, path: str = "", page: int = 1,
                size: int = 50) -> dict:
        """One page of a collection's records, filtered by source and by a path (exact, or a prefix ending in /);
        ``nothing_under`` names a prefix no indexed document's path starts with."""
        coll = self.index.get(collection)
        path = path.strip()
        prefix = path.endswith("/")
        if prefix and not any(d.path.startswith(path) for d in self.manifest.documents(source)):
            # said as such: the filter that matches nothing (``where``) is an implementation detail
            return {"total": 0, "pages": 1, "page": 1, "where": None, "rows": [], "nothing_under": path}
        where = self.where(source, path_prefix=path if prefix else None, path=path if path and not prefix else None)
        total = len(coll.get(where=where, include=[])["ids"]) if where else coll.count()
        pages = max(1, math.ceil(total / size))
        page = min(max(1, int(page)), pages)
        got = coll.get(where=where, limit=int(size), offset=(page - 1) * int(size), include=["documents", "metadatas"])
        rows = [{"id": i, "text": d or "", **m} for i, d, m in zip(got["ids"], got["documents"], got["metadatas"])]
        return {"total": total, "pages": pages, "page": page, "where": where, "rows": rows}

    @reading_chroma
    def record(self, collection: str, record_id: str) -> dict | None:
        """One record with its text, metadata and a summary of its vector; None when no such id."""
        got = self.index.get(collection).get(ids=[record_id.strip()], include=["documents", "metadatas", "embeddings"])
        if not got["ids"]:
            return None
        vec = [float(x) for x in got["embeddings"][0]]
        return {"id": got["ids"][0], "text": got["documents"][0] or "", "metadata": dict(got["metadatas"][0]),
                "dimension": len(vec), "norm": math.sqrt(sum(x * x for x in vec)), "head": vec[:8]}

    def indexed_sources(self) -> set[str]:
        """The sources whose chunks are in the live collection: the repos a question set can be scored on."""
        return {r["name"] for r in self.source_overview() if r["in_live_collection"]}

    def _run_config(self, options, questions_name: str, only_indexed: bool) -> dict:
        live, config = self.live()
        return {"collection": live, "chunk_config": config.label(), "embed_model": self.embed_model, "k": options.k,
                "mode": options.mode, "questions": questions_name, "only_indexed": only_indexed}

    @reaching_chroma
    def run_and_save_evaluation(self, engine, questions: list[dict], options, questions_name: str,
                                only_indexed: bool = False) -> dict:
        """Score ``questions`` with ``engine`` and keep the run in ``KB_HOME/evals`` with what it measured.

        ``only_indexed``: score only the questions on sources in the live
        collection; the others are listed in the report's ``not_indexed``.
        """
        from kb.evaluate import evaluate

        config = self._run_config(options, questions_name, only_indexed)
        report = evaluate(engine, questions, options, indexed=self.indexed_sources() if only_indexed else None)
        return self._keep_run(report, config, "retrieval")

    def _keep_run(self, report: dict, config: dict, kind: str) -> dict:
        """Save a finished run; one that can't be saved is still reported (``not_saved`` says why): an answer run
        is minutes of the model's time, and a full disk threw all of it away with a traceback (an operator review)."""
        from kb.evaluate import save_run

        try:
            save_run(self.settings.home, report, config, kind=kind)
        except OSError as exc:
            report["not_saved"] = f"the run could not be kept in {self.settings.home / 'evals'}: {exc.strerror or exc}"
        return report

    @reaching_chroma
    def run_and_save_answer_evaluation(self, answerer, questions: list[dict], options, questions_name: str,
                                       only_indexed: bool = False, limit: int | None = None,
                                       progress=lambda done, total: None) -> dict:
        """``kb eval --answers`` (facts stated, gold cited, declined, timings) on ``questions`` with ``answerer``,
        kept in ``KB_HOME/evals/answers`` with what it measured; ``only_indexed`` as for retrieval; ``limit``:
        only the first so many of the questions scored (each answer takes the LLM seconds)."""
        from core.llm import describe_llm
        from kb.answer.evaluate import evaluate_answers
        from kb.evaluate import split_indexed

        config = self._run_config(options, questions_name, only_indexed)
        config["llm"] = describe_llm(self.settings)
        kept, not_indexed = split_indexed(questions, self.indexed_sources() if only_indexed else None)
        if limit is not None:
            kept = kept[: max(1, int(limit))]
            config["limit"] = int(limit)
        report = evaluate_answers(answerer, kept, options, progress=progress)
        if only_indexed:
            report["not_indexed"] = not_indexed
        return self._keep_run(report, config, "answers")

    def past_evaluations(self, kind: str = "retrieval") -> list[dict]:
        """Saved evaluation runs (``retrieval`` or ``answers``), oldest first."""
        from kb.evaluate import past_runs

        return past_runs(self.settings.home, kind)

    def rated_answers(self) -> list[dict]:
        """Chat answers rated thumbs up or down, newest first (:func:`kb.feedback.rated_answers`)."""
        from kb.feedback import rated_answers

        return rated_answers(self.settings.home)

    def add_feedback_question(self, question: str, gold: list[dict], facts: list | None = None, **extra):
        """Save a question with gold lines to ``KB_HOME/questions/feedback.jsonl`` (:func:`kb.feedback.add_question`)."""
        from kb.feedback import add_question

        return add_question(self.settings.home, question, gold, facts, **extra)

    def activity(self, hours: float = 24) -> dict:
        """What the log (``KB_HOME/logs``) says about the last ``hours``: see :func:`kb.log.glance`."""
        return runlog.glance(self.settings, hours)

    @reading_chroma
    def stats(self) -> dict:
        counts = self.manifest.counts()
        live = self.manifest.live_collection
        chunks = self.index.get(live).count() if live and self.index.exists(live) else 0
        return {
            "sources": counts["sources"], "documents": counts["documents"], "skipped": counts["skipped"],
            "chunks": chunks, "live_collection": live, "collections": self.index.names(),
        }

    def lines_at(self, source: str, path: str, commit: str) -> list[str] | None:
        """A file's lines (as git numbers them) at a commit of its source's clone; None when the clone lacks it.

        For a citation made before a sync: its lines are read where they were (``kb.citations.relocate``).
        """
        if not HEX_RE.fullmatch(commit or ""):  # from a URL: a commit id, never a revision expression
            return None
        src = self.manifest.source(source)
        try:
            repo = sources.open_repo(src.name, src.kind, Path(src.repo_path), src.url)
            row = self.manifest.document(source, path)
            data, _ = read_blob(repo.commit(commit), path, max(self.settings.max_file_bytes, row.size if row else 0))
        except (KBError, KeyError, ValueError, git.GitError, git.BadName, git.BadObject):
            return None
        if data is None:
            return None
        try:
            return git_lines(decode(data))
        except SkipFile:
            return None

    def read_document(self, source: str, path: str) -> LoadedDocument:
        """A document's text as indexed (at the source's indexed commit)."""
        src = self.manifest.source(source)
        row = self.manifest.document(source, path)
        if row is None:
            raise KBError(f"{source} has no document {path!r}")
        try:
            repo = sources.open_repo(src.name, src.kind, Path(src.repo_path), src.url)
        except KBError as exc:
            raise KBError(f"{source}/{path} can't be read: {exc}") from None
        data, why = read_blob(repo.commit(row.commit), path, max(self.settings.max_file_bytes, row.size))
        if data is None:
            raise KBError(f"{path}: {why}")
        try:
            return load_document(path, data, max(self.settings.max_file_bytes, len(data)))
        except SkipFile as exc:
            raise KBError(f"{path} is not indexed: {exc}") from None

    @reading_chroma
    def chunks_of(self, source: str, path: str, collection: str | None = None) -> list[dict]:
        coll = self.index.get(collection or self.live()[0])
        page = coll.get(where={"$and": [{"source": source}, {"path": path}]}, include=["documents", "metadatas"])
        rows = [{"id": i, "text": d, **m} for i, d, m in zip(page["ids"], page["documents"], page["metadatas"])]
        return sorted(rows, key=lambda r: (r["line_start"], r["line_end"]))

    # snapshots (kb/snapshot.py)
    @reaching_chroma
    @runlog.job("export", dict)
    def export_snapshot(self, path: str | Path | None = None, with_repos: bool = False,
                        progress: Progress = no_progress, overwrite: bool = False, scheduled: bool = False,
                        keep: int | None = None) -> dict:
        """Write the manifest, the live collection and its passages (and the clones) to one checked ``.tar.gz``;
        no ``path``: a new file in ``KB_HOME/snapshots``; an existing file only with ``overwrite``; ``scheduled``:
        the schedule's, its old ones beyond ``keep`` (``KB_SNAPSHOT_KEEP``) removed once it is written."""
        from kb import snapshot

        return snapshot.export_snapshot(self, Path(path) if path is not None else None, with_repos=with_repos,
                                        progress=progress, overwrite=overwrite, scheduled=scheduled, keep=keep)

    def snapshot_schedule(self, now: float | None = None) -> dict:
        """``every`` (KB_SNAPSHOT_EVERY in seconds, 0: off), ``keep``, ``kept`` (the schedule's archives on disk),
        ``next_run`` (epoch seconds, None when off)."""
        from kb import snapshot

        every = self.settings.snapshot_every
        kept = [f for f in snapshot.written(self) if f["name"].startswith(snapshot.SCHEDULED_PREFIX)]
        return {"every": every, "keep": self.settings.snapshot_keep, "kept": len(kept),
                "last_run": kept[0]["modified"] if kept else None,
                "next_run": snapshot.scheduled_due(self, every, now) if every > 0 else None}

    @reaching_chroma
    @runlog.job("import", dict)
    def import_snapshot(self, path: str | Path, progress: Progress = no_progress) -> dict:
        """Load a snapshot into this knowledge base, which must be empty: all of it, or nothing."""
        from kb import snapshot

        return snapshot.import_snapshot(self, Path(path), progress=progress)

    def snapshots(self) -> list[dict]:
        """The snapshots written to ``KB_HOME/snapshots`` (the dashboard's exports), newest first."""
        from kb import snapshot

        return snapshot.written(self)

    @reaching_chroma
    def snapshot_target_problem(self) -> str | None:
        """Why a snapshot can't be imported here (it already holds something), or None when it can."""
        from kb import snapshot

        return snapshot.target_problem(self)

    def close(self) -> None:
        self.manifest.close()
