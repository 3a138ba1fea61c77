"""Source validation, redaction, unreachable remotes and uploads."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import split_list
from kb import citations
from kb.ingest import sources
from kb.errors import KBError


@pytest.mark.parametrize("name", ["InternLM-XComposer", "xtuner", "a", "v1.2_x", "x" * 64])
def test_valid_names(name):
    assert sources.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "a/b", "../x", "a b", "x" * 65, "名字", "a;rm"])
def test_invalid_names(name):
    with pytest.raises(KBError, match="invalid source name"):
        sources.validate_name(name)


@pytest.mark.parametrize(
    "url",
    ["ext::sh -c touch% /tmp/pwned", "EXT::x", "fd::3", "-uhttps://x", "--upload-pack=touch /tmp/x",
     "ftp://example.com/x.git", "https://", "javascript://x"],
)
def test_refused_urls(url):
    with pytest.raises(KBError, match="refused|not allowed|no host"):
        sources.validate_url(url)


@pytest.mark.parametrize(
    "url",
    ["https://gitee.com/InternLM/xtuner", "http://h/x.git", "ssh://git@h/x.git", "git://h/x", "git@gitee.com:InternLM/xtuner.git"],
)
def test_accepted_urls(url):
    assert sources.validate_url(url) == url


def test_local_bundle_and_missing_path(corpus):
    assert sources.validate_url(str(corpus / "lagent.bundle")).endswith("lagent.bundle")
    with pytest.raises(KBError, match="no such local path"):
        sources.validate_url("/no/such/repo")


def test_extension_lists_drop_one_leading_dot_and_refuse_the_rest_as_typed():
    """An operator review: "../x" was echoed as "/x" (every leading dot stripped before the check)."""
    assert split_list(".MD, txt ,,rst") == ("md", "txt", "rst")
    with pytest.raises(KBError, match=r"invalid extension\(s\) '\.\./x', '\.\.md'"):
        sources.validate_extensions(split_list("../x,..md"))


@pytest.mark.parametrize("web_url", ["javascript:alert(1)", "file:///etc/passwd", "https://", "gitee.com/InternLM/x"])
def test_a_web_url_must_be_a_web_page(tiny_kb, corpus, web_url):
    """A browser review: `javascript:alert(1)` was accepted, shown as a link, and every document's web link went
    nowhere. Refused before anything is cloned."""
    with pytest.raises(KBError, match="refused web URL"):
        tiny_kb.add_source("notes", str(corpus / "lagent.bundle"), web_url=web_url)
    assert not tiny_kb.sources() and not (tiny_kb.settings.repos_path / "notes").exists()
    assert sources.validate_web_url(" https://gitee.com/InternLM/xtuner/ ") == "https://gitee.com/InternLM/xtuner"
    assert sources.validate_web_url("  ") is None


@pytest.mark.parametrize("branch", ["-b", "--orphan", "a..b", "x y", "a:b", ""])
def test_refused_branches(branch):
    with pytest.raises(KBError, match="invalid branch"):
        sources.validate_branch(branch)


def test_redaction():
    assert sources.redact("https://user:s3cret@gitee.com/a/b") == "https://***@gitee.com/a/b"
    assert sources.redact("https://gitee.com/a/b") == "https://gitee.com/a/b"


def test_settings_never_print_credentials():
    """A traceback or a failing test may print the settings: the servers' URLs show without user and password."""
    from core.settings import Settings

    shown = repr(Settings(chroma_url="https://admin:s3cret@chroma.internal/db", admin_password="hunter2",
                          openai_base_url="http://k:t0ken@127.0.0.1:23333/v1", openai_api_key="sk-abc"))
    assert "chroma_url='https://***@chroma.internal/db'" in shown
    assert "openai_base_url='http://***@127.0.0.1:23333/v1'" in shown
    assert not any(secret in shown for secret in ("s3cret", "hunter2", "t0ken", "sk-abc"))


def test_permalinks():
    assert sources.web_url_for("https://gitee.com/InternLM/xtuner.git") == "https://gitee.com/InternLM/xtuner"
    assert sources.web_url_for("git@github.com:InternLM/xtuner.git") == "https://github.com/InternLM/xtuner"
    assert sources.web_url_for("/local/x.bundle") == ""
    link = citations.permalink("https://gitee.com/InternLM/xtuner", "abc123", "docs/a.md", 3, 9)
    assert link == "https://gitee.com/InternLM/xtuner/blob/abc123/docs/a.md#L3-L9"


def unreachable_network(monkeypatch) -> None:
    """No route out, on any machine: git's HTTPS goes to a closed local port, so the test never waits on a network."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")


def test_unreachable_remote_leaves_nothing(tiny_kb, monkeypatch):
    unreachable_network(monkeypatch)
    url = "https://user:s3cret@gitee.com/InternLM/xtuner"
    with pytest.raises(KBError) as err:
        tiny_kb.add_source("xtuner", url)
    message = str(err.value)
    assert "gitee.com" in message and "s3cret" not in message
    assert not (tiny_kb.settings.repos_path / "xtuner").exists()
    assert not tiny_kb.manifest.has_source("xtuner")


def test_refused_url_through_service(tiny_kb):
    with pytest.raises(KBError, match="not allowed"):
        tiny_kb.add_source("evil", "ext::sh -c 'touch /tmp/pwned'")
    assert not tiny_kb.sources()


def test_add_bundle_and_duplicate(tiny_kb, corpus):
    row = tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    assert row.branch == "main" and (tiny_kb.settings.repos_path / "lagent").is_dir()
    with pytest.raises(KBError, match="already exists"):
        tiny_kb.add_source("lagent", str(corpus / "lagent.bundle"))
    with pytest.raises(KBError, match="not found"):
        tiny_kb.add_source("lagent2", str(corpus / "lagent.bundle"), branch="nope")
    assert not (tiny_kb.settings.repos_path / "lagent2").exists()


@pytest.mark.parametrize("name", ["../evil.md", "/etc/passwd.md", ".hidden.md", "x.exe", "noext", "a\x00.md"])
def test_upload_refuses_bad_names(tiny_kb, name):
    with pytest.raises(KBError):
        tiny_kb.upload({name: b"# hi\n"}, "files")


def test_upload_size_limit_keeps_stored_files(tiny_kb):
    tiny_kb.upload({"a.md": b"# A\n\nfirst file\n"}, "files")
    small = tiny_kb.settings.with_(upload_max_bytes=100)
    tiny_kb.settings = small
    with pytest.raises(KBError, match="over the upload limit"):
        tiny_kb.upload({"b.md": b"x" * 101}, "files")
    docs = tiny_kb.manifest.documents("files")
    assert [d.path for d in docs] == ["uploads/a.md"]
    assert tiny_kb.stats()["chunks"] == 1


def test_upload_markdown_and_html(tiny_kb):
    html = b"<html><body><h1>Guide</h1><p>InternLM answers questions.</p><p>Second paragraph.</p></body></html>"
    rep = tiny_kb.upload({"guide.md": "# 标题\n\n第一行。\n第二行。\n".encode(), "page.html": html}, "files")
    assert rep.files_added == 2 and not rep.error
    docs = {d.path: d for d in tiny_kb.manifest.documents("files")}
    assert docs["uploads/page.html"].loader == "unstructured" and docs["uploads/page.html"].status == "indexed"
    chunks = tiny_kb.chunks_of("files", "uploads/page.html")
    assert any("InternLM answers questions." in c["text"] for c in chunks)
    assert tiny_kb.chunks_of("files", "uploads/guide.md")[0]["heading"] == "标题"
    tiny_kb.add_source("repo", str(tiny_kb.settings.repos_path / "files"))
    with pytest.raises(KBError, match="git repository"):
        tiny_kb.upload({"c.md": b"# c\n"}, "repo")


@pytest.mark.parametrize("web_url,expected", [
    ("https://gitee.com/InternLM/xtuner", "https://gitee.com/InternLM/xtuner/blob/abc123/docs/a.md#L3-L9"),
    ("https://github.com/InternLM/xtuner/", "https://github.com/InternLM/xtuner/blob/abc123/docs/a.md#L3-L9"),
    ("https://gitlab.com/group/sub/repo", "https://gitlab.com/group/sub/repo/-/blob/abc123/docs/a.md#L3-9"),
    ("https://gitlab.example.org/team/repo", "https://gitlab.example.org/team/repo/-/blob/abc123/docs/a.md#L3-9"),
    ("", ""),
])
def test_permalink_format_per_host(web_url, expected):
    assert citations.permalink(web_url, "abc123", "docs/a.md", 3, 9) == expected
    assert citations.file_url(web_url, "abc123", "docs/a.md") == expected.split("#")[0]


def test_a_source_whose_files_are_missing_fails_alone_and_keeps_its_chunks(tiny_kb):
    """A snapshot imported without --with-repos restores an upload source's chunks, not its files: syncing every
    source crashed on it (a CLI review). Now it is that source's error, the others sync, and nothing is deleted."""
    import shutil

    tiny_kb.upload({"guide.md": b"# Guide\n\nInternLM answers questions.\n"}, "files")
    tiny_kb.upload({"other.md": b"# Other\n\nXTuner fine-tunes models.\n"}, "more")
    chunks = tiny_kb.stats()["chunks"]
    shutil.rmtree(tiny_kb.manifest.source("files").repo_path)
    reports = {r.name: r for r in tiny_kb.sync()}
    assert "uploaded files of source 'files' are missing" in reports["files"].error
    assert not reports["more"].error
    assert tiny_kb.stats()["chunks"] == chunks  # its chunks stay searchable
    with pytest.raises(KBError, match="are missing"):
        tiny_kb.upload({"new.md": b"# New\n"}, "files")
    with pytest.raises(KBError, match="can't be read"):
        tiny_kb.read_document("files", "uploads/guide.md")
    assert tiny_kb.stats()["chunks"] == chunks


def test_a_copied_data_folder_reads_and_writes_its_own_clones(tiny_kb, tiny_st_dir, tiny_embeddings, tmp_path):
    """A review copied a data folder (as a backup restored, or a second instance, would): the copy's rows held the
    first folder's clone paths, so `kb remove` in the copy deleted the original's clone and an upload to the copy
    was committed into the original's. Rows written so (absolute paths) are read as the copy's own now."""
    import shutil
    import sqlite3

    from conftest import base_settings, git
    from kb.service import KnowledgeBase

    tiny_kb.upload({"guide.md": b"# Guide\n\nInternLM answers questions.\n"}, "files")
    original = Path(tiny_kb.manifest.source("files").repo_path)
    head = git("rev-parse", "HEAD", cwd=original)
    tiny_kb.close()
    home = tmp_path / "copy"
    shutil.copytree(tiny_kb.settings.home, home, ignore=shutil.ignore_patterns(".write.lock"))
    with sqlite3.connect(home / "manifest.sqlite") as con:  # as a row written before the fix holds it
        con.execute("UPDATE sources SET repo_path = ?", (str(original),))
    con.close()
    copy = KnowledgeBase(base_settings(home, embed_model=str(tiny_st_dir), embed_backend="torch"),
                         embeddings=tiny_embeddings)
    try:
        assert Path(copy.manifest.source("files").repo_path) == (home / "repos" / "files").resolve()
        assert not copy.upload({"private.md": b"# Private\n\nOnly the copy has this.\n"}, "files").error
        copy.remove_source("files")
    finally:
        copy.close()
    assert not (home / "repos" / "files").exists()
    assert original.is_dir() and git("rev-parse", "HEAD", cwd=original) == head
    assert not (original / "uploads" / "private.md").exists()


def test_one_upload_may_not_hold_two_files_of_one_name():
    """The dashboard built {name: bytes}, and `kb upload a/x.md b/x.md` too: the second file replaced the first."""
    assert sources.named_files([("a.md", b"1"), ("b.md", b"2")]) == {"a.md": b"1", "b.md": b"2"}
    with pytest.raises(KBError, match=r"two files named 'x.md' in one upload"):
        sources.named_files([("x.md", b"1"), ("y.md", b"2"), ("x.md", b"3")])
