"""Small weights for decoding on a CPU: the GGUF's own 4-bit blocks beside the bf16 checkpoint.

Decoding reads every weight once per token, so on two cores its speed is the
memory bandwidth (about 16 GB/s here) over the weights' size: in bf16 (3.1 GB)
the packaged model writes 5.4 tokens/s, half of what llama.cpp gets from the
same GGUF (README "Answers"). Reading the prompt is the opposite case, many rows
against each weight, where AMX bf16 wins by five times. So each Linear keeps its
bf16 weight for the prompt and gets a second, small copy for one row at a time:

- a tensor stored in the GGUF as Q4_K keeps its exact 4-bit values, one scale
  and one offset per 32 weights: torch's ``_weight_int4pack_mm_for_cpu`` takes
  that form as it is, so nothing is quantized twice;
- any other (Q6_K, float) gets int8 with one scale per output row, from its
  bf16 weight, for ``_weight_int8pack_mm``.

A Q4_K tensor is used only where its dequantized blocks equal the checkpoint's
bf16 weight, so a loader that reorders a tensor (as transformers does for some
architectures) falls back to int8 rather than to wrong answers. The weights are
computed once, with the checkpoint, and saved in one safetensors file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FILE = "kb-decode-weights.safetensors"
FORMAT = "kb-decode-2"  # 2: every tensor 64-byte aligned in the file (1 was not, and was copied at each load)
ALIGN = 64  # torch's int8 kernel crashes on weights not aligned to 64 bytes once given 4 rows or more (torch 2.13)
GROUP = 32  # Q4_K's sub-block: 32 weights share a scale and a minimum
ROWS = 4  # up to this many rows per call use the small weights; prompts use bf16


def _q4k_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Q4_K rows into their 4-bit values (N, K) and per-32 scale and minimum (N, K/32), as in gguf.quants."""
    from gguf.quants import Q4_K

    rows = blocks.shape[0]
    flat = blocks.reshape(-1, 144)  # a super-block: d, dmin (f16), 12 bytes of 6-bit scales, 128 bytes of values
    d = flat[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = flat[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(flat[:, 4:16])
    qs = flat[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    values = (qs & np.uint8(0x0F)).reshape(rows, -1)
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)
    minimum = (dmin * mn.astype(np.float32)).reshape(rows, -1)
    return values, scale, minimum


def _int4(values: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> dict[str, Any]:
    """Q4_K's ``w = scale * q - min`` as torch's int4 form ``w = (q - 8) * scale + zero``, packed as the kernel
    reads it (so loading is a copy; the layout is torch's, hence the version in the file's metadata)."""
    import torch

    packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(values.astype(np.int32)), 1)
    zero = minimum * -1 + 8 * scale
    scale_zero = np.stack([scale, zero], axis=-1).transpose(1, 0, 2)  # (K/32, N, 2), the kernel's layout
    return {"q4": packed, "q4_scale_zero": torch.from_numpy(np.ascontiguousarray(scale_zero)).to(torch.bfloat16)}


def _int8(weight: Any) -> dict[str, Any]:
    import torch

    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q8": q, "q8_scale": scale.to(torch.bfloat16)}


def _matches(values: np.ndarray, scale: np.ndarray, minimum: np.ndarray, weight: Any) -> bool:
    """Whether the blocks dequantize to this bf16 weight (same order, same shape), to bf16's precision."""
    import torch

    if tuple(weight.shape) != values.shape:
        return False
    deq = values.reshape(len(values), -1, GROUP) * scale[..., None] - minimum[..., None]
    w = weight.float()
    return bool(torch.linalg.norm(torch.from_numpy(deq.reshape(w.shape)) - w) <= 1e-2 * torch.linalg.norm(w))


def _gguf_names(reader: Any, n_layers: int) -> Any:
    import gguf

    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name), None)
    return gguf.get_tensor_name_map(arch, n_layers) if arch is not None else None


def compute(gguf_path: Path, model: Any) -> dict[str, Any]:
    """The small weights of every Linear in ``model`` (loaded from the bf16 checkpoint of ``gguf_path``)."""
    import gguf
    from torch import nn

    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    names = _gguf_names(reader, getattr(model.config, "num_hidden_layers", 0))
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        source = names.get_name(name + ".weight", try_suffixes=(".weight",)) if names else None
        tensor = tensors.get(source) if source else None
        parts = None
        if tensor is not None and tensor.tensor_type == gguf.GGMLQuantizationType.Q4_K:
            parts = _q4k_parts(np.asarray(tensor.data))
            if not _matches(*parts, module.weight.data):
                parts = None
        small = _int4(*parts) if parts else _int8(module.weight.data)
        out.update({f"{name}.{key}": value for key, value in small.items()})
    return out


def save(weights: dict[str, Any], folder: Path) -> None:
    """Write the file under a temporary name and rename it, so a crash never leaves half of it."""
    from safetensors.torch import save_file

    tmp = folder / (FILE + ".part")
    save_file(weights, str(tmp), metadata=_metadata())
    pad = _padding(tmp)
    if pad:
        save_file(weights, str(tmp), metadata={**_metadata(), "pad": " " * pad})
    tmp.replace(folder / FILE)


def _padding(path: Path) -> int:
    """How many characters of metadata make the data start at a multiple of ``ALIGN`` bytes.

    safetensors places each tensor at a multiple of its size from the start of the
    data (here all multiples of 64), and the data follows an 8-byte length and the
    JSON header. So with the header padded, the memory-mapped tensors are aligned
    and loading them needs no copy. ``attach`` copies any that are not.
    """
    import struct

    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        json_length = len(fh.read(length).rstrip(b" "))  # the library pads the JSON with spaces to 8 bytes
    if (8 + length) % ALIGN == 0:
        return 0
    return (ALIGN - 8 - json_length - len(',"pad":""')) % ALIGN  # the JSON then ends 8 bytes short of a multiple


def _metadata() -> dict[str, str]:
    import torch

    return {"format": FORMAT, "torch": torch.__version__}


def available(folder: Path) -> bool:
    """Whether ``folder`` holds small weights packed by this torch (another version may pack differently)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(folder) / FILE), "pt") as f:  # reads the header only
            return {k: v for k, v in f.metadata().items() if k != "pad"} == _metadata()
    except (OSError, SafetensorError):
        return False


def _dual_class() -> type:
    import torch
    from torch import nn

    class _DualLinear(nn.Module):
        """A Linear that multiplies a prompt with its bf16 weight and one token with its small copy."""

        def __init__(self, linear: nn.Linear, small: dict[str, torch.Tensor]) -> None:
            super().__init__()
            self.linear = linear
            if "q4" in small:
                self.register_buffer("packed", small["q4"])
                self.register_buffer("scale_zero", small["q4_scale_zero"])
                self.kernel = self._int4
            else:
                self.register_buffer("q8", small["q8"])
                self.register_buffer("q8_scale", small["q8_scale"])
                self.kernel = self._int8

        def _int4(self, x: torch.Tensor) -> torch.Tensor:
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)

        def _int8(self, x: torch.Tensor) -> torch.Tensor:
            return torch._weight_int8pack_mm(x, self.q8, self.q8_scale)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.numel() // x.shape[-1]
            if rows > ROWS or x.dtype != torch.bfloat16:
                return self.linear(x)
            y = self.kernel(x.reshape(rows, x.shape[-1]))
            if self.linear.bias is not None:
                y = y + self.linear.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])

    return _DualLinear


def attach(model: Any, folder: Path) -> int:
    """Give each Linear of ``model`` its small weights from ``folder``; returns how many got them."""
    from safetensors.torch import load_file
    from torch import nn

    by_module: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(Path(folder) / FILE)).items():
        name, kind = key.rsplit(".", 1)  # "model.layers.0.mlp.up_proj" and "q4" / "q4_scale_zero" / "q8" / ...
        aligned = value.data_ptr() % ALIGN == 0  # the file's tensors are, unless another writer made it
        by_module.setdefault(name, {})[kind] = value if aligned else value.clone()
    dual = _dual_class()
    count = 0
    for name, small in by_module.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(getattr(parent, child_name, None), nn.Linear):
            setattr(parent, child_name, dual(getattr(parent, child_name), small))
            count += 1
    return count
