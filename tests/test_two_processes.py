"""One data folder, two processes: the dashboard's store stays right while the CLI (or ``kb watch``) writes to it.

chromadb's embedded client loads a collection's vector graph into the process once and never looks at the disk
again, so a dashboard left open while ``kb sync`` ran in a terminal searched the graph it had loaded: new chunks
were never found, and ids another process had deleted failed its next write ("Error finding id").
"""

from __future__ import annotations

import pytest
from conftest import git
from test_crash_safety import kb, kb_env

from kb.search.engine import SearchEngine
from kb.search.hits import SearchOptions
from kb.store.index import VectorIndex

FIRST = b"# Zebras\n\nThe quuxinator paints the zebra stripes every spring.\n"
SECOND = b"# Giraffes\n\nThe flibbertigibbet measures giraffe necks in the autumn.\n"


def paths(engine: SearchEngine, query: str) -> set[str]:
    return {h.path.removeprefix("uploads/") for h in engine.search(query, SearchOptions(mode="dense", k=5))}


def test_chunks_another_process_wrote_are_searched(tiny_kb, tiny_st_dir, tmp_path):
    tiny_kb.upload({"zebras.md": FIRST}, "notes")
    engine = SearchEngine(tiny_kb)
    assert paths(engine, "zebra stripes") == {"zebras.md"}  # the graph is loaded into this process
    (tmp_path / "giraffes.md").write_bytes(SECOND)
    env = kb_env(tiny_kb.settings.home, tiny_st_dir)
    out = kb(env, "upload", str(tmp_path / "giraffes.md"), "--source", "notes", "-q")
    assert out.returncode == 0, out.stderr
    assert paths(engine, "giraffe necks") == {"zebras.md", "giraffes.md"}
    assert tiny_kb.stats()["chunks"] == 2


def test_chunks_another_process_deleted_are_not_searched_or_written(tiny_kb, tiny_st_dir, tmp_path):
    tiny_kb.upload({"zebras.md": FIRST}, "notes")
    tiny_kb.upload({"giraffes.md": SECOND}, "more")
    engine = SearchEngine(tiny_kb)
    assert paths(engine, "zebra stripes") == {"zebras.md", "giraffes.md"}
    out = kb(kb_env(tiny_kb.settings.home, tiny_st_dir), "remove", "more", "-q")
    assert out.returncode == 0, out.stderr
    assert paths(engine, "zebra stripes") == {"zebras.md"}
    report = tiny_kb.upload({"okapis.md": b"# Okapis\n\nThe okapi hides in the forest.\n"}, "notes")
    assert not report.error
    assert paths(engine, "okapi forest") == {"zebras.md", "okapis.md"}


def test_a_snapshot_after_another_process_synced_a_new_commit(tiny_kb, tiny_st_dir, history_remote, tmp_path):
    """The review's case: the dashboard synced and searched, `kb sync` took the remote's next commit in a terminal,
    and the dashboard's snapshot export failed with "Error finding id" (reproduced with the reopen turned off)."""
    remote, old, new = history_remote
    tiny_kb.add_source("xtuner", str(remote))
    assert not tiny_kb.sync()[0].error
    engine = SearchEngine(tiny_kb)
    assert paths(engine, "how to install xtuner")
    git("update-ref", "refs/heads/main", new, cwd=remote)
    out = kb(kb_env(tiny_kb.settings.home, tiny_st_dir), "sync", "-q")
    assert out.returncode == 0, out.stderr
    exported = tiny_kb.export_snapshot(tmp_path / "snap.tar.gz")
    assert exported["chunks"] == tiny_kb.stats()["chunks"] > 0
    assert tiny_kb.manifest.source("xtuner").indexed_commit == new and tiny_kb.verify()["healthy"]


def test_a_search_whose_store_is_reopened_under_it_runs_again(tiny_kb, monkeypatch):
    """Another thread may reopen the store (another process wrote) while a search holds a collection of the old
    client: chromadb then fails with "'RustBindingsAPI' object has no attribute 'bindings'"; the search runs again."""
    tiny_kb.upload({"zebras.md": FIRST}, "notes")
    engine = SearchEngine(tiny_kb)
    assert paths(engine, "zebra stripes") == {"zebras.md"}
    real, calls = SearchEngine._dense_passages, []

    def reopened_under_it(self, pcoll, *args, **kwargs):
        calls.append(pcoll)
        if len(calls) == 1:
            self.kb.index.reopen()  # as another thread would, between reading the collection and querying it
        return real(self, pcoll, *args, **kwargs)

    monkeypatch.setattr(SearchEngine, "_dense_passages", reopened_under_it)
    assert paths(engine, "zebra stripes") == {"zebras.md"}
    assert len(calls) == 2 and calls[0] is not calls[1]


def test_a_page_read_whose_store_is_reopened_under_it_runs_again(tiny_kb, monkeypatch):
    """The Collections page's record browser (and a document's chunks) read a collection the same way: a reopen by
    another thread between taking the collection and reading it failed the page once; it reads again now."""
    tiny_kb.upload({"zebras.md": FIRST}, "notes")
    live = tiny_kb.live()[0]
    real, calls = VectorIndex.get, []

    def reopened_under_it(self, name):
        coll = real(self, name)
        calls.append(coll)
        if len(calls) == 1:
            self.reopen()  # as another thread would, after this read took the collection
        return coll

    monkeypatch.setattr(VectorIndex, "get", reopened_under_it)
    rows = tiny_kb.records(live)["rows"]
    assert [r["path"] for r in rows] == ["uploads/zebras.md"] and len(calls) == 2
    calls.clear()
    assert [c["path"] for c in tiny_kb.chunks_of("notes", "uploads/zebras.md")] == ["uploads/zebras.md"]


def test_a_read_that_fails_on_a_client_nobody_reopened_is_raised(tiny_kb, monkeypatch):
    """Only a reopen under the read earns a second try: the same error otherwise is a bug to see, once."""
    tiny_kb.upload({"zebras.md": FIRST}, "notes")
    calls = []

    def broken(self, name):
        calls.append(name)
        raise AttributeError("'RustBindingsAPI' object has no attribute 'bindings'")

    monkeypatch.setattr(VectorIndex, "get", broken)
    with pytest.raises(AttributeError):
        tiny_kb.records(tiny_kb.live()[0])
    assert len(calls) == 1
