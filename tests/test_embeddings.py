"""Embedding backends: the packaged default, a local folder, and the int8 ONNX runtime of the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core import embeddings as emb

from conftest import base_settings


def test_default_model_is_found_in_the_installed_package():
    s = base_settings(Path("/tmp"))
    assert emb.model_dir(s).is_dir() and emb.model_name(s) == "all-MiniLM-L6-v2-int8"
    assert emb.model_name(s.with_(embed_backend="torch")) == "all-MiniLM-L6-v2"
    assert emb.max_tokens(s) == 256


def test_missing_folder_is_a_clear_error():
    with pytest.raises(emb.EmbeddingConfigError, match="not a local sentence-transformers folder"):
        emb.model_dir(base_settings(Path("/tmp"), embed_model="/no/such/model"))
    with pytest.raises(emb.EmbeddingConfigError, match="KB_EMBED_BACKEND"):
        emb.model_name(base_settings(Path("/tmp"), embed_backend="tpu"))


def test_onnx_int8_matches_the_float_model(tmp_path, tiny_st_dir, tiny_embeddings):
    s = base_settings(tmp_path, embed_model=str(tiny_st_dir), embed_backend="onnx-int8", model_cache="")
    assert emb.model_name(s) == "tiny-st-int8"  # its vectors never share a collection with the float model's
    q8 = emb.load_embeddings(s)
    texts = ["XTuner 是一个高效的微调工具。", "LMDeploy serves models.", "short", "a longer English sentence " * 10]
    a = np.asarray(tiny_embeddings.inner.embed_documents(texts))
    b = np.asarray(q8.embed_documents(texts))
    assert b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-4)
    assert (a * b).sum(1).min() > 0.9
    assert list((tmp_path / "models" / "onnx").glob("*.int8.onnx"))  # built once, cached
    # activations are quantized per batch, so a lone query differs from its batched self only slightly
    assert float(np.dot(q8.embed_query(texts[1]), b[1])) > 0.999
