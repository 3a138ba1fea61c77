"""Snapshots: the whole knowledge base in one ``.tar.gz``, and back (``kb export`` / ``kb import``).

An archive holds, each part with its sha256 in ``index.json`` (the first member):

- ``manifest.json``: every manifest table (sources, documents, collections, meta), as rows;
- ``config.json``: the live collection's name, chunk config, embedding model, dimension and metadata;
- ``chunks.jsonl`` + ``chunks.npy``: the live collection's records (id, text, metadata) and their vectors
  (float32, one row per line, in the order Chroma returns them);
- ``passages.jsonl`` + ``passages.npy``: the passage collection's records (id, metadata) and vectors;
- ``repos/NAME.tar`` (``--with-repos``): each source's clone.

Import loads into an empty knowledge base only (no sources, no collections in its vector store, local or a
server), and nothing is half-written: every part is checked against its checksum before anything is staged; the
records go into hidden staging collections (``kbp-import-…``, a prefix no listing shows) and the clones into a
temporary folder in ``KB_HOME``; then the collections are renamed, the clones moved and the manifest written in
one transaction, which is the commit point. An exception rolls all of it back. A process killed before the commit
leaves only hidden leftovers, recorded in ``KB_HOME/.import-pending.json``; the next import removes them first.

Without ``--with-repos``, import clones each git source again from its recorded URL (a local path or bundle works
offline); a source that cannot be cloned is still searchable, and ``kb verify`` reports its missing clone.

Searches after an import give the same hits in the same order as before. The records go in in the order they were
exported (Chroma's own), so passages with equal vectors keep their order (Chroma ranks ties by insertion order);
Chroma builds the HNSW graph again, in other batches and threads, so the imported graph is not the original, and
both are searched with ``EF_SEARCH`` (kb/store/index.py), deep enough for each to find the exact nearest passages.
What can still differ is a score's last digit: Chroma normalises a cosine collection's vectors when they go in, and
normalising an exported (already normalised) vector again can move its last float32 bit, a cosine's by about 1e-7.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from chromadb.errors import ChromaError

from core import atomic
from core.settings import redact
from kb import pids
from kb.errors import KBError
from kb.ingest import clone_config
from kb.ingest import sources as git_sources
from kb.progress import Progress, no_progress
from kb.store.index import STAGING_PREFIX, passage_collection
from kb.store.server_owner import OWNER
from kb.store.manifest import write_lock

if TYPE_CHECKING:
    from kb.service import KnowledgeBase

log = logging.getLogger(__name__)
FORMAT = "kb-snapshot"
VERSION = 1
INDEX = "index.json"
PENDING = ".import-pending.json"
TEMP_PREFIX = ".import-"
READ_PAGE = 2000
COMPRESSLEVEL = 6
MAX_INDEX_BYTES = 16 << 20
COPY_BLOCK = 1 << 20


# ---------------------------------------------------------------------------- export


SCHEDULED_PREFIX = "kb-snapshot-auto-"  # the schedule's archives: the only ones it ever removes


def default_path(kb: "KnowledgeBase", scheduled: bool = False) -> Path:
    """``KB_HOME/snapshots/kb-snapshot-<UTC time>.tar.gz``, where the dashboard writes its exports (a second export
    within the same second gets ``-2``, never the first one's file); ``kb-snapshot-auto-…`` for the schedule's."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = kb.settings.home / "snapshots"
    prefix = SCHEDULED_PREFIX if scheduled else "kb-snapshot-"
    path, n = folder / f"{prefix}{stamp}.tar.gz", 1
    while path.exists():
        n += 1
        path = folder / f"{prefix}{stamp}-{n}.tar.gz"
    return path


def scheduled_due(kb: "KnowledgeBase", every: float, now: float | None = None) -> float:
    """When the next scheduled snapshot is due (epoch seconds): ``every`` after the newest one on disk, or now.

    Read from the files, not kept in memory, so that a restarted dashboard or ``kb watch`` neither writes one at
    every start nor forgets one that is overdue.
    """
    now = time.time() if now is None else now
    newest = max((f["modified"] for f in written(kb) if f["name"].startswith(SCHEDULED_PREFIX)), default=None)
    return now if newest is None else min(newest, now) + every  # a file dated ahead of the clock counts as now


def prune_scheduled(kb: "KnowledgeBase", keep: int) -> list[str]:
    """Remove the schedule's archives beyond the newest ``keep``; an export written by hand is never removed."""
    auto = [f for f in written(kb) if f["name"].startswith(SCHEDULED_PREFIX)]  # newest first
    removed = []
    for f in auto[max(1, keep):]:
        try:
            Path(f["path"]).unlink()
            removed.append(f["name"])
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the old scheduled snapshot %s: %s", f["path"], exc)
    return removed


def written(kb: "KnowledgeBase") -> list[dict]:
    """The snapshots in ``KB_HOME/snapshots``, newest first: ``{"path", "name", "bytes", "modified"}``.

    The dashboard lists them so that an export outlives the browser tab that asked for it: the job writes the file
    whether or not anyone is still looking, and any admin session can download it afterwards. Temporary files (a
    half-written archive, an export's work folder) start with a dot and are not listed.
    """
    folder = kb.settings.home / "snapshots"
    try:
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                 and p.name.endswith(".tar.gz")]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KBError(f"cannot list the snapshots in {folder}: {exc.strerror or exc}") from None
    rows = []
    for p in files:
        try:
            st = p.stat()
        except OSError:  # removed between the listing and now
            continue
        rows.append({"path": str(p), "name": p.name, "bytes": st.st_size, "modified": st.st_mtime})
    return sorted(rows, key=lambda r: (r["modified"], r["name"]), reverse=True)


# An export's work folder and half-written archive carry its process id: a later export removes those of a process
# that is gone (a killed export left them, tens of MB each, and nothing ever removed them).
# Its start time beside the pid (``1234s5678``): a pid reused by a later process kept a dead export's leftovers.
WORK_RE = re.compile(r"\.kb-export-(\d+)(?:s(\d+))?-")
PART_RE = re.compile(r"\..+\.(\d+)(?:s(\d+))?\.[0-9a-f]{8}\.part$")


def _owner() -> str:
    """This process as leftovers name it: its pid, and when it started where that is known."""
    start = pids.started(os.getpid())
    return f"{os.getpid()}" + (f"s{start}" if start else "")


def clear_leftovers(folder: Path) -> list[str]:
    """Remove the work folders and half-written archives of exports whose process is gone; their names."""
    gone = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        m = WORK_RE.match(entry.name) if entry.is_dir() else PART_RE.match(entry.name)
        if m and not pids.alive(int(m.group(1)), m.group(2)):  # this process's own are alive too
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            gone.append(entry.name)
    return gone


def export_snapshot(kb: "KnowledgeBase", dest: Path | None, with_repos: bool = False,
                    progress: Progress = no_progress, overwrite: bool = False, scheduled: bool = False,
                    keep: int | None = None) -> dict:
    """Write a snapshot of ``kb`` to ``dest`` (written beside it under a temporary name, then renamed).

    ``dest`` None: :func:`default_path`. An existing file is replaced only with ``overwrite``: it may be another
    knowledge base's only backup. ``scheduled``: one of the schedule's (``KB_SNAPSHOT_EVERY``), in
    ``KB_HOME/snapshots``; once it is written, the schedule's older ones beyond ``keep`` (default
    ``KB_SNAPSHOT_KEEP``) are removed (never before: a failed export leaves the old ones as they were).
    """
    t0 = time.perf_counter()
    if scheduled:
        dest = None
    if dest is None:
        dest = default_path(kb, scheduled)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # KB_HOME/snapshots is a file, or can't be made
            raise KBError(f"cannot write the snapshot in {dest.parent}: {exc.strerror or exc}") from None
    dest = Path(dest).expanduser()
    if dest.is_dir():
        raise KBError(f"{dest} is a folder; give the archive's file name, e.g. {dest / 'kb-snapshot.tar.gz'}")
    if dest.parent.exists() and not dest.parent.is_dir():
        raise KBError(f"{dest.parent} is a file, not a folder: give the archive's path in a folder")
    if not dest.parent.is_dir():
        raise KBError(f"folder {dest.parent} does not exist")
    if dest.exists() and not overwrite:
        raise KBError(f"{dest} already exists; give another file name, or --force to replace it")
    try:
        clear_leftovers(dest.parent)
        work = Path(tempfile.mkdtemp(prefix=f".kb-export-{_owner()}-", dir=dest.parent))
    except OSError as exc:  # a folder that can't be written ("/proc", read-only, full): said, not a traceback
        raise KBError(f"cannot write the snapshot in {dest.parent}: {exc.strerror or exc}") from None
    partial = dest.with_name(f".{dest.name}.{_owner()}.{secrets.token_hex(4)}.part")
    try:
        with write_lock(kb.settings.home, writes=False):  # a consistent snapshot: no sync or re-chunk while it is read
            index = _write_parts(kb, work, with_repos, progress)
        progress("pack", 0, len(index["parts"]), dest.name)
        with tarfile.open(partial, "w:gz", compresslevel=COMPRESSLEVEL) as tar:
            _add_bytes(tar, INDEX, json.dumps(index, ensure_ascii=False, indent=1).encode())
            for i, part in enumerate(index["parts"], 1):
                _add_file(tar, part["name"], work / part["name"])
                progress("pack", i, len(index["parts"]), part["name"])
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, dest)
    except OSError as exc:  # the disk filled up, or the folder went away, while writing
        raise KBError(f"cannot write the snapshot {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        partial.unlink(missing_ok=True)
    removed = prune_scheduled(kb, keep or kb.settings.snapshot_keep) if scheduled else []
    return {
        "path": str(dest), "bytes": dest.stat().st_size, "collection": index["collection"], "scheduled": scheduled,
        "removed": removed,
        "chunks": index["counts"]["chunks"], "passages": index["counts"]["passages"],
        "sources": index["counts"]["sources"], "documents": index["counts"]["documents"],
        "with_repos": with_repos, "repos": index["repos"], "seconds": round(time.perf_counter() - t0, 2),
    }


def _write_parts(kb: "KnowledgeBase", work: Path, with_repos: bool, progress: Progress) -> dict:
    live = kb.manifest.live_collection
    coll = kb.index.find(live) if live else None
    if coll is None:
        raise KBError("nothing to export: there is no live collection yet (add a source and sync it first)")
    row = kb.manifest.collection_rows().get(live) or {}
    meta = dict(coll.metadata or {})
    pcoll = kb.index.find(passage_collection(live))
    tables = _dump_manifest(kb.manifest.db)
    (work / "manifest.json").write_text(json.dumps({"tables": tables}, ensure_ascii=False))
    n_chunks, dim = _dump_records(coll, work / "chunks.jsonl", work / "chunks.npy", True, "export chunks", progress)
    n_passages = None
    if pcoll is not None:
        n_passages, pdim = _dump_records(pcoll, work / "passages.jsonl", work / "passages.npy", False,
                                         "export passages", progress)
        dim = dim or pdim
    config = {
        "collection": live, "passage_collection": pcoll.name if pcoll is not None else None,
        "chunk_config": row.get("chunk_config") or meta.get("chunk_config", ""),
        "embed_model": row.get("embed_model") or meta.get("embed_model", ""),
        "metadata": meta, "space": "cosine", "dimension": dim,
    }
    (work / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    repos: list[str] = []
    if with_repos:
        (work / "repos").mkdir()
        srcs = [s for s in kb.manifest.sources() if Path(s.repo_path).is_dir()]
        for i, src in enumerate(srcs, 1):
            progress("export clones", i - 1, len(srcs), src.name)
            _add_clone(tar_path=work / "repos" / f"{src.name}.tar", repo_path=Path(src.repo_path), name=src.name)
            repos.append(src.name)
        progress("export clones", len(srcs), len(srcs))
    names = ["manifest.json", "config.json", "chunks.jsonl", "chunks.npy"]
    if n_passages is not None:
        names += ["passages.jsonl", "passages.npy"]
    names += [f"repos/{n}.tar" for n in repos]
    return {
        "format": FORMAT, "version": VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "collection": live, "embed_model": config["embed_model"], "chunk_config": config["chunk_config"],
        "counts": {"chunks": n_chunks, "passages": n_passages or 0,
                   "sources": len(tables.get("sources", [])), "documents": len(tables.get("documents", []))},
        "with_repos": with_repos, "repos": repos,
        "parts": [{"name": n, "bytes": (work / n).stat().st_size, "sha256": _sha256_file(work / n)} for n in names],
    }


def _add_clone(tar_path: Path, repo_path: Path, name: str) -> None:
    """The clone as it is, but its config without credentials or command-running keys, and without hooks."""
    gdir = clone_config.git_dir(repo_path)
    config_name = gdir.joinpath("config").relative_to(repo_path).as_posix()
    skip = {f"{name}/{config_name}", f"{name}/{gdir.joinpath('hooks').relative_to(repo_path).as_posix()}"}
    text = clone_config.config_text(clone_config.safe_entries(gdir, credentials=False), tar_path.parent)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(repo_path, arcname=name, filter=lambda info: None if info.name in skip else info)
        _add_bytes(tar, f"{name}/{config_name}", text)


def _dump_manifest(db: sqlite3.Connection) -> dict[str, list[dict]]:
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    return {n: [dict(r) for r in db.execute(f'SELECT * FROM "{n}"')] for n in sorted(names)}


def _dump_records(coll, jsonl: Path, npy: Path, with_text: bool, stage: str, progress: Progress) -> tuple[int, int | None]:
    """Every record of ``coll``, in Chroma's own order: one JSON line each, and their vectors as one float32 matrix."""
    total = coll.count()
    include = ["metadatas", "embeddings"] + (["documents"] if with_text else [])
    vectors: np.ndarray | None = None
    done = 0
    with open(jsonl, "w", encoding="utf-8") as out:
        while True:
            try:
                page = coll.get(include=include, limit=READ_PAGE, offset=done)
            except ChromaError as exc:  # was the store's traceback (an operator review)
                raise KBError(f"{coll.name}: its vectors can't be read back ({exc}): the vector index is lost or "
                              "damaged; run kb verify --repair, then export") from None
            ids = page["ids"]
            if not ids:
                break
            embs = np.asarray(page["embeddings"], dtype=np.float32)
            if vectors is None:
                vectors = np.lib.format.open_memmap(npy, mode="w+", dtype="<f4", shape=(total, embs.shape[1]))
            if done + len(ids) > total:
                raise KBError(f"{coll.name} changed while it was exported; try again")
            vectors[done:done + len(ids)] = embs
            docs = page["documents"] if with_text else [None] * len(ids)
            for i, d, m in zip(ids, docs, page["metadatas"]):
                line = {"id": i, "metadata": m}
                if with_text:
                    line["document"] = d
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            done += len(ids)
            progress(stage, done, total, coll.name)
            if len(ids) < READ_PAGE:
                break
    if done != total:
        raise KBError(f"{coll.name} changed while it was exported; try again")
    if vectors is None:
        np.save(npy, np.zeros((0, 0), dtype="<f4"))
        return 0, None
    vectors.flush()
    dim = int(vectors.shape[1])
    del vectors
    return done, dim


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _info(name, len(data))
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    with open(path, "rb") as fh:
        tar.addfile(_info(name, path.stat().st_size), fh)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(COPY_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- import


def read_index(archive: Path) -> dict:
    """The archive's ``index.json`` (what it holds), checked for format and version; reads nothing else."""
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise KBError(f"no such file: {archive}")
    with _corrupt_is_kberror(archive), gzip.open(archive, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        first = tar.next()
        return _parse_index(archive, first, tar)


def target_problem(kb: "KnowledgeBase") -> str | None:
    """Why ``kb`` can't receive an import (it already holds something), or None when it is empty."""
    m = kb.manifest
    n_sources = len(m.sources())
    if n_sources:
        return f"{kb.settings.home} already holds {n_sources} source(s)"
    if m.collection_rows() or m.live_collection:
        return f"{kb.settings.home} already records collections in its manifest"
    held = sorted(c.name for c in kb.index.client.list_collections()
                  if not c.name.startswith(STAGING_PREFIX) and c.name != OWNER)
    if held:
        where = f"the Chroma server at {redact(kb.settings.chroma_url)}" if kb.settings.chroma_url else f"{kb.settings.chroma_path}"
        return f"{where} already holds collection(s): {', '.join(held[:5])}" + (" …" if len(held) > 5 else "")
    repos = kb.settings.repos_path
    if repos.is_dir() and any(repos.iterdir()):
        return f"{repos} is not empty"
    return None


def import_snapshot(kb: "KnowledgeBase", archive: Path, progress: Progress = no_progress) -> dict:
    """Load ``archive`` into the empty knowledge base ``kb``: all of it, or nothing."""
    t0 = time.perf_counter()
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise KBError(f"no such file: {archive}")
    home = kb.settings.home
    with write_lock(home):
        recover(kb)
        problem = target_problem(kb)
        if problem:
            raise KBError(f"import loads into an empty knowledge base only: {problem}. "
                          "Point KB_HOME (and KB_CHROMA_URL) at an empty place")
        token = secrets.token_hex(4)
        temp = home / f"{TEMP_PREFIX}{token}"
        temp.mkdir(parents=True)
        try:
            index = _extract_checked(archive, temp / "parts", kb, progress)
            return _load(kb, index, temp, token, t0, progress)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def _corrupt_is_kberror(archive: Path) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise KBError(f"{archive.name} is not a complete snapshot archive (corrupt or truncated: {exc})") from None
    except OSError as exc:  # unreadable, or the disk full while its parts are written: was a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        raise KBError(f"cannot import {archive.name}: {exc.strerror or exc}{where}; nothing was changed") from None


def _parse_index(archive: Path, member: tarfile.TarInfo | None, tar: tarfile.TarFile) -> dict:
    if member is None or member.name != INDEX or not member.isfile():
        raise KBError(f"{archive.name} is not a knowledge-base snapshot: it does not start with {INDEX}")
    if member.size > MAX_INDEX_BYTES:
        raise KBError(f"{archive.name}: {INDEX} is implausibly large ({member.size:,} bytes)")
    try:
        index = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (ValueError, UnicodeDecodeError) as exc:
        raise KBError(f"{archive.name}: {INDEX} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise KBError(f"{archive.name} is not a knowledge-base snapshot ({INDEX} names no format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise KBError(f"{archive.name} is a snapshot of format version {index.get('version')!r}; "
                      f"this knowledge base reads version {VERSION}")
    parts = index.get("parts")
    if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("sha256"), str)
            and isinstance(p.get("bytes"), int) and not isinstance(p["bytes"], bool) and p["bytes"] >= 0
            for p in parts):
        raise KBError(f"{archive.name}: {INDEX} lists no valid parts")
    if len({p["name"] for p in parts}) != len(parts):  # a part named twice, or a negative size, fooled the room check
        raise KBError(f"{archive.name}: {INDEX} lists a part twice")
    for p in parts:
        _check_part_name(archive, p["name"])
    if not isinstance(index.get("counts"), dict):
        raise KBError(f"{archive.name}: {INDEX} has no record counts")
    return index


def _check_part_name(archive: Path, name: str) -> None:
    fixed = {"manifest.json", "config.json", "chunks.jsonl", "chunks.npy", "passages.jsonl", "passages.npy"}
    if name in fixed:
        return
    if name.startswith("repos/") and name.endswith(".tar"):
        try:
            git_sources.validate_name(name[len("repos/"):-len(".tar")])
            return
        except KBError:
            pass
    raise KBError(f"{archive.name}: unexpected part {name!r}")


def _extract_checked(archive: Path, dest: Path, kb: "KnowledgeBase", progress: Progress) -> dict:
    """Every part, written to ``dest`` and checked against its sha256 in the index, or a KBError."""
    dest.mkdir(parents=True)
    total = archive.stat().st_size
    with _corrupt_is_kberror(archive), open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz, \
            tarfile.open(fileobj=gz, mode="r|") as tar:
        index = _parse_index(archive, tar.next(), tar)
        if index.get("embed_model") != kb.embed_model:
            raise KBError(f"{archive.name} was embedded with {index.get('embed_model')!r}, but this knowledge base "
                          f"is configured for {kb.embed_model!r}: set KB_EMBED_MODEL / KB_EMBED_BACKEND to that model "
                          "before importing")
        expected = {p["name"]: p for p in index["parts"]}
        _check_room(dest, sum(int(p["bytes"]) for p in index["parts"]))
        seen: set[str] = set()
        while (member := tar.next()) is not None:
            part = expected.get(member.name)
            if part is None or member.name in seen or not member.isfile():
                raise KBError(f"{archive.name}: unexpected member {member.name!r}")
            if member.size != part["bytes"]:
                raise KBError(f"{archive.name}: part {member.name} has {member.size:,} bytes, "
                              f"its index says {part['bytes']:,}: the archive is corrupt")
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            src = tar.extractfile(member)
            with open(target, "wb") as out:
                for block in iter(lambda: src.read(COPY_BLOCK), b""):  # type: ignore[union-attr]
                    h.update(block)
                    out.write(block)
                    progress("read archive", raw.tell(), total, member.name)
            if h.hexdigest() != part["sha256"]:
                raise KBError(f"{archive.name}: part {member.name} fails its sha256 checksum: the archive is corrupt")
            seen.add(member.name)
        while gz.read(COPY_BLOCK):  # to the end: gzip checks its CRC and length there
            pass
    missing = sorted(set(expected) - seen)
    if missing:
        raise KBError(f"{archive.name} is incomplete (truncated?): missing {', '.join(missing)}")
    progress("read archive", total, total)
    return index


def _check_room(dest: Path, unpacked: int) -> None:
    """Refuse an archive whose parts would not fit, before writing any: twice their size, the staging copy and the
    store's. A small archive can declare gigabytes that compress to nothing (a security review's gzip bomb), and a
    disk that filled mid-import left the machine's other work without room too."""
    free = shutil.disk_usage(dest).free
    if 2 * unpacked > free:
        raise KBError(f"the snapshot unpacks to {unpacked / 1e6:,.0f} MB and needs about twice that free in "
                      f"{dest.parent}, which has {free / 1e6:,.0f} MB: nothing was changed")


def _check_source_row(row: dict) -> None:
    """A source row as ``kb add`` would have written it: a snapshot's rows are someone else's input.

    A security review's archive with ``extensions: "md"`` broke every later command with a traceback, and its
    ``javascript:`` web URL reached the Sources page's links, past the check ``kb add`` makes.
    """
    name = str(row.get("name"))
    try:
        git_sources.validate_name(name)
        if row.get("kind") not in ("git", "files"):
            raise KBError(f"its kind {row.get('kind')!r} is neither 'git' nor 'files'")
        if row.get("kind") == "git":
            git_sources.check_transport(str(row.get("url") or ""))
        git_sources.validate_web_url(row.get("web_url") or None)
        git_sources.validate_branch(row.get("branch") or None)
        try:
            extensions = json.loads(row.get("extensions") or "null")
        except ValueError:
            extensions = None
        if not isinstance(extensions, list) or not all(isinstance(e, str) for e in extensions):
            raise KBError(f"its extensions {row.get('extensions')!r} are not a JSON list of names")
        git_sources.validate_extensions(tuple(extensions))
    except (KBError, ValueError, TypeError) as exc:
        raise KBError(f"the snapshot's source {name!r} is refused: {exc}") from None


def _read_records(parts: Path, stem: str, with_text: bool) -> tuple[list[str], list[str] | None, list[dict], np.ndarray]:
    ids: list[str] = []
    docs: list[str] = []
    metas: list[dict] = []
    with open(parts / f"{stem}.jsonl", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                raise KBError(f"{stem}.jsonl line {n} is not JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("metadata"), dict):
                raise KBError(f"{stem}.jsonl line {n} is not a record")
            if with_text and not isinstance(rec.get("document"), str):
                raise KBError(f"{stem}.jsonl line {n} has no text")
            url = rec["metadata"].get("url")
            if url and not re.match(r"https?://", str(url), re.IGNORECASE):
                raise KBError(f"{stem}.jsonl line {n} links to {str(url)[:60]!r}: a permalink must be http(s)")
            ids.append(rec["id"])
            metas.append(rec["metadata"])
            if with_text:
                docs.append(rec["document"])
    try:
        vectors = np.load(parts / f"{stem}.npy", mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise KBError(f"{stem}.npy is not a vector matrix ({exc})") from None
    if ids and (vectors.ndim != 2 or vectors.shape[0] != len(ids) or vectors.dtype != np.dtype("<f4")):
        raise KBError(f"{stem}.npy holds {vectors.shape} {vectors.dtype} vectors for {len(ids)} records")
    return ids, (docs if with_text else None), metas, vectors


def _load(kb: "KnowledgeBase", index: dict, temp: Path, token: str, t0: float, progress: Progress) -> dict:
    parts = temp / "parts"
    try:
        config = json.loads((parts / "config.json").read_text(encoding="utf-8"))
        tables = json.loads((parts / "manifest.json").read_text(encoding="utf-8"))["tables"]
        live = config["collection"]
        chunk_config, embed_model = str(config["chunk_config"]), str(config["embed_model"])
        src_rows = sorted(tables.get("sources", []), key=lambda r: str(r["name"]))
        names = [str(r["name"]) for r in src_rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise KBError(f"the snapshot's config or manifest is malformed ({exc})") from None
    if live != index.get("collection") or embed_model != index.get("embed_model"):
        raise KBError("the snapshot's config.json disagrees with its index")
    for row in src_rows:
        _check_source_row(row)
    chunks = _read_records(parts, "chunks", True)
    passages = _read_records(parts, "passages", False) if (parts / "passages.jsonl").exists() else None
    for what, recs in (("chunks", chunks), ("passages", passages)):
        want = index["counts"].get(what, 0)
        if len(recs[0] if recs else []) != want:
            raise KBError(f"the snapshot holds {len(recs[0]) if recs else 0} {what}, its index says {want}")

    stage_c, stage_p = f"{STAGING_PREFIX}{token}-c", f"{STAGING_PREFIX}{token}-p"
    pname = passage_collection(live) if passages is not None else None
    plan = {"token": token, "staging": [stage_c, stage_p], "collections": [live] + ([pname] if pname else []),
            "repos": names, "temp": temp.name}
    pending = kb.settings.home / PENDING
    _write_json_durably(pending, plan)
    committed = False
    moved: list[Path] = []
    try:
        index_ = kb.index
        coll = index_.create(stage_c, chunk_config, embed_model)
        _stage(index_, coll, chunks, "stage chunks", progress)
        pcoll = None
        if passages is not None:
            pcoll = index_.create(stage_p, chunk_config, embed_model)
            _stage(index_, pcoll, passages, "stage passages", progress)
        clones = _stage_repos(kb, index, parts, temp / "repos", src_rows, progress)
        if coll.count() != len(chunks[0]) or (pcoll is not None and pcoll.count() != len(passages[0])):
            raise KBError("the staged collections do not hold every record of the snapshot")

        progress("switch", 0, 1)
        if pcoll is not None:
            pcoll.modify(name=pname)
        coll.modify(name=live)
        repos_root = kb.settings.repos_path
        repos_root.mkdir(parents=True, exist_ok=True)
        for n in clones["restored"] + clones["recloned"]:
            target = repos_root / n
            os.rename(temp / "repos" / n, target)
            moved.append(target)
        _write_manifest(kb, tables, config)
        committed = True
        progress("switch", 1, 1)
    except BaseException:
        if not committed and _rollback(kb, plan, moved):
            pending.unlink(missing_ok=True)
        raise
    pending.unlink(missing_ok=True)
    return {
        "collection": live, "chunks": len(chunks[0]), "passages": len(passages[0]) if passages else 0,
        "sources": len(names), "documents": len(tables.get("documents", [])),
        "chunk_config": chunk_config, "embed_model": embed_model, "created": index.get("created"),
        "with_repos": bool(index.get("with_repos")), "clones": clones,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _stage(vindex, coll, records, stage: str, progress: Progress) -> None:
    ids, docs, metas, vectors = records
    size = vindex.client.get_max_batch_size()
    progress(stage, 0, len(ids), coll.name)
    for i in range(0, len(ids), size):
        j = min(len(ids), i + size)
        try:
            coll.add(ids=ids[i:j], embeddings=np.asarray(vectors[i:j], dtype=np.float32),
                     documents=docs[i:j] if docs is not None else None, metadatas=metas[i:j])
        except (ValueError, TypeError) as exc:  # chromadb's validation (bad metadata, duplicate ids)
            raise KBError(f"the snapshot's records were refused by Chroma: {exc}") from None
        progress(stage, j, len(ids), coll.name)


def _stage_repos(kb: "KnowledgeBase", index: dict, parts: Path, dest: Path, src_rows: list[dict],
                 progress: Progress) -> dict:
    """Each source's clone in ``dest``: from the archive, else cloned again from its URL, else reported missing."""
    dest.mkdir(parents=True, exist_ok=True)
    restored, recloned, missing = [], [], []
    for i, row in enumerate(src_rows):
        name = str(row["name"])
        progress("restore clones", i, len(src_rows), name)
        packed = parts / "repos" / f"{name}.tar"
        if packed.is_file():
            with tarfile.open(packed, "r") as tar:
                for m in tar.getmembers():
                    if m.name != name and not m.name.startswith(name + "/"):
                        raise KBError(f"repos/{name}.tar holds {m.name!r}, outside its folder")
                try:
                    tar.extractall(dest, filter="data")
                except tarfile.FilterError as exc:
                    raise KBError(f"repos/{name}.tar was refused: {exc}") from None
            try:
                clone_config.sanitize_clone(dest / name, bare=row.get("kind") != "files")
            except KBError as exc:
                raise KBError(f"repos/{name}.tar was refused: {exc}") from None
            restored.append(name)
        elif row.get("kind") == "git":
            try:
                spec = git_sources.SourceSpec(name, git_sources.validate_url(str(row["url"])), row.get("branch") or None)
                git_sources.clone(spec, dest / name)
                recloned.append(name)
            except KBError as exc:
                missing.append({"name": name, "reason": str(exc)})
        else:
            missing.append({"name": name, "reason": "uploaded files travel only in a snapshot made with --with-repos"})
    progress("restore clones", len(src_rows), len(src_rows))
    return {"restored": restored, "recloned": recloned, "missing": missing}


def _write_manifest(kb: "KnowledgeBase", tables: dict, config: dict) -> None:
    """Every row in one transaction: the commit point of an import."""
    live = config["collection"]
    m = kb.manifest
    with m.transaction() as con:
        targets = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, rows in tables.items():
            if table not in targets or table == "collections":
                continue
            cols = {r[1] for r in con.execute(f'PRAGMA table_info("{table}")')}
            for row in rows:
                row = dict(row)
                if table == "sources":
                    row["repo_path"] = f"repos/{row['name']}"  # read as this folder's (Manifest._source)
                if table == "meta" and (row.get("key") in ("live_collection", "kb_id")
                                        or str(row.get("key")).startswith("version:")):
                    continue  # kb_id: this folder's own, which its Chroma server knows it by (kb/store/server_owner.py)
                keep = [c for c in row if c in cols]
                columns = ", ".join(f'"{c}"' for c in keep)
                try:
                    con.execute(f'INSERT OR REPLACE INTO "{table}" ({columns}) VALUES ({", ".join("?" * len(keep))})',
                                [row[c] for c in keep])
                except sqlite3.Error as exc:
                    raise KBError(f"the snapshot's manifest table {table} does not fit this version: {exc}") from None
        con.execute("INSERT OR REPLACE INTO collections VALUES (?,?,?,?,?)",
                    (live, config["chunk_config"], config["embed_model"], "ready", time.time()))
        m.set_meta(con, "live_collection", live)
        m.set_meta(con, f"version:{live}", str(time.time_ns()))


def _rollback(kb: "KnowledgeBase", plan: dict, moved: list[Path] | None = None) -> bool:
    """Undo an import that did not commit; True when everything it made is gone."""
    ok = True
    for name in plan.get("staging", []) + plan.get("collections", []):
        try:
            if kb.index.find(name) is not None:
                kb.index.client.delete_collection(name)
        except Exception:  # noqa: BLE001 - e.g. the server went away: the pending file keeps the plan for next time
            ok = False
    repos_root = kb.settings.repos_path
    for path in moved if moved is not None else [repos_root / str(n) for n in plan.get("repos", [])]:
        shutil.rmtree(path, ignore_errors=True)
        ok = ok and not path.exists()
    return ok


def import_leftovers(kb: "KnowledgeBase") -> list[str]:
    """What a killed import left (its plan file, hidden staging collections, temporary folders), each named.

    `kb verify` said "healthy" and nothing more over them (an operator review); only the next import removed them.
    The caller holds the write lock: an import under way holds the same things, and is no leftover.
    """
    home = kb.settings.home
    out = [f"the import plan {PENDING}"] if (home / PENDING).is_file() else []
    out += [f"the staging collection {name}" for name in _staging(kb)]
    return out + sorted(f"the temporary folder {p.name}" for p in home.glob(f"{TEMP_PREFIX}*") if p.is_dir())


def recover(kb: "KnowledgeBase") -> None:
    """Remove what a killed import left (hidden staging collections, temporary folders); the caller holds the lock."""
    home = kb.settings.home
    pending = home / PENDING
    if pending.is_file():
        try:
            plan = json.loads(pending.read_text(encoding="utf-8"))
        except ValueError:
            plan = {}
        committed = bool(plan.get("collections")) and kb.manifest.live_collection == plan["collections"][0] \
            and bool(kb.manifest.sources())
        if committed:
            done = _rollback(kb, {"staging": plan.get("staging", [])}, moved=[])
        elif kb.manifest.sources() or kb.manifest.live_collection:
            done = _rollback(kb, {"staging": plan.get("staging", [])}, moved=[])  # the KB moved on: touch only staging
        else:
            done = _rollback(kb, plan)
        if done:
            pending.unlink(missing_ok=True)
    for leftover in home.glob(f"{TEMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    if not pending.exists():  # staging no plan names (one server serves one data folder: all of it is ours)
        for name in _staging(kb):
            with contextlib.suppress(Exception):  # noqa: BLE001 - the next recover tries again
                kb.index.client.delete_collection(name)


def _staging(kb: "KnowledgeBase") -> list[str]:
    """The store's import staging collections, by name."""
    return sorted(c.name for c in kb.index.client.list_collections() if c.name.startswith(STAGING_PREFIX))


def _write_json_durably(path: Path, data: dict) -> None:
    atomic.write_json(path, data, durable=True)
