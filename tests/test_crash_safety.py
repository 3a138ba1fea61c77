"""Nothing lost, nothing written by a preview: kill -9 at any moment of a sync or re-chunk converges to a clean run.

Real processes: ``python -m kb sync`` / ``kb rechunk`` run as subprocesses on the shared bundles (with the tiny
embedding model, through the production local-folder path), are SIGKILLed at moments read from their own progress
on stderr, run again, and the resulting chunk ids, passage ids and manifest are compared with a clean run's.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT

SOURCES = ["lagent", "InternLM"]


def kb_env(home: Path, tiny_st_dir: Path) -> dict[str, str]:
    # one torch thread: the tests run on two workers on two cores, and the tiny model gains nothing from a second
    # thread that the other worker is using (this file and test_sync.py on two workers: 222 s, 195 s with every
    # process on one thread)
    return {**os.environ, "KB_HOME": str(home), "KB_EMBED_MODEL": str(tiny_st_dir), "KB_EMBED_BACKEND": "torch",
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def kb(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kb", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def add_sources(env: dict, corpus: Path) -> None:
    for name in SOURCES:
        out = kb(env, "add", name, str(corpus / f"{name}.bundle"), "-q")
        assert out.returncode == 0, out.stderr


def run_and_kill(env: dict, args: list[str], marker, grace: float = 0.0) -> str:
    """Start ``kb ARGS --progress``; SIGKILL it once its stderr satisfies ``marker`` (then after ``grace`` s)."""
    proc = subprocess.Popen([sys.executable, "-m", "kb", *args, "--progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []

    def read() -> None:
        while True:
            ch = proc.stderr.read(256)
            if not ch:
                return
            seen.append(ch)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if marker("".join(seen)):
            time.sleep(grace)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill point ({proc.returncode}): {text[-2000:]}"
    return text


def state(home: Path, tiny_st_dir: Path) -> dict:
    """Chunk ids, passage ids (with their parents) and the manifest, as comparable sets."""
    code = (
        "import json,sys\n"
        "from kb.service import KnowledgeBase\n"
        "kb = KnowledgeBase()\n"
        "live = kb.manifest.live_collection\n"
        "coll, pcoll = kb.index.get(live), kb.index.passages(live)\n"
        "chunks = coll.get(include=['metadatas'])\n"
        "passages = pcoll.get(include=['metadatas'])\n"
        "print(json.dumps({'live': live,\n"
        " 'chunks': sorted(chunks['ids']),\n"
        " 'chunk_meta': sorted(json.dumps({k: v for k, v in m.items()}, sort_keys=True) for m in chunks['metadatas']),\n"
        " 'passages': sorted(f\"{i} {m['parent']}\" for i, m in zip(passages['ids'], passages['metadatas'])),\n"
        " 'documents': sorted(json.dumps(d.__dict__, sort_keys=True) for d in kb.manifest.documents()),\n"
        " 'sources': sorted(f'{s.name} {s.indexed_commit} {s.indexed_collection}' for s in kb.sources()),\n"
        " 'collections': sorted(f\"{n} {r['status']}\" for n, r in kb.manifest.collection_rows().items())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=kb_env(home, tiny_st_dir), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus, tiny_st_dir) -> dict:
    """One uninterrupted sync, then a re-chunk: what every killed run must converge to."""
    home = tmp_path_factory.mktemp("clean")
    env = kb_env(home, tiny_st_dir)
    add_sources(env, corpus)
    out = kb(env, "sync", "--json")
    assert out.returncode == 0, out.stderr
    synced = state(home, tiny_st_dir)
    assert len(synced["chunks"]) > 100 and len(synced["passages"]) > len(synced["chunks"])
    out = kb(env, "rechunk", "--chunk-size", "300", "--chunk-overlap", "30", "--json")
    assert out.returncode == 0, out.stderr
    return {"sync": synced, "rechunk": state(home, tiny_st_dir)}


def stored_chunks_then(text: str) -> bool:
    """The chunk collection's records are written (its store bar names it); the passages are not yet."""
    return any("kb-" in line and "store" in line and "kbp-" not in line for line in text.replace("\r", "\n").splitlines())


KILL_POINTS = {
    "while embedding chunks": (lambda t: "embed" in t, 0.0),
    "between the chunk writes and the passage writes": (stored_chunks_then, 0.0),
    "after the vectors, before the manifest": (lambda t: "kbp-" in t, 0.4),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_sync_converges_to_a_clean_sync(point, clean, tmp_path, corpus, tiny_st_dir):
    env = kb_env(tmp_path / "home", tiny_st_dir)
    add_sources(env, corpus)
    marker, grace = KILL_POINTS[point]
    run_and_kill(env, ["sync"], marker, grace)
    again = kb(env, "sync", "--json")
    assert again.returncode == 0, again.stderr
    assert state(tmp_path / "home", tiny_st_dir) == clean["sync"]
    idle = kb(env, "sync", "--json")  # and it stays so: nothing more to do
    assert '"chunks_embedded": 0' in idle.stdout and '"passages_embedded": 0' in idle.stdout


def test_killed_rechunk_converges_and_keeps_the_live_collection(clean, tmp_path, corpus, tiny_st_dir):
    home = tmp_path / "home"
    env = kb_env(home, tiny_st_dir)
    add_sources(env, corpus)
    assert kb(env, "sync", "-q").returncode == 0
    before = state(home, tiny_st_dir)
    run_and_kill(env, ["rechunk", "--chunk-size", "300", "--chunk-overlap", "30"], stored_chunks_then)
    assert state(home, tiny_st_dir)["live"] == before["live"]  # the half-built collection never went live
    out = kb(env, "rechunk", "--chunk-size", "300", "--chunk-overlap", "30", "--json")
    assert out.returncode == 0, out.stderr
    assert state(home, tiny_st_dir) == clean["rechunk"]


def test_killed_upload_converges_to_a_clean_upload(tmp_path, tiny_st_dir):
    """An upload is a commit, then a sync: killed in the sync, the next sync of the source finishes it."""
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\n" + "".join(f"Paragraph {i} about uploads and crash safety.\n\n" for i in range(400)))
    clean_env, env = kb_env(tmp_path / "clean", tiny_st_dir), kb_env(tmp_path / "home", tiny_st_dir)
    assert kb(clean_env, "upload", str(notes), "--source", "notes", "-q").returncode == 0
    run_and_kill(env, ["upload", str(notes), "--source", "notes"], stored_chunks_then)
    again = kb(env, "sync", "notes", "--json")
    assert again.returncode == 0, again.stderr
    got, want = state(tmp_path / "home", tiny_st_dir), state(tmp_path / "clean", tiny_st_dir)
    # the upload's commit is made at upload time, so the two sources differ in their commit only
    strip = lambda st: {k: v for k, v in st.items() if k not in ("sources", "documents", "chunk_meta")}  # noqa: E731
    assert strip(got) == strip(want) and len(got["documents"]) == len(want["documents"]) == 1


def tree(home: Path) -> dict[str, str]:
    """Every file under KB_HOME with its content hash.

    Left out: git's clones (a preview must fetch to diff, which moves the clone's branch and nothing else),
    and SQLite's ``-shm`` files, the shared-memory index of its write-ahead log that readers update too.
    """
    out = {}
    for p in sorted(home.rglob("*")):
        rel = p.relative_to(home)
        if p.is_file() and rel.parts[0] != "repos" and p.name != ".write.lock" and not p.name.endswith("-shm"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def chroma_ids(kb_) -> dict[str, list[str]]:
    return {c.name: sorted(c.get(include=[])["ids"]) for c in kb_.index.client.list_collections()}


def test_dry_run_writes_nothing(tiny_kb, corpus):
    home = tiny_kb.settings.home
    tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    # a fresh knowledge base: no live pointer, no collection may appear
    ids, files = chroma_ids(tiny_kb), tree(home)
    preview = tiny_kb.sync(["lagent"], dry_run=True)[0]
    assert preview.files_added > 0 and preview.chunks_embedded > 0 and preview.passages_embedded > 0
    assert tiny_kb.embeddings.documents_embedded == 0
    assert tree(home) == files and chroma_ids(tiny_kb) == ids == {}
    assert tiny_kb.manifest.live_collection is None and tiny_kb.manifest.collection_rows() == {}
    # an indexed one with work pending: the preview changes nothing either
    tiny_kb.sync(["lagent"])
    tiny_kb.add_source("InternLM", str(corpus / "InternLM.bundle"))
    ids, files = chroma_ids(tiny_kb), tree(home)
    preview = tiny_kb.sync(dry_run=True)
    assert [r.files_added > 0 for r in preview] == [True, False]  # InternLM (new) and lagent (up to date)
    assert tree(home) == files and chroma_ids(tiny_kb) == ids


def test_sessions_opening_together_share_one_store_client(tmp_path):
    """Two browser sessions opening the dashboard at once made chromadb's client twice, in parallel, and one of them
    saw it half built ("'RustBindingsAPI' object has no attribute 'bindings'"): a traceback on the page."""
    import threading

    from core.settings import Settings
    from kb.store.index import make_client

    for trial in range(3):
        settings = Settings(home=tmp_path / str(trial))
        barrier, errors = threading.Barrier(8), []

        def open_page() -> None:
            barrier.wait()
            try:
                make_client(settings).heartbeat()
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_page) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
