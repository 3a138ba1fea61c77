"""The BM25 side saved on disk: read back by the next process, never used when it is stale or damaged."""

import logging

import chromadb
import numpy as np
import pytest

from kb.search import lexical
from kb.search.bm25 import BM25Matrix
from kb.search.engine import SearchEngine
from kb.search.hits import SearchOptions
from kb.words import tokenize

TEXTS = ["LMDeploy serves models with TurboMind", "XTuner 支持 LoRA 和 QLoRA 微调", "OpenCompass 评测 大模型",
         "turbomind kv cache int8", "lagent agents use tools"]


class CountingCollection:
    """A real Chroma collection that counts the full reads (``get``) made of it."""

    def __init__(self, coll) -> None:
        self.coll, self.gets = coll, 0

    def get(self, **kwargs):
        self.gets += 1
        return self.coll.get(**kwargs)

    def count(self) -> int:
        return self.coll.count()


@pytest.fixture
def coll(tmp_path):
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    c = client.create_collection("kb_test")
    c.add(ids=[f"c{i}" for i in range(len(TEXTS))], documents=TEXTS, embeddings=[[float(i), 1.0] for i in range(len(TEXTS))],
          metadatas=[{"bm25": " ".join(tokenize(t)), "source": "s" if i % 2 else "t", "path": f"p{i}.md",
                      "parent": f"chunk{i // 2}"} for i, t in enumerate(TEXTS)])
    return CountingCollection(c)


def test_a_saved_matrix_scores_as_the_one_it_was_saved_from():
    docs = [tokenize(t) for t in TEXTS]
    built = BM25Matrix(docs)
    again = BM25Matrix.from_state(built.state())
    for query in (["turbomind"], tokenize("LoRA 微调"), ["nothing"]):
        assert np.array_equal(built.scores(query), again.scores(query))
    assert again.vocab == built.vocab and again.max_idf(["int8"]) == built.max_idf(["int8"])


def test_the_next_process_reads_the_copy_instead_of_chroma(coll, tmp_path):
    folder = tmp_path / "cache"
    first = lexical.read_or_build(coll, "kb_test", "7", True, folder)
    assert coll.gets == 1 and len(list(folder.glob("*.npz"))) == 1
    second = lexical.read_or_build(coll, "kb_test", "7", True, folder)
    assert coll.gets == 1, "read from the file, not from Chroma"
    assert second.ids == first.ids and second.parents == first.parents == ["chunk0", "chunk0", "chunk1", "chunk1",
                                                                           "chunk2"]
    assert list(second.sources) == list(first.sources) and list(second.paths) == list(first.paths)
    assert second.matrix.top(["turbomind"], 3) == first.matrix.top(["turbomind"], 3)
    assert np.array_equal(second.of_source("s"), first.of_source("s"))
    assert list(second.owners.names) == ["s", "t"] and list(second.owners.sizes) == [2, 3]
    chunks = lexical.read_or_build(coll, "kb_test", "7", False, folder)  # the chunks' side is a file of its own
    assert coll.gets == 2 and chunks.parents == [] and len(list(folder.glob("*.npz"))) == 2


def test_a_new_version_or_count_is_built_again_and_replaces_the_old_copy(coll, tmp_path):
    folder = tmp_path / "cache"
    lexical.read_or_build(coll, "kb_test", "7", False, folder)
    lexical.read_or_build(coll, "kb_test", "8", False, folder)  # a sync changed the collection
    assert coll.gets == 2
    assert [p.name for p in folder.glob("*.npz")] == ["kb_test.chunks.8.npz"], "the old version is removed"
    coll.coll.add(ids=["c9"], documents=["new"], embeddings=[[9.0, 1.0]],
                  metadatas=[{"bm25": "new", "source": "s", "path": "p9.md"}])
    grown = lexical.read_or_build(coll, "kb_test", "8", False, folder)  # the same version, but not the same records
    assert coll.gets == 3 and grown.ids[-1] == "c9"
    assert lexical.read_or_build(coll, "kb_test", "8", False, folder).ids == grown.ids and coll.gets == 3


def test_a_files_name_is_among_its_records_words(tmp_path):
    """A bare list of requirements holds no word saying what it is; its file's name does (blind32: lagent's
    optional dependencies, found by no mode while BM25 read the stored words alone)."""
    assert lexical.path_words("requirements/optional.txt") == ["optional"]
    assert lexical.path_words("docs/en/get_started/installation.md") == ["installation"]
    assert lexical.path_words("docs/zh_cn/get_started/quick-start.md") == ["quick", "start"]
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    c = client.create_collection("kb_paths")
    lists = {"requirements/optional.txt": "lmdeploy>=0.2.5\nvllm>=0.3.3\npillow", "docs/agents.md": "lagent agents",
             "README.md": "lagent installs with pip"}
    c.add(ids=list(lists), documents=list(lists.values()), embeddings=[[1.0, float(i)] for i in range(len(lists))],
          metadatas=[{"bm25": " ".join(tokenize(t)), "source": "lagent", "path": p} for p, t in lists.items()])
    lex = lexical.read_collection(c, "1", False)
    (row, score), = lex.matrix.top(["optional"], 3)
    assert lex.ids[row] == "requirements/optional.txt" and score > 0
    assert [lex.ids[r] for r, _ in lex.matrix.top(["readme"], 3)] == ["README.md"]


def test_a_copy_of_an_older_format_is_built_again(coll, tmp_path, monkeypatch):
    """A copy saved before the file names were words (format 1) would search without them until the next sync."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(lexical, "FORMAT", 1)
    lexical.read_or_build(coll, "kb_test", "7", False, folder)
    monkeypatch.setattr(lexical, "FORMAT", 2)
    again = lexical.read_or_build(coll, "kb_test", "7", False, folder)
    assert coll.gets == 2 and "p0" in again.matrix.vocab
    assert lexical.read_or_build(coll, "kb_test", "7", False, folder).ids == again.ids and coll.gets == 2


@pytest.mark.parametrize("damage", [b"", b"not a zip file", None])
def test_a_damaged_copy_is_built_again_and_overwritten(coll, tmp_path, caplog, damage):
    folder = tmp_path / "cache"
    built = lexical.read_or_build(coll, "kb_test", "7", False, folder)
    (path,) = folder.glob("*.npz")
    raw = path.read_bytes()
    path.write_bytes(damage if damage is not None else raw[: len(raw) // 2])
    with caplog.at_level(logging.WARNING, logger="kb.search.lexical"):
        again = lexical.read_or_build(coll, "kb_test", "7", False, folder)
    assert coll.gets == 2 and again.ids == built.ids
    assert "building it again" in caplog.text
    assert lexical.load(path, "7", len(TEXTS)) is not None, "the copy was written again, whole"


def test_an_unwritable_cache_costs_the_build_only(coll, tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="kb.search.lexical"):
        lex = lexical.read_or_build(coll, "kb_test", "7", False, blocker / "bm25")
    assert lex.ids == [f"c{i}" for i in range(len(TEXTS))] and "not written" in caplog.text


def test_a_second_engine_searches_from_the_saved_copy_and_a_sync_is_seen(tiny_kb):
    tiny_kb.upload({"zebra.md": b"# Zebra\n\nquuxinator zebra stripes\n", "horse.md": b"# Horse\n\nno stripes\n",
                    "lion.md": b"# Lion\n\na mane\n"}, "notes")
    collection = tiny_kb.live()[0]
    first = SearchEngine(tiny_kb)
    first.warm()  # reads both sides, as the dashboard's preload and `kb ask` do
    assert first.search("quuxinator", SearchOptions(k=1, mode="bm25"))[0].path == "uploads/zebra.md"
    saved = sorted(p.name for p in (tiny_kb.settings.cache_path / "bm25").glob("*.npz"))
    assert len(saved) == 2, "chunks and passages"
    second = SearchEngine(tiny_kb)
    assert second.lexical(collection).ids == first.lexical(collection).ids
    tiny_kb.upload({"okapi.md": b"# Okapi\n\nflibbertigibbet okapi\n"}, "notes")
    hits = SearchEngine(tiny_kb).search("flibbertigibbet", SearchOptions(k=1, mode="bm25"))
    assert hits and hits[0].path == "uploads/okapi.md", "a new version, not the saved copy of the old one"
    now = sorted(p.name for p in (tiny_kb.settings.cache_path / "bm25").glob("*.npz"))
    (old,), (new,) = ([n for n in names if ".chunks." in n] for names in (saved, now))
    assert new != old, "the chunks' copy of the new version replaced the old one"
