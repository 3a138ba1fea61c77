"""The same sentence-transformers model, run as int8 ONNX on onnxruntime.

Embedding is 99 % of ingest time on a CPU. Dynamic int8 quantization of the
model's linear layers (per channel) roughly doubles throughput on two cores
while the vectors stay within cosine 0.98 of the float model's (measured by
``bench``). sentence-transformers offers this as ``backend="onnx"``, but that
path needs optimum-onnx, whose transformers<4.58 pin conflicts with the
transformers 5 this project needs; so the export (torch.onnx) and the
quantization (onnxruntime.quantization) are done here, once per model, and
cached next to the other models in ``KB_HOME/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _model_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def _pooling_mode(model_dir: Path) -> str:
    cfg = model_dir / "1_Pooling" / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        if c.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def build_int8_model(model_dir: Path, cache_dir: Path) -> Path:
    """Export to ONNX and quantize to int8, once; returns the quantized file.

    A lock keeps two processes (the dashboard and the CLI, or two test workers) that share
    the cache from writing the same temporary files at once; the second waits, then finds
    the file ready.
    """
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{model_dir.name}-{_model_fingerprint(model_dir)}.int8.onnx"
    if target.is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            _export_int8(model_dir, target)
    return target


def _export_int8(model_dir: Path, target: Path) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    sample = tok(["an example", "another example text"], return_tensors="pt", padding=True)
    axes = {"b": 0, "s": 1}
    float_path = target.with_suffix(".float.tmp")
    torch.onnx.export(
        Encoder(model), tuple(sample[k] for k in INPUTS), str(float_path),
        input_names=list(INPUTS), output_names=["last_hidden_state"],
        dynamic_axes={n: {v: k for k, v in axes.items()} for n in (*INPUTS, "last_hidden_state")},
        opset_version=17, dynamo=False,
    )
    tmp = target.with_suffix(".tmp")
    quantize_dynamic(str(float_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    float_path.unlink(missing_ok=True)
    tmp.rename(target)


class OnnxInt8Embeddings(Embeddings):
    """LangChain ``Embeddings`` over an int8 ONNX export of a sentence-transformers folder."""

    def __init__(self, model_dir: Path, cache_dir: Path, max_length: int, batch_size: int = 64, threads: int = 0) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        path = build_int8_model(model_dir, cache_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = max_length
        self.batch_size = batch_size
        self.pooling = _pooling_mode(model_dir)
        self._lock = threading.Lock()

    def _encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in INPUTS if k in enc}
        if "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        with self._lock:
            hidden = self.session.run(None, feeds)[0]
        if self.pooling == "cls":
            vec = hidden[:, 0]
        else:
            mask = enc["attention_mask"][..., None].astype(np.float32)
            vec = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return vec / np.clip(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12, None)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[list[float] | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, v in zip(idx, self._encode([texts[i] for i in idx])):
                out[i] = v.tolist()
        return out  # type: ignore[return-value]

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text])[0].tolist()
