"""The small decoding weights: the GGUF's Q4_K blocks taken as they are, int8 for the rest, used one row at a time."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from core import decode_weights, gguf_checkpoint
from core.gguf_checkpoint import STAMP, checkpoint_dir, ensure_checkpoint


@pytest.fixture(scope="module")
def reader(default_gguf_path):
    import gguf

    return gguf.GGUFReader(default_gguf_path)


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_q4k_blocks_split_into_what_gguf_dequantizes(reader):
    import gguf

    tensor = _tensor(reader, "blk.0.attn_k.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_K
    values, scale, minimum = decode_weights._q4k_parts(np.asarray(tensor.data))
    assert values.shape == (256, 1536) and values.max() <= 15 and scale.shape == minimum.shape == (256, 48)
    mine = values.reshape(256, 48, 32) * scale[..., None] - minimum[..., None]
    theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(256, 48, 32)
    np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)


def test_blocks_are_used_only_for_the_weight_they_equal(reader):
    import torch

    parts = decode_weights._q4k_parts(np.asarray(_tensor(reader, "blk.0.attn_k.weight").data))
    weight = torch.from_numpy(parts[0].reshape(256, 48, 32) * parts[1][..., None] - parts[2][..., None])
    weight = weight.reshape(256, 1536).to(torch.bfloat16)
    assert decode_weights._matches(*parts, weight)
    assert not decode_weights._matches(*parts, weight.flip(0))  # a loader that reordered the rows
    assert not decode_weights._matches(*parts, weight[:128])


@pytest.fixture(scope="module")
def small_and_full(default_bf16_checkpoint):
    from safetensors import safe_open

    def load(name):
        with safe_open(str(default_bf16_checkpoint / decode_weights.FILE), "pt") as f:
            small = {k[len(name) + 1:]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == name}
            meta = f.metadata()
        with safe_open(str(default_bf16_checkpoint / "model.safetensors"), "pt") as f:
            weight = f.get_tensor(name + ".weight")
            bias = f.get_tensor(name + ".bias") if name + ".bias" in f.keys() else None
        return small, weight, bias, meta
    return load


@pytest.mark.parametrize(("name", "kind"), [("model.layers.0.self_attn.q_proj", "q4"),
                                            ("model.layers.0.mlp.down_proj", "q8")])
def test_one_row_uses_the_small_weights_and_a_prompt_the_bf16_ones(small_and_full, name, kind):
    """q_proj is Q4_K in the GGUF (4-bit, exact), down_proj Q6_K (int8 per row); both agree with bf16."""
    import torch
    from torch import nn

    small, weight, bias, meta = small_and_full(name)
    assert {k: v for k, v in meta.items() if k != "pad"} == decode_weights._metadata() and kind in small
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.bfloat16)
    linear.weight.data, linear.bias = weight, (nn.Parameter(bias) if bias is not None else None)
    dual = decode_weights._dual_class()(linear, small)
    torch.manual_seed(0)
    with torch.inference_mode():
        one = torch.randn(1, 1, weight.shape[1], dtype=torch.bfloat16)
        expected, got = linear(one).float(), dual(one).float()
        assert got.shape == expected.shape
        assert torch.linalg.norm(got - expected) <= 0.03 * torch.linalg.norm(expected)
        prompt = torch.randn(1, 9, weight.shape[1], dtype=torch.bfloat16)
        assert torch.equal(dual(prompt), linear(prompt))


def test_an_old_conversion_gets_its_decode_weights_on_next_use(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"x" * 100)
    folder = checkpoint_dir(model)
    folder.mkdir()
    st = model.stat()
    (folder / STAMP).write_text(json.dumps({"gguf": "m.gguf", "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    added = []
    monkeypatch.setattr(gguf_checkpoint, "_convert", lambda *_: pytest.fail("the bf16 folder is still good"))
    monkeypatch.setattr(gguf_checkpoint, "_add_decode_weights", lambda *a, **k: added.append(a[1]))
    assert ensure_checkpoint(model) == folder and added == [folder]


def test_decode_weights_that_cannot_be_made_leave_bf16_decoding(tmp_path, caplog):
    """A GGUF whose tensors can't be read: a warning, no file, and the answers still work (in bf16)."""
    import torch
    from torch import nn

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="core.gguf_checkpoint"):
        gguf_checkpoint._add_decode_weights(junk, tmp_path, model)
    assert not decode_weights.available(tmp_path)
    assert "answers decode in bf16" in caplog.text


def test_weights_packed_by_another_torch_are_not_used(tmp_path):
    """The int4 layout is torch's own: a file from another version (or a half-written one) counts as missing."""
    import torch
    from safetensors.torch import save_file

    assert not decode_weights.available(tmp_path)
    save_file({"x.q8": torch.zeros(2, 2, dtype=torch.int8)}, str(tmp_path / decode_weights.FILE),
              metadata={"format": decode_weights.FORMAT, "torch": "1.0"})
    assert not decode_weights.available(tmp_path)
    (tmp_path / decode_weights.FILE).write_bytes(b"\x10\x00")
    assert not decode_weights.available(tmp_path)
    decode_weights.save({"x.q8": torch.zeros(2, 2, dtype=torch.int8)}, tmp_path)
    assert decode_weights.available(tmp_path) and not (tmp_path / (decode_weights.FILE + ".part")).exists()


@pytest.mark.parametrize("names", [["x.q8"], ["x.q8", "longer.name.of.a.layer.q8_scale"], ["a" * 61 + ".q8"]])
def test_saved_weights_are_aligned_so_loading_them_needs_no_copy(tmp_path, names):
    """Each tensor is memory-mapped at a multiple of 64 bytes, whatever the header's length; the kernels need it."""
    import torch
    from safetensors.torch import load_file

    weights = {name: torch.ones(4, 64, dtype=torch.int8) * i for i, name in enumerate(names)}
    decode_weights.save(weights, tmp_path)
    assert decode_weights.available(tmp_path)
    loaded = load_file(str(tmp_path / decode_weights.FILE))
    assert all(t.data_ptr() % decode_weights.ALIGN == 0 for t in loaded.values())
    assert all(torch.equal(loaded[name], weights[name]) for name in names)
