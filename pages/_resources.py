"""The one place that wraps shared resources in ``st.cache_resource`` (UI layer, beside the pages).

Every page and every browser session gets the same knowledge base, embedding
model, search engine and LLM: they load lazily, once per process, with a
spinner the first time something needs them. It sits in ``pages/`` because
it is Streamlit: ``core/`` and ``kb/`` never import Streamlit, so the CLI and
the tests run the very same knowledge base without it.

Each resource is cached under the settings it depends on (the embedding model
under ``embed_*``, the LLM under ``llm_*``/``openai_*``, the knowledge base
under the rest), so pointing ``KB_HOME`` elsewhere opens another knowledge
base but keeps the one loaded embedding model and LLM.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, fields

import streamlit as st
from langchain_core.embeddings import Embeddings

from core.errors import UserError
from core.settings import Settings, load_settings

# Every setting that changes the loaded embedding model (backend, folder, runtime cache, device, batch).
_EMBED_FIELDS = tuple(f.name for f in fields(Settings) if f.name.startswith("embed_")) + ("model_cache",)
_LLM_FIELDS = tuple(f.name for f in fields(Settings) if f.name.startswith(("llm", "openai_")))
_SECRET_FIELDS = ("admin_password", "openai_api_key")
_SCHEDULE_FIELDS = ("sync_every", "snapshot_every", "snapshot_keep")  # retune the job queue, not replace it


def settings() -> Settings:
    """The current settings (environment over secrets.toml); cheap, read on every call."""
    return load_settings()


def _key(s: Settings, names: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> str:
    """A stable cache key over some settings (hashed: secrets never sit in it in clear)."""
    picked = {k: v for k, v in asdict(s).items() if (names is None or k in names) and k not in exclude}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:24]


@st.cache_resource(show_spinner=False)
def _registry() -> dict:
    """What has been loaded in this process, and how long it took (for the Home page)."""
    return {}


def _record(kind: str, key: str, started: float, label: str) -> None:
    _registry()[(kind, key)] = {"label": label, "seconds": round(time.perf_counter() - started, 2), "at": time.time()}


def _in_script() -> bool:
    """True in a script thread; LangChain runs chain steps in worker threads, which have no page to draw on."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    return get_script_run_ctx(suppress_warning=True) is not None


def _loading(message: str, needed: bool):
    """A spinner while something loads, only where a page can show it."""
    import contextlib

    return st.spinner(message) if needed and _in_script() else contextlib.nullcontext()


def _note(name: str, obj: object) -> None:
    """Remember in the session which object it was handed (diagnostics; the tests compare them)."""
    if _in_script():
        st.session_state.setdefault("_kb_resources", {})[name] = id(obj)


# ---------------------------------------------------------------------------- embedding model


@st.cache_resource(show_spinner=False)
def _embeddings(key: str, _settings: Settings) -> Embeddings:
    from core.embeddings import load_embeddings, model_name

    t0 = time.perf_counter()
    model = load_embeddings(_settings)
    _record("embeddings", key, t0, model_name(_settings))
    return model


def embeddings(s: Settings | None = None) -> Embeddings:
    """The loaded embedding model shared by every session."""
    s = s or settings()
    key = _key(s, _EMBED_FIELDS)
    with _loading("Loading the embedding model (first use in this server)…", ("embeddings", key) not in _registry()):
        model = _embeddings(key, s)
    _note("embeddings", model)
    return model


class SharedEmbeddings(Embeddings):
    """Stands in for the model inside the knowledge base and loads it on the first embed.

    Opening the dashboard never loads the model; the first search or sync does,
    once per process, under the spinner of :func:`embeddings`.
    """

    def __init__(self, s: Settings) -> None:
        self._settings = s

    def _model(self) -> Embeddings:
        return embeddings(self._settings)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._model().embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self._model().embed_query(text)


# ---------------------------------------------------------------------------- knowledge base and retriever


@st.cache_resource(show_spinner=False)
def _knowledge_base(key: str, _settings: Settings):
    from kb.service import KnowledgeBase

    return KnowledgeBase(_settings, embeddings=SharedEmbeddings(_settings))


def knowledge_base(s: Settings | None = None):
    """The knowledge base of the configured ``KB_HOME``; its model loads on first embed."""
    s = s or settings()
    kb = _knowledge_base(_key(s, exclude=_LLM_FIELDS + _SECRET_FIELDS), s)
    _note("knowledge_base", kb)
    return kb


@st.cache_resource(show_spinner=False)
def _search_engine(key: str, _settings: Settings):
    from kb.search.engine import SearchEngine

    return SearchEngine(knowledge_base(_settings))


def search_engine(s: Settings | None = None):
    """The retriever (dense, BM25 and hybrid) over the live collection, shared by every session."""
    s = s or settings()
    engine = _search_engine(_key(s, exclude=_LLM_FIELDS + _SECRET_FIELDS), s)
    _note("search_engine", engine)
    return engine


# ---------------------------------------------------------------------------- chat model


@st.cache_resource(show_spinner=False)
def _chat_model(key: str, _settings: Settings):
    from core.llm import build_chat_model, describe_llm

    t0 = time.perf_counter()
    llm = build_chat_model(_settings)  # LLMError/GGUFError propagate and are not cached
    _record("llm", key, t0, describe_llm(_settings))
    return llm


def chat_model(s: Settings | None = None, spinner: bool = True):
    """The chat LLM shared by every session (llama.cpp serialises calls with a lock); ``spinner=False`` for a page
    that shows its own (the chat's, with the time: two stacked spinners said the same, a browser review)."""
    s = s or settings()
    key = _key(s, _LLM_FIELDS)
    with _loading("Loading the language model (first use in this server)…",
                  spinner and ("llm", key) not in _registry()):
        llm = _chat_model(key, s)
    _note("chat_model", llm)
    return llm


def preload(s: Settings | None = None) -> None:
    """Start loading the LLM (and the embedding model and search engine) in the background, once per server and settings.

    Called on the first script run of any page, so a first question finds the
    model loaded, or partly loaded: the chat waits for the rest and says so.
    ``KB_LLM_PRELOAD=false`` turns it off (the tests do, but for the ones that test it).
    """
    try:
        s = s or settings()
    except UserError:  # bad settings: the page says so
        return
    if not s.llm_preload:
        return
    key = _key(s, _LLM_FIELDS)
    with _preload_lock:
        if key in _preloading:
            return
        _preloading.add(key)

    def load() -> None:
        from kb.answer.chain import prime_answer_prompt

        try:
            _embeddings(_key(s, _EMBED_FIELDS), s)
            search_engine(s).warm()  # the BM25 matrices and READMEs a first search would read
            prime_answer_prompt(_chat_model(key, s))  # the first question then skips reading the rules
        except Exception:  # noqa: BLE001 - the chat reports the same error, with its message, when asked
            with _preload_lock:
                _preloading.discard(key)

    threading.Thread(target=load, name="kb-preload", daemon=True).start()


_preloading: set[str] = set()
_preload_lock = threading.Lock()


# ---------------------------------------------------------------------------- status


def preloading(s: Settings | None = None) -> bool:
    """Whether the background load (:func:`preload`) of the current settings' models has started: Home said "not
    loaded yet: loads on the first question" while it ran at full CPU (a browser review)."""
    s = s or settings()
    with _preload_lock:
        return _key(s, _LLM_FIELDS) in _preloading


def loaded(s: Settings | None = None) -> dict[str, dict | None]:
    """Which models this process has loaded for the current settings (None: not yet)."""
    s = s or settings()
    reg = _registry()
    return {
        "embeddings": reg.get(("embeddings", _key(s, _EMBED_FIELDS))),
        "llm": reg.get(("llm", _key(s, _LLM_FIELDS))),
    }


# ---------------------------------------------------------------------------- background jobs


@st.cache_resource(show_spinner=False)
def _job_queue(key: str, _settings: Settings):
    from kb.jobs import JobQueue

    # One worker per server process and knowledge base; with KB_SYNC_EVERY (KB_SNAPSHOT_EVERY), the scheduled sync
    # (snapshot) runs in it too.
    return JobQueue(knowledge_base(_settings), every=_settings.sync_every, snapshot_every=_settings.snapshot_every,
                    snapshot_keep=_settings.snapshot_keep)


def job_queue(s: Settings | None = None):
    """The server's job queue (kb/jobs.py) for the configured ``KB_HOME``: sync, upload, re-chunk and evaluation
    run in its one worker thread, not in a page's script run, so they go on when the admin navigates away.

    A changed ``KB_SYNC_EVERY``, ``KB_SNAPSHOT_EVERY`` or ``KB_SNAPSHOT_KEEP`` retunes the same queue's schedules
    (they are not part of the key: two schedules of one knowledge base would both run)."""
    s = s or settings()
    queue = _job_queue(_key(s, exclude=_LLM_FIELDS + _SECRET_FIELDS + _SCHEDULE_FIELDS), s)
    queue.set_every(s.sync_every)
    queue.set_snapshot_every(s.snapshot_every, s.snapshot_keep)
    _note("job_queue", queue)
    return queue
