"""Fixtures for the page tests (AppTest) and the browser test.

Register with ``pytest_plugins = ["page_fixtures"]`` in tests/conftest.py (or
``pytest -p page_fixtures``). The pages reach the knowledge base, the models
and the retriever only through ``pages/_resources.py`` (``st.cache_resource``),
which keys each on the settings it depends on: a test that points ``KB_HOME``
at a fresh folder gets a fresh knowledge base, while the embedding model and
the LLM stay loaded once for the whole session.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import add_bundle

ROOT = Path(__file__).resolve().parent.parent
HOME_PY = ROOT / "Home.py"


# What a developer's .streamlit/secrets.toml might change: the environment wins over it.
BASE_ENV = {
    "KB_ADMIN_PASSWORD": "", "KB_CHROMA_URL": "", "KB_RERANKER_PATH": "", "KB_LLM": "llamacpp",
    "KB_RETRIEVAL_MODE": "hybrid", "KB_TOP_K": "3", "KB_SNAPSHOT_EVERY": "0",
}


def llm_vars(gguf: Path) -> dict[str, str]:
    """The packaged GGUF with short, greedy answers."""
    return {"KB_LLM_GGUF": str(gguf), "KB_LLM_MAX_TOKENS": "48", "KB_LLM_TEMPERATURE": "0"}


def _base_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BASE_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def page_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_st_dir: Path) -> Path:
    """A fresh, empty KB_HOME indexed with the tiny sentence-transformers model; returns the home."""
    home = tmp_path / "home"
    _base_env(monkeypatch)
    monkeypatch.setenv("KB_HOME", str(home))
    monkeypatch.setenv("KB_EMBED_MODEL", str(tiny_st_dir))
    return home


@pytest.fixture
def llm_env(monkeypatch: pytest.MonkeyPatch, default_gguf_path: Path) -> Path:
    """The packaged GGUF with short, greedy answers (the model itself loads once per session)."""
    for name, value in llm_vars(default_gguf_path).items():
        monkeypatch.setenv(name, value)
    return default_gguf_path


def _forget_user_data(home: Path) -> None:
    """Conversations and evaluation runs are what a test's user made: none may leak into another test."""
    for folder in ("conversations", "evals"):
        shutil.rmtree(home / folder, ignore_errors=True)


@pytest.fixture
def xtuner_env(monkeypatch: pytest.MonkeyPatch, xtuner_kb, llm_env):
    """KB_HOME of the session's xtuner knowledge base (real default embedding model), with no conversations or
    evaluation runs left by another test (the index is shared, being costly; what users make is not)."""
    _base_env(monkeypatch)
    home = xtuner_kb.settings.home
    _forget_user_data(home)
    monkeypatch.setenv("KB_HOME", str(home))
    monkeypatch.delenv("KB_EMBED_MODEL", raising=False)
    yield home
    _forget_user_data(home)


@pytest.fixture
def shared_kb():
    """The knowledge base the pages see (the same cached object), for set-up and checks."""
    from pages import _resources as resources

    return lambda: resources.knowledge_base()


@pytest.fixture
def lagent_env(page_env: Path, corpus: Path, shared_kb) -> Path:
    """page_env with the lagent bundle added and synced (through the same KB the pages use)."""
    kb = shared_kb()
    report = add_bundle(kb, corpus, "lagent")
    assert report.chunks_embedded > 0, report
    return page_env


@pytest.fixture
def open_page() -> Callable:
    """``open_page("sources")``: a fresh session (AppTest) on Home.py, switched to pages/<name>.py."""
    from streamlit.testing.v1 import AppTest

    def _open(page: str | None = None, timeout: float = 60):
        at = AppTest.from_file(str(HOME_PY), default_timeout=timeout)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if page:
            at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return _open
