"""The Chroma server path (KB_CHROMA_URL), held to the embedded store's standard, against a real `chroma run`.

Add, sync, search in every mode, re-chunk, drop a collection; then the server stops: every command exits 1 with one
line naming the server, and searching is an error, never an empty result; then it starts again on the same data,
and the same process (the dashboard's case) works without a restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from servers import free_port, stop, wait_for_http

from conftest import ROOT, base_settings
from kb.errors import KBError
from kb.search.engine import SearchEngine
from kb.search.hits import SearchOptions

CHROMA = Path(sys.executable).parent / "chroma"


class ChromaServer:
    """`chroma run` from the installed package, on 127.0.0.1; stop() and start() keep its data folder."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path, self.log, self.port = path, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(CHROMA), "run", "--path", str(self.path), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for_http(f"{self.url}/api/v2/heartbeat", self.proc, self.log, timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture
def chroma_server(tmp_path):
    if not CHROMA.is_file():
        pytest.fail(f"{CHROMA} is missing: chromadb installs it")
    server = ChromaServer(tmp_path / "chroma-server", tmp_path / "chroma.log")
    server.start()
    yield server
    server.stop()


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kb", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_server_path_works_fails_loudly_and_recovers(chroma_server, tmp_path, corpus, tiny_st_dir, tiny_embeddings):
    from kb.service import KnowledgeBase

    settings = base_settings(tmp_path / "home", embed_model=str(tiny_st_dir), embed_backend="torch",
                             chroma_url=chroma_server.url)
    kb = KnowledgeBase(settings, embeddings=tiny_embeddings)
    kb.add_source("lagent", str(corpus / "lagent.bundle"))
    rep = kb.sync()[0]
    assert not rep.error and rep.chunks_embedded > 0
    assert not (tmp_path / "home" / "chroma").exists()  # everything went to the server
    engine = SearchEngine(kb)
    for mode in ("dense", "bm25", "hybrid"):
        assert len(engine.search("How do I define a custom tool?", SearchOptions(k=3, mode=mode))) == 3
    first = kb.live()[0]
    out = kb.rechunk(kb.rechunk_config(size=300, overlap=30))
    assert out["chunks"] > 0 and kb.live()[0] != first
    kb.drop_collection(first)
    assert [c["name"] for c in kb.collections()] == [out["collection"]]
    assert engine.search("custom tool", SearchOptions(k=3))
    assert kb.verify()["healthy"]
    live = kb.live()[0]  # a server-side loss is found and repaired like an embedded one
    kb.index.passages(live).delete(where={"source": "lagent"})
    assert kb.verify()["totals"]["chunks_without_passages"] > 0
    assert kb.verify(repair=True)["healthy"]

    env = {**os.environ, "KB_HOME": str(tmp_path / "home"), "KB_CHROMA_URL": chroma_server.url,
           "KB_EMBED_MODEL": str(tiny_st_dir), "KB_EMBED_BACKEND": "torch"}
    assert cli(env, "search", "custom tool", "--json").returncode == 0

    chroma_server.stop()
    with pytest.raises(KBError, match=f"cannot reach the Chroma server at {chroma_server.url}"):
        engine.search("custom tool", SearchOptions(k=3))
    for mode in ("dense", "bm25"):
        with pytest.raises(KBError, match="cannot reach the Chroma server"):
            engine.search("custom tool", SearchOptions(k=3, mode=mode))
    with pytest.raises(KBError, match="cannot reach the Chroma server"):
        kb.sync()
    for args in (["search", "custom tool"], ["search", "custom tool", "--mode", "dense"], ["stats"], ["sync"],
                 ["collections"], ["rechunk", "--chunk-size", "200", "--chunk-overlap", "20"]):
        done = cli(env, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and chroma_server.url in lines[0], (args, done.stderr[-2000:])

    chroma_server.start()  # same data folder, same port
    hits = engine.search("How do I define a custom tool?", SearchOptions(k=3))  # same process, no restart
    assert len(hits) == 3 and hits[0].source == "lagent"
    assert kb.sync()[0].chunks_embedded == 0
    assert cli(env, "stats", "--json").returncode == 0


PAGES = [None, "chat", "retrieval_lab", "sources", "documents", "collections", "evaluation"]


def test_every_page_shows_the_outage_and_recovers(chroma_server, page_env, monkeypatch, corpus, shared_kb, open_page):
    """The dashboard process keeps running while the server is down and comes back with it."""
    from conftest import add_bundle

    monkeypatch.setenv("KB_CHROMA_URL", chroma_server.url)
    assert add_bundle(shared_kb(), corpus, "lagent").chunks_embedded > 0
    chroma_server.stop()
    for page in PAGES:
        at = open_page(page)
        errors = [e.value for e in at.error]
        assert any(chroma_server.url in e for e in errors), (page, errors)
    chroma_server.start()
    for page in PAGES:
        at = open_page(page)
        assert not at.error, (page, [e.value for e in at.error])
    lab = open_page("retrieval_lab")
    lab.text_input(key="lab_query").set_value("custom tool").run()
    assert not lab.error and not lab.exception
    assert any("lagent/" in m.value for m in lab.markdown)


def test_one_server_serves_one_data_folder(chroma_server, tmp_path, corpus, tiny_st_dir, tiny_embeddings):
    """An operator review: a second data folder on the same server shared the first's collection (same settings,
    same name), searched its documents, and `kb verify --repair` in it deleted the first's chunks."""
    from kb.service import KnowledgeBase
    from kb.store.server_owner import ID_KEY, OWNER, ServerOwnedElsewhere

    def make(name: str) -> KnowledgeBase:
        return KnowledgeBase(base_settings(tmp_path / name, embed_model=str(tiny_st_dir), embed_backend="torch",
                                           chroma_url=chroma_server.url), embeddings=tiny_embeddings)

    first = make("first")
    first.add_source("lagent", str(corpus / "lagent.bundle"))
    first.sync()
    chunks = first.stats()["chunks"]
    second = make("second")
    for call in (second.stats, lambda: second.verify(repair=True), lambda: second.upload({"a.md": b"# A\n"}, "n")):
        with pytest.raises(ServerOwnedElsewhere, match=f"belongs to the knowledge base in {tmp_path / 'first'}"):
            call()
    env = {**os.environ, "KB_HOME": str(tmp_path / "second"), "KB_CHROMA_URL": chroma_server.url,
           "KB_EMBED_MODEL": str(tiny_st_dir), "KB_EMBED_BACKEND": "torch"}
    done = cli(env, "verify", "--repair")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "belongs to" in done.stderr
    assert first.stats()["chunks"] == chunks and first.verify()["healthy"]  # nothing of the first's was touched
    assert [c["name"] for c in first.collections()] == [first.live()[0]]  # the claim is hidden from listings

    # a server used before the claim existed: the folder that records its collections claims it, another is refused
    owner_id = first.index.client.get_collection(OWNER).metadata[ID_KEY]
    first.index.client.delete_collection(OWNER)
    with pytest.raises(ServerOwnedElsewhere, match="holds collections that .* does not record"):
        make("third").stats()
    again = make("first")
    assert again.stats()["chunks"] == chunks
    assert again.index.client.get_collection(OWNER).metadata[ID_KEY] == owner_id


def test_a_server_lost_mid_sync_ends_the_sync_and_an_upload_or_pass_without_it_writes_nothing(
        chroma_server, tmp_path, corpus, tiny_st_dir, tiny_embeddings, monkeypatch):
    import httpx

    import kb.service as service
    from kb.jobs import FAILED, JobQueue
    from kb.store.index import ChromaUnreachable

    kb = service.KnowledgeBase(base_settings(tmp_path / "home", embed_model=str(tiny_st_dir), embed_backend="torch",
                                             chroma_url=chroma_server.url), embeddings=tiny_embeddings)
    kb.add_source("lagent", str(corpus / "lagent.bundle"))
    kb.add_source("InternLM", str(corpus / "InternLM.bundle"))
    tried = []

    def dies(ctx, src, *args, **kwargs):  # the server went away while the first source was being written
        tried.append(src.name)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    monkeypatch.setattr(service, "sync_source", dies)
    with pytest.raises(ChromaUnreachable, match=f"cannot reach the Chroma server at {chroma_server.url}"):
        kb.sync()
    assert len(tried) == 1  # it stopped there: the next source was not tried (and reported done) on a dead server
    monkeypatch.undo()

    chroma_server.stop()
    with pytest.raises(ChromaUnreachable):
        kb.upload({"notes.md": b"# Notes\n\nkept nowhere\n"}, "notes")
    assert not kb.manifest.has_source("notes") and not (tmp_path / "home" / "repos" / "notes").exists()
    job = JobQueue(kb, start=False).run_scheduled_now()  # nothing changed upstream: it still says the store is down
    assert job["state"] == FAILED and "cannot reach the Chroma server" in job["error"]


def test_a_server_that_stops_answering_is_an_error_within_the_timeout_not_a_hang(
        chroma_server, tmp_path, corpus, tiny_st_dir, tiny_embeddings):
    """chromadb's own client waits forever: a stopped server (SIGSTOP: it accepts, it never answers) held a search."""
    from kb.service import KnowledgeBase

    settings = base_settings(tmp_path / "home", embed_model=str(tiny_st_dir), embed_backend="torch",
                             chroma_url=chroma_server.url, chroma_timeout=2.0)
    kb = KnowledgeBase(settings, embeddings=tiny_embeddings)
    kb.add_source("lagent", str(corpus / "lagent.bundle"))
    assert not kb.sync()[0].error
    engine = SearchEngine(kb)
    assert len(engine.search("How do I define a custom tool?", SearchOptions(k=3))) == 3
    env = {**os.environ, "KB_HOME": str(tmp_path / "home"), "KB_CHROMA_URL": chroma_server.url,
           "KB_CHROMA_TIMEOUT": "2", "KB_EMBED_MODEL": str(tiny_st_dir), "KB_EMBED_BACKEND": "torch"}
    os.kill(chroma_server.proc.pid, signal.SIGSTOP)
    try:
        for mode in ("hybrid", "dense"):
            start = time.monotonic()
            with pytest.raises(KBError, match=f"Chroma server at {chroma_server.url} did not answer within 2 s"):
                engine.search("custom tool", SearchOptions(k=3, mode=mode))
            assert time.monotonic() - start < 30
        fresh = KnowledgeBase(settings, embeddings=tiny_embeddings)  # a process opening the store now: the CLI
        with pytest.raises(KBError, match="did not answer within 2 s"):
            fresh.stats()
        done = cli(env, "stats")
        assert done.returncode == 1 and "did not answer within 2 s" in done.stderr, done.stderr[-2000:]
    finally:
        os.kill(chroma_server.proc.pid, signal.SIGCONT)
    assert len(engine.search("How do I define a custom tool?", SearchOptions(k=3))) == 3  # the same process again
    assert cli(env, "stats", "--json").returncode == 0


def auth_proxy(upstream: str, user: str, password: str, prefix: str):
    """A reverse proxy in front of the server, as one is deployed: basic auth, and the server under a path."""
    import base64
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    seen: list[tuple[str, bool]] = []

    class Handler(BaseHTTPRequestHandler):
        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.path, self.headers.get("Authorization") == expected))
            if self.headers.get("Authorization") != expected or not self.path.startswith(prefix + "/"):
                self.send_response(401 if seen[-1][1] is False else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            got = httpx.request(self.command, upstream + self.path[len(prefix):], content=body,
                                headers={"Content-Type": self.headers.get("Content-Type") or "application/json"})
            self.send_response(got.status_code)
            self.send_header("Content-Type", got.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(got.content)))
            self.end_headers()
            self.wfile.write(got.content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_a_server_behind_a_proxy_gets_the_urls_path_and_credentials(
        chroma_server, tmp_path, corpus, tiny_st_dir, tiny_embeddings):
    """`http://user:pass@host/prefix`: both were dropped (chromadb takes a host), so such a server was unusable."""
    from kb.service import KnowledgeBase

    proxy, seen = auth_proxy(chroma_server.url, "kb", "s@cret", "/chroma")
    try:
        where = f"127.0.0.1:{proxy.server_address[1]}/chroma"
        kb = KnowledgeBase(base_settings(tmp_path / "home", embed_model=str(tiny_st_dir), embed_backend="torch",
                                         chroma_url=f"http://kb:s%40cret@{where}"), embeddings=tiny_embeddings)
        kb.add_source("lagent", str(corpus / "lagent.bundle"))
        assert not kb.sync()[0].error
        assert len(SearchEngine(kb).search("How do I define a custom tool?", SearchOptions(k=3))) == 3
        assert len(seen) > 5 and all(ok for _, ok in seen)

        wrong = KnowledgeBase(base_settings(tmp_path / "other", embed_model=str(tiny_st_dir), embed_backend="torch",
                                            chroma_url=f"http://kb:nope@{where}"), embeddings=tiny_embeddings)
        with pytest.raises(KBError, match="answered HTTP 401") as refused:
            wrong.stats()
        assert "nope" not in str(refused.value) and f"***@{where}" in str(refused.value)
    finally:
        proxy.shutdown()
