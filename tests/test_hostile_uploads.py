"""Hostile content in uploads: each case ends in bounded time and memory, is indexed
sensibly or skipped with a clear reason, leaks nothing, and leaves the other sources intact.

The cases (from the reliability issue): an XML entity bomb, an external entity, HTML
nested 200,000 deep, a 15 MB file on one line, a CSV 20,000 columns wide, NUL bytes,
Latin-1 text, an empty file and a file over the upload size limit.

Bounds are generous (the issue measured at most 16 s and 715 MB per case) so that they
hold on a loaded two-core machine; memory is the growth of this process's peak RSS,
which only ever grows, so a case can only be blamed for what it adds on top.
"""

from __future__ import annotations

import http.server
import resource
import threading
import time
from pathlib import Path

import pytest

from kb.errors import KBError
from kb.search.engine import SearchEngine
from kb.search.hits import SearchOptions

from conftest import git

TIME_LIMIT_S = 60
PEAK_GROWTH_LIMIT_MB = 1500
KEEP_SOURCE = "notes"
KEEP_PATH = "uploads/keep.md"
HOSTILE = "hostile"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bounded_upload(kb, files: dict[str, bytes], source: str = HOSTILE):
    """Upload, asserting the time and peak-memory bounds and that the sync reported no error."""
    rss0, t0 = peak_rss_mb(), time.monotonic()
    report = kb.upload(files, source)
    seconds, growth = time.monotonic() - t0, peak_rss_mb() - rss0
    assert seconds < TIME_LIMIT_S, f"upload took {seconds:.1f} s"
    assert growth < PEAK_GROWTH_LIMIT_MB, f"peak RSS grew by {growth:.0f} MB"
    assert not report.error, report.error
    return report


def all_stored_text(kb) -> str:
    """Every chunk's text and metadata, and every passage's metadata, of the live collection."""
    live = kb.live()[0]
    chunks = kb.index.get(live).get(include=["documents", "metadatas"])
    passages = kb.index.passages(live).get(include=["metadatas"])
    return "\n".join([*(d or "" for d in chunks["documents"]), *map(str, chunks["metadatas"]),
                      *map(str, passages["metadatas"])])


def row(kb, source: str, path: str):
    rows = [d for d in kb.documents(source) if d.path == path]
    assert len(rows) == 1, [d.path for d in kb.documents(source)]
    return rows[0]


def assert_skipped(kb, report, path: str, reason: str) -> None:
    """Skipped with the reason, in the report and in the manifest, and no chunk stored."""
    full = f"uploads/{path}"
    assert [s for s in report.skipped if s["path"] == full and reason in s["reason"]], report.skipped
    doc = row(kb, HOSTILE, full)
    assert doc.status == "skipped" and reason in doc.reason, doc
    assert kb.chunks_of(HOSTILE, full) == []


def snapshot(kb) -> dict:
    src = kb.manifest.source(KEEP_SOURCE)
    return {
        "chunks": sorted((c["id"], c["text"]) for c in kb.chunks_of(KEEP_SOURCE, KEEP_PATH)),
        "documents": kb.documents(KEEP_SOURCE),
        "head": git("rev-parse", "HEAD", cwd=Path(src.repo_path)),
        "indexed_commit": src.indexed_commit,
    }


@pytest.fixture
def kb(tiny_kb):
    """tiny_kb holding one normal upload in another source, whose state is checked after each case."""
    report = tiny_kb.upload({"keep.md": b"# Keep\n\nThe zebra quuxinator keeps its stripes.\n"}, KEEP_SOURCE)
    assert report.files_added == 1 and not report.error
    before = snapshot(tiny_kb)
    assert before["chunks"]
    yield tiny_kb
    assert snapshot(tiny_kb) == before, "the other source changed"
    # still found
    hits = SearchEngine(tiny_kb).search("zebra quuxinator", SearchOptions(k=3, mode="hybrid", source=KEEP_SOURCE))
    assert hits and (hits[0].source, hits[0].path) == (KEEP_SOURCE, KEEP_PATH)


# --- XML entity bomb ----------------------------------------------------------------------------

def billion_laughs(levels: int = 10) -> bytes:
    ents = ['<!ENTITY lol0 "lolbomb">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels + 1)]
    return ('<?xml version="1.0"?>\n<!DOCTYPE lolz [\n' + "\n".join(ents) + "\n]>\n"
            f"<lolz><intro>Safe intro text</intro><b>&lol{levels};</b></lolz>\n").encode()


def test_xml_entity_bomb_is_not_expanded(kb):
    report = bounded_upload(kb, {"bomb.xml": billion_laughs(10)})
    doc = row(kb, HOSTILE, "uploads/bomb.xml")
    # no expansion reached the index, whether the file was refused or indexed without its entities
    assert "lolbomb" not in all_stored_text(kb)
    if doc.status == "skipped":  # observed: lxml refuses it ("Maximum entity amplification factor exceeded")
        assert_skipped(kb, report, "bomb.xml", "could not read it")
    else:
        chunks = kb.chunks_of(HOSTILE, "uploads/bomb.xml")
        assert any("Safe intro text" in c["text"] for c in chunks)
        assert sum(len(c["text"]) for c in chunks) < 10_000


# --- external entity ----------------------------------------------------------------------------

class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        _Recorder.requests.append(self.path)
        body = b"HTTP-SECRET-7f3a9c"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_secret():
    _Recorder.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/secret", "HTTP-SECRET-7f3a9c"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_xml_external_entity_is_not_resolved(kb, tmp_path, http_secret, scheme):
    if scheme == "file":
        secret = "FILE-SECRET-2b8e51"
        target = tmp_path / "secret.txt"
        target.write_text(secret + "\n")
        url = target.as_uri()
    else:
        url, secret = http_secret
    xml = (f'<?xml version="1.0"?>\n<!DOCTYPE foo [<!ENTITY xxe SYSTEM "{url}">]>\n'
           "<foo><p>Visible paragraph</p><q>&xxe;</q></foo>\n").encode()
    report = bounded_upload(kb, {"xxe.xml": xml})
    assert secret not in all_stored_text(kb)
    assert all(secret not in d.reason for d in kb.documents())
    assert _Recorder.requests == []  # nothing was fetched
    doc = row(kb, HOSTILE, "uploads/xxe.xml")
    if doc.status == "indexed":  # observed: indexed, entity left unresolved
        assert any("Visible paragraph" in c["text"] for c in kb.chunks_of(HOSTILE, "uploads/xxe.xml"))
    else:
        assert_skipped(kb, report, "xxe.xml", "could not read it")


# --- HTML nested 200,000 deep -------------------------------------------------------------------

DEEP_HTML = (b"<html><body><p>Intro paragraph outside the nesting.</p>" + b"<div>" * 200_000
             + b"deep text here" + b"</div>" * 200_000 + b"<p>Trailing paragraph.</p></body></html>")


def test_html_nested_200000_deep_over_file_limit_is_skipped(kb):
    # 2.2 MB: over the default KB_MAX_FILE_BYTES, so it never reaches the parser
    assert len(DEEP_HTML) > kb.settings.max_file_bytes
    report = bounded_upload(kb, {"deep.html": DEEP_HTML})
    assert_skipped(kb, report, "deep.html", "too large")


def test_html_nested_200000_deep_is_parsed_in_bounds(kb):
    kb.settings = kb.settings.with_(max_file_bytes=4_000_000)  # let it reach unstructured/lxml
    report = bounded_upload(kb, {"deep.html": DEEP_HTML})
    doc = row(kb, HOSTILE, "uploads/deep.html")
    if doc.status == "indexed":
        # observed: lxml stops at its depth limit, so only the text before the nesting is kept
        texts = " ".join(c["text"] for c in kb.chunks_of(HOSTILE, "uploads/deep.html"))
        assert "Intro paragraph outside the nesting." in texts
        assert doc.chunks >= 1
    else:
        assert report.skipped and doc.reason


# --- one very long line -------------------------------------------------------------------------

def test_15mb_single_line_txt_is_skipped_as_too_large(kb):
    data = b"lorem ipsum dolor sit amet, " * (15_000_000 // 28)
    assert b"\n" not in data and len(data) > 14_000_000
    report = bounded_upload(kb, {"oneline.txt": data})
    assert_skipped(kb, report, "oneline.txt", "too large")
    assert f"{len(data):,} bytes" in row(kb, HOSTILE, "uploads/oneline.txt").reason


def test_900kb_single_line_md_under_limit_is_indexed(kb):
    data = b"The quick brown fox jumps over the lazy dog. " * 20_000
    assert b"\n" not in data and len(data) < kb.settings.max_file_bytes
    bounded_upload(kb, {"oneline.md": data})
    doc = row(kb, HOSTILE, "uploads/oneline.md")
    assert doc.status == "indexed", doc.reason
    chunks = kb.chunks_of(HOSTILE, "uploads/oneline.md")
    assert len(chunks) == doc.chunks > 1
    line = data.decode()
    for c in chunks:  # every chunk is a piece of the one line, cited as line 1
        assert c["line_start"] == c["line_end"] == 1
        assert c["text"] in line


def test_repeated_line_keeps_other_sources_dense_searchable(kb):
    """Hundreds of identical vectors cut Chroma's HNSW graph apart (hnswlib's duplicate-vector problem): before
    repeated chunks lost their passages, an exhaustive query returned 117-2,202 of 2,223 passages in 12 of 12 runs,
    and in 2 of 5 a dense search restricted to the other source returned nothing."""
    bounded_upload(kb, {"oneline.md": b"The quick brown fox jumps over the lazy dog. " * 20_000})
    doc = row(kb, HOSTILE, "uploads/oneline.md")
    passages = kb.index.passages(kb.live()[0])
    parents = {m["parent"] for m in passages.get(where={"path": "uploads/oneline.md"}, include=["metadatas"])["metadatas"]}
    assert doc.chunks > 100 and 1 <= len(parents) <= 3  # the repeats are found through their first copy
    assert kb.verify()["healthy"]
    query = kb.embeddings.embed_query("zebra quuxinator")
    everything = passages.query(query_embeddings=[query], n_results=passages.count(), include=[])
    assert len(everything["ids"][0]) == passages.count()  # every passage is reachable
    hits = SearchEngine(kb).search("zebra quuxinator", SearchOptions(k=3, mode="dense", source=KEEP_SOURCE))
    assert [(h.source, h.path) for h in hits][:1] == [(KEEP_SOURCE, KEEP_PATH)]
    # MMR reads the chunk collection, which still holds every repeat's vector: short graph answers are done exactly
    hits = SearchEngine(kb).search("zebra quuxinator", SearchOptions(k=3, mode="dense", mmr=True, source=KEEP_SOURCE))
    assert [(h.source, h.path) for h in hits][:1] == [(KEEP_SOURCE, KEEP_PATH)]


def test_a_graph_search_that_comes_back_short_is_done_exactly(kb, monkeypatch):
    """MMR and a configuration without passages read the chunk collection, where a repeated chunk's copies keep
    their identical vectors; when the graph search returns fewer records than the filter holds (what a graph cut
    apart by them does, silently), the engine searches the filter's records exactly instead."""
    from langchain_chroma import Chroma

    kb.upload({f"animal{i}.md": f"# Animal {i}\n\nThe {name} keeps its {part}.\n".encode()
               for i, (name, part) in enumerate([("zebra", "mane"), ("tiger", "stripes"), ("okapi", "legs"),
                                                 ("quokka", "smile")])}, "zoo")
    engine = SearchEngine(kb)
    mmr = SearchOptions(k=3, mode="dense", mmr=True)
    healthy = [(h.source, h.path, h.line_start) for h in engine.search("zebra quuxinator", mmr)]
    monkeypatch.setattr(Chroma, "similarity_search_with_relevance_scores", lambda self, *a, **kw: [])
    monkeypatch.setattr(Chroma, "max_marginal_relevance_search", lambda self, *a, **kw: [])
    exact = engine.search("zebra quuxinator", mmr)
    assert [(h.source, h.path, h.line_start) for h in exact] == healthy and len(exact) == 3
    within = engine.search("zebra quuxinator", SearchOptions(k=3, mode="dense", mmr=True, source=KEEP_SOURCE))
    assert [(h.source, h.path) for h in within] == [(KEEP_SOURCE, KEEP_PATH)]
    assert 0 < within[0].score <= 1  # the cosine, as the wrapper's relevance score gives it


def test_long_line_without_spaces_is_cut_into_bounded_chunks(kb):
    """A tokenizer may count a run without spaces as one token; the chunker must still cut it (merge_small)."""
    data = (bytes(range(256)) * 200).hex().encode()[:100_000]  # e.g. a hex dump on one line
    bounded_upload(kb, {"hexline.md": b"# Dump\n\n" + data + b"\n"})
    doc = row(kb, HOSTILE, "uploads/hexline.md")
    assert doc.status == "indexed", doc.reason
    chunks = kb.chunks_of(HOSTILE, "uploads/hexline.md")
    size = kb.live()[1].size  # 400 (tokens); the splitter itself cut 400-character pieces
    longest = max(len(c["text"]) for c in chunks)
    assert longest <= 50 * size, f"{len(chunks)} chunk(s), the longest {longest:,} characters"


# --- CSV 20,000 columns wide --------------------------------------------------------------------

def test_csv_20000_columns_is_indexed(kb):
    header = ",".join(f"col{i}" for i in range(20_000))
    values = ",".join(f"v{i}" for i in range(20_000))
    report = bounded_upload(kb, {"wide.csv": f"{header}\n{values}\n".encode()})
    doc = row(kb, HOSTILE, "uploads/wide.csv")
    assert doc.status == "indexed" and doc.loader == "unstructured", doc.reason
    assert not report.skipped
    words = set(" ".join(c["text"] for c in kb.chunks_of(HOSTILE, "uploads/wide.csv")).split())
    assert {"col0", "col19999", "v0", "v19999"} <= words


# --- NUL bytes, Latin-1, empty ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nul.txt", "nul.md"])
def test_nul_bytes_are_skipped_as_binary(kb, name):
    report = bounded_upload(kb, {name: b"hello\x00world\n\x00\x01\x02binary tail\n"})
    assert_skipped(kb, report, name, "binary file")


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.md"])
def test_latin1_text_is_skipped_as_not_utf8(kb, name):
    data = "Café crème, über Straße und Bücher.\n".encode("latin-1")
    report = bounded_upload(kb, {name: data})
    assert_skipped(kb, report, name, "not UTF-8")


@pytest.mark.parametrize("data", [b"", b"  \n\n\t\n"], ids=["zero-bytes", "whitespace"])
def test_empty_file_is_skipped(kb, data):
    report = bounded_upload(kb, {"empty.md": data})
    assert_skipped(kb, report, "empty.md", "empty file")


def test_hostile_files_in_one_upload_do_not_stop_the_good_one(kb):
    report = bounded_upload(kb, {
        "good.md": b"# Good\n\nA perfectly ordinary paragraph about pelicans.\n",
        "nul.txt": b"a\x00b\n",
        "latin1.txt": "café\n".encode("latin-1"),
        "empty.md": b"",
        "bomb.xml": billion_laughs(10),
    })
    assert {s["path"] for s in report.skipped} == {"uploads/nul.txt", "uploads/latin1.txt", "uploads/empty.md",
                                                   "uploads/bomb.xml"}
    assert row(kb, HOSTILE, "uploads/good.md").status == "indexed"
    assert any("pelicans" in c["text"] for c in kb.chunks_of(HOSTILE, "uploads/good.md"))


# --- over the upload size limit -----------------------------------------------------------------

@pytest.mark.parametrize("limit", [1_000, None], ids=["small-limit", "default-20MB"])
def test_over_upload_limit_is_refused_before_anything_is_written(kb, limit):
    if limit is not None:
        kb.settings = kb.settings.with_(upload_max_bytes=limit)
    limit = kb.settings.upload_max_bytes
    sources_before = [s.name for s in kb.sources()]
    stats_before = kb.stats()
    big = b"a" * (limit + 1)

    t0 = time.monotonic()
    with pytest.raises(KBError, match=rf"over the upload limit of {limit:,} \(KB_UPLOAD_MAX_BYTES\)"):
        kb.upload({"big.md": big}, "newsrc")
    # a good file in the same batch is not written either, into a new source or an existing one
    for source in ("newsrc", KEEP_SOURCE):
        with pytest.raises(KBError, match="over the upload limit"):
            kb.upload({"fine.md": b"# Fine\n\nsmall\n", "big.md": big}, source)
    assert time.monotonic() - t0 < TIME_LIMIT_S

    assert [s.name for s in kb.sources()] == sources_before
    assert not kb.manifest.has_source("newsrc")
    assert not (kb.settings.repos_path / "newsrc").exists()
    assert [d.path for d in kb.documents(KEEP_SOURCE)] == [KEEP_PATH]
    keep_repo = Path(kb.manifest.source(KEEP_SOURCE).repo_path)
    assert git("ls-files", cwd=keep_repo).split() == ["uploads/keep.md"]
    assert git("status", "--porcelain", cwd=keep_repo) == ""
    assert kb.stats() == stats_before
