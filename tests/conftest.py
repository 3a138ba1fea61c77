"""Shared fixtures: the corpus bundles, embedding models loaded once per session.

Two real embedding models are used:
- the product default (the packaged multilingual USE), for retrieval and answers;
- a tiny randomly initialised BERT saved to a temp folder and loaded through
  ``KB_EMBED_MODEL`` (the production "local folder" path of the
  sentence-transformers backends), for tests that index the whole corpus and
  count embedding calls. The packaged MiniLM is tested in test_embeddings.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# `make test` runs two workers on two cores: each worker's models get its share of the cores, set before torch is
# imported. A model on both threads waits at every step for the core the other worker holds (llama.cpp spins at its
# barriers): test_reset_between_questions took 48 s beside the other worker, 4 s alone (README "Settings",
# KB_LLM_THREADS). Settings built in a test read TEST_THREADS; subprocesses inherit the environment.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KB_LLM_THREADS"):
        os.environ.setdefault(var, str(TEST_THREADS))

import core.settings  # noqa: E402,F401  (offline environment first)
from core.settings import Settings, load_settings  # noqa: E402
from langchain_core.embeddings import Embeddings

pytest_plugins = ["llm_fixtures", "page_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("KB_CORPUS", ROOT.parent / "shared" / "corpus"))
BUNDLES = ["InternLM", "xtuner", "lmdeploy", "opencompass", "lagent", "InternLM-XComposer"]
# One int8 ONNX export per machine, shared by every KB_HOME the tests make (subprocesses inherit it).
# AppTests would each start loading the LLM in the background; the tests of preloading turn it on themselves.
os.environ.setdefault("KB_LLM_PRELOAD", "false")
os.environ.setdefault("KB_MODEL_CACHE", str(Path.home() / ".cache" / "kb-tests" / "onnx"))


class CountingEmbeddings(Embeddings):
    """Wraps a real model and counts the texts it is asked to embed."""

    def __init__(self, inner: Embeddings) -> None:
        self.inner = inner
        self.documents_embedded = 0
        self.calls = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        self.documents_embedded += len(texts)
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)

    def reset(self) -> None:
        self.documents_embedded = self.calls = 0


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "xtuner.bundle").is_file():
        pytest.fail(f"shared corpus not found at {CORPUS} (set KB_CORPUS)")
    return CORPUS


def add_bundle(kb, corpus: Path, name: str):
    """Add a shared bundle with its gitee web URL and sync it; returns the sync report, checked."""
    kb.add_source(name, str(corpus / f"{name}.bundle"), web_url=f"https://gitee.com/InternLM/{name}")
    report = kb.sync([name])[0]
    assert not report.error, report.error
    return report


def base_settings(home: Path, **changes) -> Settings:
    env = {"KB_MODEL_CACHE": os.environ["KB_MODEL_CACHE"]}
    return load_settings(env=env, secrets_path=Path("/nonexistent")).with_(home=home, **changes)


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory) -> Path:
    """A real, tiny sentence-transformers model (random weights) with MiniLM's tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.embeddings import packaged_model_dir

    out = tmp_path_factory.mktemp("models") / "tiny-st"
    tok = AutoTokenizer.from_pretrained(packaged_model_dir())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    raw = out.parent / "tiny-bert"
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = Transformer(str(raw), max_seq_length=256)
    model = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")], device="cpu")
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_st_dir) -> CountingEmbeddings:
    from core.embeddings import load_embeddings

    return CountingEmbeddings(load_embeddings(base_settings(Path("/tmp"), embed_model=str(tiny_st_dir), embed_backend="torch")))


@pytest.fixture(scope="session")
def default_embeddings(tmp_path_factory) -> CountingEmbeddings:
    """The real default embedding model, loaded once per session."""
    from core.embeddings import load_embeddings

    return CountingEmbeddings(load_embeddings(base_settings(tmp_path_factory.mktemp("embed-home"))))


@pytest.fixture
def tiny_kb(tmp_path, tiny_st_dir, tiny_embeddings):
    """A fresh knowledge base on the tiny model."""
    from kb.service import KnowledgeBase

    tiny_embeddings.reset()
    kb = KnowledgeBase(base_settings(tmp_path / "home", embed_model=str(tiny_st_dir), embed_backend="torch"),
                       embeddings=tiny_embeddings)
    yield kb
    kb.close()


def indexed_once(factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A KB_HOME that ``build(home)`` fills once per test run, copied for the caller.

    The two xdist workers both asked for the same costly index (the xtuner docs through the default model: about
    35 s of embedding each); the first one to ask builds it, and every worker, that one too, works on its own copy,
    whose sources point at its own clones (as a snapshot import points them).
    """
    import shutil
    import sqlite3

    from filelock import FileLock

    base = factory.getbasetemp()
    master = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"indexed-{name}"
    with FileLock(str(master) + ".lock"):
        if not (master / ".built").exists():
            shutil.rmtree(master, ignore_errors=True)
            master.mkdir()
            build(master)
            (master / ".built").touch()
    home = factory.mktemp(name)
    shutil.copytree(master, home, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".built", ".write.lock"))
    with sqlite3.connect(home / "manifest.sqlite") as con:
        for (source,) in con.execute("SELECT name FROM sources").fetchall():
            con.execute("UPDATE sources SET repo_path = ? WHERE name = ?",
                        (str((home / "repos" / source).resolve()), source))
    con.close()
    return home


def indexed_kb(factory: pytest.TempPathFactory, corpus: Path, embeddings, bundle: str):
    """A knowledge base with one shared bundle synced through ``embeddings``, indexed once per run."""
    from kb.service import KnowledgeBase

    def build(home: Path) -> None:
        kb = KnowledgeBase(base_settings(home), embeddings=embeddings)
        add_bundle(kb, corpus, bundle)
        kb.close()

    return KnowledgeBase(base_settings(indexed_once(factory, f"{bundle}-home", build)), embeddings=embeddings)


@pytest.fixture(scope="session")
def xtuner_kb(tmp_path_factory, corpus, default_embeddings):
    """The xtuner docs indexed with the real default model, shared by retrieval and answer tests."""
    return indexed_kb(tmp_path_factory, corpus, default_embeddings, "xtuner")


@pytest.fixture(scope="session")
def lagent_kb(tmp_path_factory, corpus, default_embeddings):
    """The lagent docs (the smallest bundle) with the real default model."""
    return indexed_kb(tmp_path_factory, corpus, default_embeddings, "lagent")


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def history_remote(tmp_path, corpus):
    """Shared by the sync and watcher tests: a bare repo made from xtuner-history.bundle, with main moved back to commit 1."""
    remote = tmp_path / "xtuner-remote.git"
    git("clone", "-q", "--bare", str(corpus / "xtuner-history.bundle"), str(remote))
    new = git("rev-parse", "main", cwd=remote)
    old = git("rev-parse", "main~1", cwd=remote)
    git("update-ref", "refs/heads/main", old, cwd=remote)
    return remote, old, new
