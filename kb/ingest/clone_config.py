"""A clone's git config cut down to what this product's fetches and commits need.

Git runs commands named in a repository's own config (``core.sshCommand``,
``core.fsmonitor``, ``core.hooksPath``, ``remote.*.uploadpack``, ...) and the
scripts in its ``hooks/`` folder. The clones this product makes carry none,
but a clone restored from a snapshot archive carries whatever the archive's
author put there: a security review's crafted snapshot ran its command at the
next scheduled sync, with no admin action. So a restored clone keeps only the
keys below, its remotes' URLs pass the same transport check as ``kb add``, and
its hooks are deleted; and an exported clone's config leaves without the
credentials an https URL may carry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kb.errors import KBError
from kb.ingest.sources import check_transport, strip_credentials

# What a clone's git folder may hold: anything else (``commondir``, ``gitdir``, a ``.git`` inside a bare clone,
# ``worktrees``) makes git read its config and hooks from somewhere this cleaning never looked (a second review).
GIT_DIR_ENTRIES = {"HEAD", "FETCH_HEAD", "ORIG_HEAD", "COMMIT_EDITMSG", "branches", "config", "description", "hooks",
                   "info", "objects", "packed-refs", "refs", "logs", "index", "shallow"}
UPLOAD_ROOT_ENTRIES = {".git", "uploads"}  # an upload source's work tree (kb/ingest/sources.py: UPLOADS_DIR)
ALTERNATES = ("alternates", "http-alternates")  # objects borrowed from other repositories of this machine

KEPT = {"core.repositoryformatversion", "core.bare", "core.filemode", "core.logallrefupdates",
        "extensions.objectformat", "user.name", "user.email"}
KEPT_PER_NAME = {"remote": {"url", "fetch"}, "branch": {"remote", "merge"}}  # remote.NAME.url, branch.NAME.merge


def git_dir(repo_path: Path) -> Path:
    """The folder holding ``config``: the clone itself when bare (git sources), its ``.git`` otherwise (uploads)."""
    return repo_path / ".git" if (repo_path / ".git").is_dir() else repo_path


def _kept(key: str) -> bool:
    section, _, rest = key.partition(".")
    name, _, leaf = rest.rpartition(".")
    return key in KEPT or bool(name) and leaf in KEPT_PER_NAME.get(section, ())


def _entries(config: Path) -> list[tuple[str, str]]:
    """Every ``key value`` of one config file as git parses it, its includes not followed."""
    try:
        out = subprocess.run(["git", "config", "--file", str(config), "--no-includes", "--null", "--list"],
                             capture_output=True, check=True, timeout=30).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as exc:
        raise KBError(f"the clone's git config {config} can't be read: {exc}") from None
    return [tuple(item.split("\n", 1)) if "\n" in item else (item, "") for item in out.split("\0") if item]


def safe_entries(gdir: Path, credentials: bool = True) -> list[tuple[str, str]]:
    """The kept keys of ``gdir``'s config; every remote URL checked (KBError when refused), credentials dropped if
    asked."""
    config = gdir / "config"
    out = []
    for key, value in _entries(config) if config.is_file() else []:
        if not _kept(key):
            continue
        if key.startswith("remote.") and key.endswith(".url"):
            check_transport(value)
            value = value if credentials else strip_credentials(value)
        out.append((key, value))
    return out


def config_text(entries: list[tuple[str, str]], scratch: Path) -> bytes:
    """``entries`` written as a config file by git itself (its quoting), through a file in ``scratch``."""
    path = scratch / f".config-{os.getpid()}"
    path.unlink(missing_ok=True)  # a link of that name (from an archive) is removed, never written through
    try:
        for key, value in entries:
            subprocess.run(["git", "config", "--file", str(path), "--add", key, value],
                           capture_output=True, check=True, timeout=30)
        return path.read_bytes() if path.exists() else b""
    except (OSError, subprocess.SubprocessError) as exc:
        raise KBError(f"cannot write a git config in {scratch}: {exc}") from None
    finally:
        path.unlink(missing_ok=True)


def _only(folder: Path, allowed: set[str], what: str) -> None:
    extra = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if extra:
        raise KBError(f"{what} holds {', '.join(map(repr, extra[:5]))}, which no clone of this product has")


def sanitize_clone(repo_path: Path, bare: bool = True) -> None:
    """Make a clone from elsewhere safe to fetch into and commit to: kept keys only, no hooks, no alternates.

    ``bare``: a git source's clone; else an upload source's repository (a work tree of ``uploads/`` and ``.git``).
    """
    if not bare:
        dot_git = repo_path / ".git"
        if dot_git.is_symlink() or not dot_git.is_dir():
            raise KBError(f"the clone {repo_path.name} points at a repository elsewhere (.git is not a folder)")
        _only(repo_path, UPLOAD_ROOT_ENTRIES, f"the upload clone {repo_path.name}")
    gdir = repo_path / ".git" if not bare else repo_path
    if gdir.is_symlink() or not gdir.is_dir():
        raise KBError(f"the clone {repo_path.name} is not a folder")
    _only(gdir, GIT_DIR_ENTRIES, f"the clone {repo_path.name}")
    for name in ALTERNATES:
        (gdir / "objects" / "info" / name).unlink(missing_ok=True)
    text = config_text(safe_entries(gdir), gdir)
    tmp = gdir / "config.safe"
    tmp.unlink(missing_ok=True)
    tmp.write_bytes(text)
    os.replace(tmp, gdir / "config")
    shutil.rmtree(gdir / "hooks", ignore_errors=True)
    if (gdir / "hooks").exists():
        raise KBError(f"cannot remove the hooks of the restored clone {repo_path.name}")
