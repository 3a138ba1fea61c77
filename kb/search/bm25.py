"""BM25 over the words of chunks and passages (``kb/words.py``).

The scores are rank-bm25's ``BM25Okapi`` (a test checks they match), but
computed from a precomputed sparse term-weight matrix: ``BM25Okapi.get_scores``
walks every document in Python for every query term, which is too slow at
hundreds of thousands of chunks. Tokens are computed once at sync time and
stored with each chunk, so a process only rebuilds the matrix, never
re-tokenizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

class BM25Matrix:
    """Okapi BM25 (k1=1.5, b=0.75, epsilon=0.25, as rank-bm25) as a sparse matrix."""

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> None:
        self.vocab: dict[str, int] = {}
        rows, cols = [], []
        for d, tokens in enumerate(docs):
            for t in tokens:
                rows.append(d)
                cols.append(self.vocab.setdefault(t, len(self.vocab)))
        n, v = len(docs), len(self.vocab)
        tf = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, v))
        tf.sum_duplicates()
        doc_len = np.asarray([len(t) for t in docs], dtype=np.float32)
        avgdl = float(doc_len.mean()) if n else 1.0
        df = np.bincount(tf.indices, minlength=v).astype(np.float64)
        idf = np.log(n - df + 0.5) - np.log(df + 0.5)
        floor = epsilon * (idf.sum() / v) if v else 0.0
        idf[idf < 0] = floor
        self.idf = idf
        denom_doc = k1 * (1 - b + b * doc_len / (avgdl or 1.0))
        tf = tf.tocoo()
        weights = idf[tf.col] * tf.data * (k1 + 1) / (tf.data + denom_doc[tf.row])
        self.weights = sparse.csc_matrix((weights.astype(np.float32), (tf.row, tf.col)), shape=(n, v))
        self.size = n

    def state(self) -> dict:
        """The arrays that make the matrix, to save it (``kb/search/lexical.py``) instead of building it again."""
        return {"data": self.weights.data, "indices": self.weights.indices, "indptr": self.weights.indptr,
                "idf": self.idf, "vocab": list(self.vocab), "size": self.size}

    @classmethod
    def from_state(cls, state: dict) -> "BM25Matrix":
        """The matrix ``state()`` described; the vocabulary is in column order."""
        matrix = cls.__new__(cls)
        matrix.vocab = {t: i for i, t in enumerate(state["vocab"])}
        matrix.idf = np.asarray(state["idf"], dtype=np.float64)
        matrix.size = int(state["size"])
        matrix.weights = sparse.csc_matrix((state["data"], state["indices"], state["indptr"]),
                                           shape=(matrix.size, len(matrix.vocab)))
        return matrix

    def max_idf(self, query_tokens: Sequence[str]) -> float:
        """How specific the query's rarest known term is (0 when none is known)."""
        cols = [self.vocab[t] for t in query_tokens if t in self.vocab]
        return float(self.idf[cols].max()) if cols else 0.0

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        cols = [self.vocab[t] for t in query_tokens if t in self.vocab]
        if not cols:
            return np.zeros(self.size, dtype=np.float32)
        uniq, counts = np.unique(cols, return_counts=True)
        return np.asarray(self.weights[:, uniq] @ counts.astype(np.float32)).ravel()

    def top(self, query_tokens: Sequence[str], k: int, mask: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Best ``k`` documents with a positive score, best first."""
        s = self.scores(query_tokens)
        if mask is not None:
            s = np.where(mask, s, 0.0)
        k = min(k, int((s > 0).sum()))
        if k <= 0:
            return []
        idx = np.argpartition(-s, k - 1)[:k]
        idx = idx[np.argsort(-s[idx], kind="stable")]
        return [(int(i), float(s[i])) for i in idx]
