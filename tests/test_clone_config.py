"""A clone's git config cut to what fetch and commit need (``kb.ingest.clone_config``).

A security review crafted a snapshot whose clone set ``remote.origin.uploadpack`` and carried an executable hook:
the next sync and the next upload ran them. These build such clones with git itself and check what is kept.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from kb import snapshot
from kb.errors import KBError
from kb.ingest import clone_config


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def crafted_bare(path: Path, url: str = "https://user:tok3n@example.com/r.git") -> Path:
    git("init", "-q", "--bare", str(path))
    for key, value in (("remote.origin.url", url), ("remote.origin.fetch", "+refs/heads/*:refs/heads/*"),
                       ("remote.origin.uploadpack", "sh -c 'touch /tmp/never'"), ("core.sshCommand", "touch /tmp/x"),
                       ("core.fsmonitor", "touch /tmp/y"), ("core.hooksPath", "/tmp"), ("include.path", "/etc/gitconfig"),
                       ("branch.main.remote", "origin"), ("branch.main.merge", "refs/heads/main")):
        git("config", "--file", str(path / "config"), key, value)
    hook = path / "hooks" / "reference-transaction"
    hook.write_text("#!/bin/sh\ntouch /tmp/hooked\n")
    hook.chmod(0o755)
    return path


def keys(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in git("config", "--file", str(path), "--list").splitlines())


def test_a_restored_clone_keeps_only_what_fetch_needs_and_no_hooks(tmp_path):
    repo = crafted_bare(tmp_path / "evil")
    clone_config.sanitize_clone(repo)
    kept = keys(repo / "config")
    assert kept == {"core.repositoryformatversion": "0", "core.filemode": "true", "core.bare": "true",
                    "remote.origin.url": "https://user:tok3n@example.com/r.git",
                    "remote.origin.fetch": "+refs/heads/*:refs/heads/*",
                    "branch.main.remote": "origin", "branch.main.merge": "refs/heads/main"}
    assert not (repo / "hooks").exists()
    assert git("rev-parse", "--is-bare-repository", cwd=repo).strip() == "true"  # still a repository git opens


@pytest.mark.parametrize("url", ["ext::sh -c touch% /tmp/pwned", "-uxyz", "fd::3", "gopher://example.com/r"])
def test_a_restored_clone_whose_remote_could_run_a_command_is_refused(tmp_path, url):
    repo = crafted_bare(tmp_path / "evil", url=url)
    with pytest.raises(KBError, match="refused URL"):
        clone_config.sanitize_clone(repo)


def test_a_dot_git_file_pointing_elsewhere_is_refused(tmp_path):
    repo = tmp_path / "up"
    repo.mkdir()
    (repo / ".git").write_text("gitdir: /somewhere/else\n")
    with pytest.raises(KBError, match="points at a repository elsewhere"):
        clone_config.sanitize_clone(repo, bare=False)


def test_a_clone_that_makes_git_read_another_folder_is_refused(tmp_path):
    """A second review: ``commondir`` (or an empty ``.git`` in a bare clone) made git read a config never cleaned."""
    for name, make in (("commondir", lambda p: (p / "commondir").write_text("x\n")),
                       ("gitdir", lambda p: (p / "gitdir").write_text("foo\n")),
                       (".git", lambda p: (p / ".git").mkdir()),
                       ("worktrees", lambda p: (p / "worktrees").mkdir())):
        repo = crafted_bare(tmp_path / f"evil-{name}")
        make(repo)
        with pytest.raises(KBError, match=f"holds '{name}', which no clone of this product has"):
            clone_config.sanitize_clone(repo)
    up = tmp_path / "up"
    git("init", "-q", str(up))
    (up / "uploads").mkdir()
    (up / "elsewhere").mkdir()
    with pytest.raises(KBError, match="holds 'elsewhere'"):
        clone_config.sanitize_clone(up, bare=False)


def test_a_restored_clone_borrows_no_objects_from_other_repositories(tmp_path):
    repo = crafted_bare(tmp_path / "evil")
    (repo / "objects" / "info" / "alternates").write_text("/some/other/repo/objects\n")
    (repo / "objects" / "info" / "http-alternates").write_text("https://example.com/objects\n")
    clone_config.sanitize_clone(repo)
    assert not list((repo / "objects" / "info").glob("*alternates"))


def test_an_upload_clone_is_cleaned_in_its_dot_git(tmp_path):
    up = tmp_path / "up"
    git("init", "-q", str(up))
    (up / "uploads").mkdir()
    git("config", "--file", str(up / ".git" / "config"), "core.fsmonitor", "touch /tmp/y")
    git("config", "--file", str(up / ".git" / "config"), "user.name", "kb upload")
    (up / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\nexit 1\n")
    clone_config.sanitize_clone(up, bare=False)
    assert keys(up / ".git" / "config")["user.name"] == "kb upload"
    assert "core.fsmonitor" not in keys(up / ".git" / "config") and not (up / ".git" / "hooks").exists()


def test_an_exported_clone_leaves_without_credentials_hooks_or_commands(tmp_path):
    repo = crafted_bare(tmp_path / "src")
    tar_path = tmp_path / "out" / "src.tar"
    tar_path.parent.mkdir()
    snapshot._add_clone(tar_path, repo, "src")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        config = tar.extractfile("src/config").read().decode()
    assert names.count("src/config") == 1 and not [n for n in names if n.startswith("src/hooks")]
    assert "src/objects" in names and "src/HEAD" in names
    assert "tok3n" not in config and "user" not in config and "url = https://example.com/r.git" in config
    assert "uploadpack" not in config and "sshCommand" not in config and "fsmonitor" not in config
    assert list(tar_path.parent.iterdir()) == [tar_path]  # the scratch config is gone
    # the clone itself is left as it was (this machine keeps its credentials)
    assert keys(repo / "config")["remote.origin.url"] == "https://user:tok3n@example.com/r.git"
