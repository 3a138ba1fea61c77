"""The packaged GGUF model as a transformers checkpoint in bfloat16, for CPUs that multiply bf16 in hardware.

Reading the answer prompt dominates the time to the first token on two cores.
llama.cpp's portable build reads it at 60-85 tokens/s; on a CPU with AMX, torch
multiplies bfloat16 matrices through oneDNN at about 2.6 TFLOP/s on the same
two cores (against 0.3 in float32), and reads the same 1,000-token prompt in
2.4 s instead of 12 (README "Answers"). With AVX512-BF16 and no AMX (AMD Zen 4)
it reads about twice as fast as llama.cpp. The weights are the GGUF's own:
transformers' GGUF loader dequantizes them (it needs the ``gguf`` package), so
the answers are the same model's.

That dequantizing (and the decoding weights) takes about a minute and 6 GB of memory, so it is done once and
the result saved beside the GGUF (``<name>.bf16/``, about 3.4 GB); later starts
load it in a few seconds. The folder is written under a temporary name and
renamed into place with a stamp naming the GGUF it came from, so a crash never
leaves a folder that looks complete, and a changed GGUF is converted again.

The same folder holds the small weights for decoding (``core.decode_weights``):
the GGUF's 4-bit blocks, which make writing the answer twice as fast as bf16.
A folder converted before they existed gets them on its next use.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from core import decode_weights
from core.gguf import GGUFError

log = logging.getLogger(__name__)
STAMP = "kb-converted-from.json"


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware, with AMX or AVX512-BF16: the case where bf16 in torch pays.

    With AMX, oneDNN reads a prompt about five times faster than llama.cpp's portable build; with AVX512-BF16
    alone (AMD EPYC Zen 4, 2 cores) a bf16 matmul of a prompt's shape runs at 366 GFLOPS against 126 in float32,
    and the first token comes after 10.8 s against 19.8 with llama.cpp (README "The runtime"). Read from
    /proc/cpuinfo (the kernel drops the flags it can't use) rather than from torch, so that labelling the model
    on a page doesn't import torch. Elsewhere than Linux: no.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return multiplies_bf16(next((line.split(":", 1)[1].split() for line in text.splitlines()
                                 if line.startswith("flags")), []))


def multiplies_bf16(flags: list[str]) -> bool:
    """From a CPU's flags: AMX's bf16 tiles, or AVX512's bf16 dot products."""
    return {"amx_tile", "amx_bf16"} <= set(flags) or "avx512_bf16" in flags


def checkpoint_dir(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".bf16")


def _source(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_converted(gguf: Path) -> bool:
    """True when the folder's stamp names this very GGUF (by name, size and modification time)."""
    try:
        return json.loads((checkpoint_dir(gguf) / STAMP).read_text()) == _source(gguf)
    except (OSError, ValueError):
        return False


def ensure_checkpoint(gguf: Path) -> Path:
    """The bf16 checkpoint of ``gguf``, converting it first if needed (slow: once per GGUF).

    A lock keeps the dashboard and the CLI from converting the same file at once; the
    second waits and then finds the folder ready.
    """
    gguf = Path(gguf)
    dest = checkpoint_dir(gguf)
    if is_converted(gguf) and decode_weights.available(dest):
        return dest
    with FileLock(str(dest) + ".lock"), _one_reader_per_file():
        if not is_converted(gguf):
            _convert(gguf, dest)
        elif not decode_weights.available(dest):
            _add_decode_weights(gguf, dest, model=None)
    return dest


@contextlib.contextmanager
def _one_reader_per_file():
    """Parse the GGUF once for the whole conversion instead of four times.

    transformers opens a new ``gguf.GGUFReader`` for the config, the tokenizer and the weights, and the decode
    weights open a fourth; each parse walks the 151,000-token vocabulary in Python (7 s here, a quarter of the
    conversion). The reader is read-only (a memory map), so one per file serves every caller. transformers imports
    the class from ``gguf`` at each call, which is where it is swapped, only for the conversion's duration.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert(gguf: Path, dest: Path) -> None:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent))
    except OSError as exc:
        raise GGUFError(f"cannot write the converted model into {dest.parent}: {exc}") from exc
    try:
        model = _save_bf16(gguf, tmp)
        _add_decode_weights(gguf, tmp, model)
        del model
        (tmp / STAMP).write_text(json.dumps(_source(gguf)))
        shutil.rmtree(dest, ignore_errors=True)  # a stale conversion, of a GGUF since replaced
        tmp.rename(dest)
    except OSError as exc:
        raise GGUFError(f"cannot write the converted model to {dest}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _add_decode_weights(gguf: Path, folder: Path, model: Any) -> None:
    """Save the small decoding weights into ``folder`` (about 30 s). Optional: on failure, decoding stays bf16."""
    try:
        if model is None:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
        decode_weights.save(decode_weights.compute(gguf, model), folder)
    except Exception as exc:  # noqa: BLE001 - an unreadable tensor or a full disk must not stop the answers
        log.warning("no small decoding weights for %s (answers decode in bf16, about half as fast): %s", gguf, exc)


def _save_bf16(gguf: Path, folder: Path) -> Any:
    """Dequantize with transformers' GGUF loader and save as safetensors with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as exc:
        raise GGUFError(f"transformers cannot read {gguf} as a GGUF model: {exc}") from exc
    # The loader marks the model as GGUF-quantized, which save_pretrained refuses; its weights are plain bf16 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
