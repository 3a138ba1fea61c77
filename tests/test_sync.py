"""Sync, re-chunk and collections, on the shared bundles as real git remotes."""

from __future__ import annotations

import git as gitpython
import pytest

from core.embeddings import token_counter
from kb.ingest import sources
from kb.ingest.chunking import Chunk, ChunkConfig
from kb.errors import KBError
from kb.ingest.loaders import SkipFile, load_document
from kb.ingest.passages import split_passages
from kb.store.index import is_passage_collection

from conftest import BUNDLES, git


def test_every_bundle_indexes_with_exact_lines(tiny_kb, corpus):
    for name in BUNDLES:
        tiny_kb.add_source(name, str(corpus / f"{name}.bundle"))
    reports = {r.name: r for r in tiny_kb.sync()}
    assert all(not r.error for r in reports.values())
    assert all(r.files_added > 0 and r.chunks_embedded > 0 for r in reports.values())
    stats = tiny_kb.stats()
    embedded = sum(r.chunks_embedded for r in reports.values())
    assert embedded + sum(r.passages_embedded for r in reports.values()) == tiny_kb.embeddings.documents_embedded
    # identical texts (e.g. a README shared by two repos) are embedded once and reused
    assert stats["sources"] == 6 and stats["chunks"] == embedded + sum(r.chunks_reused for r in reports.values())

    skipped = {(s, d.path): d.reason for s in BUNDLES for d in tiny_kb.manifest.documents(s) if d.status == "skipped"}
    assert "symlink" in skipped[("xtuner", ".codex/AGENTS.md")]
    merges = [k for k in skipped if k[0] == "InternLM-XComposer" and k[1].endswith("merges.txt")]
    assert merges and "too large" in skipped[merges[0]]
    xcomposer = gitpython.Repo(tiny_kb.manifest.source("InternLM-XComposer").repo_path)
    with pytest.raises(SkipFile, match="data file"):  # skipped by the data rule too, whatever the size limit
        load_document(merges[0][1], (xcomposer.head.commit.tree / merges[0][1]).data_stream.read(), 10**8)

    # every chunk's line range holds its text, in the file as stored in git
    coll = tiny_kb.index.get(tiny_kb.live()[0])
    got = coll.get(include=["documents", "metadatas"])
    files: dict[tuple[str, str], list[str]] = {}
    for text, meta in zip(got["documents"], got["metadatas"]):
        key = (meta["source"], meta["path"])
        if key not in files:
            src = tiny_kb.manifest.source(meta["source"])
            blob = gitpython.Repo(src.repo_path).commit(meta["commit"]).tree / meta["path"]
            files[key] = load_document(meta["path"], blob.data_stream.read(), 10**8).text.split("\n")
        window = "\n".join(files[key][meta["line_start"] - 1 : meta["line_end"]])
        assert text in window, (key, meta["line_start"], meta["line_end"])
    assert ("InternLM-XComposer", "evaluation/README.md") in files  # the CRLF file
    assert_passages_cover(tiny_kb, got)

    # a second sync embeds nothing
    tiny_kb.embeddings.reset()
    again = tiny_kb.sync()
    assert sum(r.chunks_embedded for r in again) == 0 and tiny_kb.embeddings.documents_embedded == 0


def assert_passages_cover(kb, chunks: dict) -> None:
    """Every chunk has the passages its text splits into, they keep no text, and no passage outlives its chunk."""
    live, config = kb.live()
    passages = kb.index.passages(live).get(include=["documents", "metadatas"])
    assert set(passages["documents"]) == {None}  # the text is the chunk's (kb/passages.py)
    stored: dict[str, set[str]] = {}
    for m in passages["metadatas"]:
        stored.setdefault(m["parent"], set()).add(m["text_hash"])
    copies: dict[tuple, set[str]] = {}  # a chunk repeating another of its document word for word has none
    for cid, m in zip(chunks["ids"], chunks["metadatas"]):
        copies.setdefault((m["source"], m["path"], m["text_hash"]), set()).add(cid)
    assert set(stored) <= set(chunks["ids"])
    assert all(len(ids & set(stored)) == 1 for ids in copies.values())
    token_len = token_counter(kb.settings) if config.unit == "tokens" else None
    for cid, text, m in zip(chunks["ids"], chunks["documents"], chunks["metadatas"]):
        if cid not in stored:
            continue
        chunk = Chunk(id=cid, text=text, embed_text="", text_hash="", source=m["source"], path=m["path"], commit="",
                      line_start=0, line_end=0, heading=m["heading"], chunk_config="", embed_model="", url="")
        assert stored[cid] == {p.text_hash for p in split_passages([chunk], config, token_len)}


def test_incremental_sync_embeds_only_changed_files(tiny_kb, history_remote):
    remote, old, new = history_remote
    tiny_kb.add_source("xtuner", str(remote))
    first = tiny_kb.sync(["xtuner"])[0]
    assert first.commit_after == old and first.chunks_embedded > 0
    git("update-ref", "refs/heads/main", new, cwd=remote)

    coll = tiny_kb.index.get(tiny_kb.live()[0])
    ids_before = sorted(coll.get(include=[])["ids"])
    tiny_kb.embeddings.reset()
    preview = tiny_kb.sync(["xtuner"], dry_run=True)[0]
    assert (preview.files_added, preview.files_modified, preview.files_deleted) == (17, 12, 0)
    # the preview embedded nothing and wrote nothing (tests/test_crash_safety.py compares all of KB_HOME)
    assert tiny_kb.embeddings.documents_embedded == 0 and sorted(coll.get(include=[])["ids"]) == ids_before
    assert tiny_kb.manifest.source("xtuner").indexed_commit == old

    before = coll.get(where={"source": "xtuner"}, include=["metadatas"])
    stored = {m["text_hash"] for m in before["metadatas"]}
    tiny_kb.embeddings.reset()
    rep = tiny_kb.sync(["xtuner"])[0]
    assert (rep.files_added, rep.files_modified, rep.files_deleted) == (17, 12, 0)
    assert rep.commit_before == old and rep.commit_after == new
    assert rep.chunks_embedded + rep.passages_embedded == tiny_kb.embeddings.documents_embedded
    assert (rep.chunks_embedded, rep.passages_embedded) == (preview.chunks_embedded, preview.passages_embedded)
    assert 0 < rep.passages_embedded

    changed = set(rep.added) | set(rep.modified)
    after = coll.get(where={"source": "xtuner"}, include=["metadatas"])
    new_chunks = [m for m in after["metadatas"] if m["path"] in changed]
    expected = {m["text_hash"] for m in new_chunks} - stored
    assert rep.chunks_embedded == len(expected) > 0
    assert rep.chunks_embedded < len(after["ids"]) / 3  # only the changed files, not the whole repo
    assert all(m["commit"] == new for m in new_chunks)
    unchanged_ids = {i for i, m in zip(before["ids"], before["metadatas"]) if m["path"] not in changed}
    assert unchanged_ids <= set(after["ids"])
    assert tiny_kb.manifest.source("xtuner").indexed_commit == new
    assert_passages_cover(tiny_kb, coll.get(include=["documents", "metadatas"]))  # those of replaced chunks are gone

    tiny_kb.embeddings.reset()
    idle = tiny_kb.sync(["xtuner"])[0]
    assert idle.chunks_embedded == 0 == tiny_kb.embeddings.documents_embedded
    assert idle.commit_before == idle.commit_after == new


def test_deleted_file_removes_its_chunks(tiny_kb, tmp_path, corpus):
    work = tmp_path / "work"
    git("clone", "-q", str(corpus / "lagent.bundle"), str(work))
    git("config", "user.email", "t@t", cwd=work)
    git("config", "user.name", "t", cwd=work)
    tiny_kb.add_source("lagent", str(work))
    tiny_kb.sync(["lagent"])
    victim = next(d.path for d in tiny_kb.manifest.documents("lagent") if d.status == "indexed" and d.chunks)
    git("rm", "-q", victim, cwd=work)
    git("commit", "-qm", "rm", cwd=work)
    rep = tiny_kb.sync(["lagent"])[0]
    assert rep.files_deleted == 1 and rep.chunks_deleted > 0 and rep.chunks_embedded == 0
    assert tiny_kb.chunks_of("lagent", victim) == [] and tiny_kb.manifest.document("lagent", victim) is None
    assert not tiny_kb.index.passages(tiny_kb.live()[0]).get(where={"path": victim}, include=[])["ids"]


def test_rechunk_switches_only_when_complete(tiny_kb, corpus):
    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    tiny_kb.sync()
    live, _ = tiny_kb.live()
    count = tiny_kb.stats()["chunks"]

    class Boom(Exception):
        pass

    real = tiny_kb._embeddings
    tiny_kb._embeddings = type("Failing", (), {"embed_documents": lambda self, t: (_ for _ in ()).throw(Boom())})()
    with pytest.raises(Boom):
        tiny_kb.rechunk(ChunkConfig(size=300, overlap=0))
    tiny_kb._embeddings = real
    assert tiny_kb.live()[0] == live and tiny_kb.stats()["chunks"] == count
    half = [c for c in tiny_kb.collections() if not c["live"]]
    assert half and half[0]["status"] == "interrupted"  # marked building, and nobody is: its re-chunk failed
    with pytest.raises(KBError, match="not complete"):
        tiny_kb.set_live(half[0]["name"])

    out = tiny_kb.rechunk(ChunkConfig(size=300, overlap=0))
    assert out["previous"] == live and tiny_kb.live()[0] == out["collection"] != live
    assert tiny_kb.stats()["chunks"] == out["chunks"] > count
    names = {c["name"]: c for c in tiny_kb.collections()}
    assert names[live]["live"] is False and names[out["collection"]]["live"] is True
    assert names[out["collection"]]["dimension"] == 32
    with pytest.raises(KBError, match="live collection"):
        tiny_kb.drop_collection(out["collection"])
    tiny_kb.drop_collection(live)
    assert live not in tiny_kb.index.names() and tiny_kb.index.passages(live) is None  # its passages went with it
    assert not any(is_passage_collection(n) for n in tiny_kb.index.names())  # passages are not listed as collections
    rep = tiny_kb.sync()[0]
    assert rep.chunks_embedded == 0  # the new live collection is complete


def test_the_same_branch_of_the_same_remote_is_not_added_twice(tiny_kb, corpus, monkeypatch):
    """Added again under another name, every hit came back twice (a browser review)."""
    first = tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    for branch in (None, first.branch):  # found before cloning: named, or the remote's default (browser review, 13)
        with monkeypatch.context() as m:
            m.setattr(sources, "clone", lambda *a, **k: pytest.fail("cloned a twin before refusing it"))
            with pytest.raises(KBError, match=r"is already the source 'lagent': a second copy would return every hit"):
                tiny_kb.add_source("twin", str(corpus / "lagent.bundle"), branch=branch)
        assert not tiny_kb.manifest.has_source("twin") and not (tiny_kb.settings.repos_path / "twin").exists()
    # a remote that doesn't say its default branch: refused after the clone, which left nothing behind
    monkeypatch.setattr(sources, "remote_head_branch", lambda url: None)
    with pytest.raises(KBError, match=r"is already the source 'lagent'"):
        tiny_kb.add_source("twin", str(corpus / "lagent.bundle"))
    assert not tiny_kb.manifest.has_source("twin") and not (tiny_kb.settings.repos_path / "twin").exists()


def test_the_remote_head_branch_is_read_before_cloning(tmp_path, corpus):
    """A server's HEAD symref names it; a bundle has none, and the one branch at HEAD's commit is the one followed."""
    assert sources.remote_head_branch(str(corpus / "lagent.bundle")) == "main"
    work = tmp_path / "work"
    git("init", "-q", "-b", "trunk", str(work))
    (work / "a.md").write_text("# A\n")
    git("-C", str(work), "add", "a.md")
    git("-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    git("-C", str(work), "branch", "other")  # at the same commit: only the symref tells them apart
    assert sources.remote_head_branch(str(work)) == "trunk"
    assert sources.remote_head_branch(str(tmp_path / "nothing-here")) is None


def test_remove_source_deletes_its_chunks(tiny_kb, corpus):
    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    tiny_kb.add_source("InternLM", str(corpus / "InternLM.bundle"))
    tiny_kb.sync()
    removed = tiny_kb.remove_source("lagent")
    assert removed > 0
    coll = tiny_kb.index.get(tiny_kb.live()[0])
    assert not coll.get(where={"source": "lagent"}, include=[])["ids"]
    passages = tiny_kb.index.passages(tiny_kb.live()[0])
    assert not passages.get(where={"source": "lagent"}, include=[])["ids"] and passages.count() > 0
    assert coll.count() > 0 and not tiny_kb.manifest.has_source("lagent")
    assert not (tiny_kb.settings.repos_path / "lagent").exists()
    from kb import log as runlog

    (rec,) = runlog.read(tiny_kb.settings, kinds=["remove"])  # the log says what went, as it says what came
    assert rec["source"] == "lagent" and rec["chunks_removed"] == removed
    assert f"source lagent removed, {removed} chunks with it" in runlog.describe(rec)


def test_sync_without_sources_is_a_clear_error(tiny_kb):
    with pytest.raises(KBError, match="no sources"):
        tiny_kb.sync()
    with pytest.raises(KBError, match="no source named"):
        tiny_kb.sync(["nope"])


def test_a_new_embedding_model_asks_for_a_rebuild_that_works(tiny_kb, corpus, default_embeddings):
    """Switching models (e.g. upgrading to the multilingual default) keeps the old collection and says how to rebuild."""
    from kb.search.engine import SearchEngine
    from kb.service import KnowledgeBase

    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    assert not tiny_kb.sync(["lagent"])[0].error
    old = tiny_kb.live()[0]
    kb = KnowledgeBase(tiny_kb.settings.with_(embed_model="", embed_backend=""), embeddings=default_embeddings)
    with pytest.raises(KBError, match=r"kb rechunk --chunk-size 400 --chunk-overlap 40"):
        kb.live()
    out = kb.rechunk(ChunkConfig(**{**kb.live_config().__dict__, "size": 400, "overlap": 40}))
    assert out["previous"] == old and out["chunks"] > 0
    assert kb.live()[0] == out["collection"] != old and old in [c["name"] for c in kb.collections()]
    assert SearchEngine(kb).search("Lagent 工具")


def test_a_branch_deleted_upstream_is_a_fetch_error_not_unchanged(tiny_kb, history_remote):
    """The clone fetches without pruning, so a followed branch deleted on the remote stayed where it was and every
    sync (and `kb watch`) reported the source unchanged, healthy, forever (a review). It is that source's error now,
    its chunks kept; the remote's other branches still sync."""
    remote, old, new = history_remote
    git("branch", "feat", old, cwd=remote)
    tiny_kb.add_source("feat", str(remote), branch="feat")
    tiny_kb.add_source("xtuner", str(remote))
    assert not any(r.error for r in tiny_kb.sync())
    chunks = tiny_kb.stats()["chunks"]
    git("branch", "-D", "feat", cwd=remote)
    git("update-ref", "refs/heads/main", new, cwd=remote)
    reports = {r.name: r for r in tiny_kb.sync()}
    assert "branch 'feat' no longer exists on" in reports["feat"].error
    assert not reports["xtuner"].error and reports["xtuner"].commit_after == new
    assert tiny_kb.manifest.source("feat").indexed_commit == old
    assert tiny_kb.stats()["chunks"] > chunks // 2  # feat's chunks stay searchable
    with pytest.raises(KBError, match="no longer exists"):
        tiny_kb.fetch_source("feat")


def test_a_clone_whose_folder_is_gone_is_cloned_anew_by_the_next_sync(tiny_kb, history_remote):
    """A review: after a snapshot imported without its clones while the remote was away, `kb sync` kept saying
    "remove the source and add it again" (embedding all of it anew) and `kb verify --repair` couldn't mend it.
    The next sync clones it from its remote and goes on from the indexed commit, embedding nothing it has."""
    import shutil

    remote, old, new = history_remote
    tiny_kb.add_source("xtuner", str(remote))
    assert not tiny_kb.sync()[0].error
    chunks = tiny_kb.stats()["chunks"]
    clone = tiny_kb.manifest.source("xtuner").repo_path
    shutil.rmtree(clone)
    assert not tiny_kb.verify()["healthy"]  # the indexed commit is missing with its clone
    moved = remote.with_name("away.git")
    remote.rename(moved)  # the remote away too: that source's error, its chunks kept
    report = tiny_kb.sync()[0]
    assert "is missing and cannot be cloned anew" in report.error and tiny_kb.stats()["chunks"] == chunks
    moved.rename(remote)
    git("update-ref", "refs/heads/main", new, cwd=remote)
    tiny_kb.embeddings.reset()
    report = tiny_kb.sync()[0]
    assert not report.error and (report.commit_before, report.commit_after) == (old, new)
    assert report.chunks_reused > 0  # went on from the indexed commit: only the changed files embedded
    assert tiny_kb.verify()["healthy"] and tiny_kb.read_document("xtuner", "README.md").text


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A security review: a multi-gigabyte file in a repository was read whole into memory, then found too large."""
    from kb.ingest.sync import read_blob

    repo = gitpython.Repo.init(tmp_path / "r")
    (tmp_path / "r" / "big.md").write_text("x" * 5000)
    repo.index.add(["big.md"])
    commit = repo.index.commit("big", skip_hooks=True)
    assert read_blob(commit, "big.md", 5000)[0] == b"x" * 5000
    monkeypatch.setattr(gitpython.Blob, "data_stream", property(lambda self: pytest.fail("read before it was sized")))
    assert read_blob(commit, "big.md", 1000) == (None, "too large: 5,000 bytes > limit 1,000 (KB_MAX_FILE_BYTES)")


def test_reports_are_summed_once_for_every_page_that_says_what_a_sync_did():
    from kb.ingest.sync import totals

    reports = [{"name": "a", "error": "", "chunks_embedded": 3, "chunks_reused": 2, "chunks_deleted": 1,
                "passages_embedded": 9}, {"name": "b", "error": "fetch failed", "chunks_embedded": 0}]
    assert totals(reports) == {"synced": 1, "failed": ["b"], "chunks_embedded": 3, "chunks_reused": 2,
                               "chunks_deleted": 1, "passages_embedded": 9}
    assert totals([]) == {"synced": 0, "failed": [], "chunks_embedded": 0, "chunks_reused": 0, "chunks_deleted": 0,
                          "passages_embedded": 0}
