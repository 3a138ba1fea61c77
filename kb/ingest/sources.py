"""Sources: git repositories (GitPython) and files-only upload sources.

Every source lives as a git repository under ``KB_HOME/repos/NAME``. Remote
sources are bare clones whose branches are fetched in place; an upload source
is a local repository in which each upload is a commit. So sync works the same
way for both: diff the indexed commit against the new one.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import git

from core.settings import redact
from kb.errors import KBError
from kb.progress import GitProgress, Progress, no_progress

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
ALLOWED_SCHEMES = {"https", "http", "ssh", "git", "file"}
SCP_RE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*|/.*)$")
UPLOADS_DIR = "uploads"

DEFAULT_SOURCES: dict[str, str] = {
    "opencompass": "https://gitee.com/open-compass/opencompass",
    "lmdeploy": "https://gitee.com/InternLM/lmdeploy",
    "xtuner": "https://gitee.com/InternLM/xtuner",
    "InternLM-XComposer": "https://gitee.com/InternLM/InternLM-XComposer",
    "lagent": "https://gitee.com/InternLM/lagent",
    "InternLM": "https://gitee.com/InternLM/InternLM",
}


@dataclass(frozen=True)
class SourceSpec:
    """What a person asked for, validated."""

    name: str
    url: str  # as given, possibly with credentials: only ever handed to git
    branch: str | None = None
    web_url: str = ""

    @property
    def display_url(self) -> str:
        return redact(self.url)


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or "") or name.startswith(("-", ".")):
        raise KBError(
            f"invalid source name {name!r}: use 1-64 letters, digits, '-', '_' or '.', "
            "not starting with '-' or '.'"
        )
    return name


EXTENSION_RE = re.compile(r"[a-z0-9][a-z0-9_+-]{0,15}")


def validate_extensions(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """File extensions as names ("md", "rst"): "../x" or "*" matched no file, and the sync indexed nothing, silently."""
    bad = [e for e in extensions if not EXTENSION_RE.fullmatch(e)]
    if bad:
        raise KBError(f"invalid extension(s) {', '.join(map(repr, bad))}: give names like md,txt,rst")
    return extensions


def validate_branch(branch: str | None) -> str | None:
    if branch is None:
        return None
    bad = (
        not branch
        or branch.startswith(("-", "/"))
        or ".." in branch
        or branch.endswith((".lock", "/", "."))
        or re.search(r"[\s~^:?*\[\\\x00-\x1f\x7f]", branch)
        or "@{" in branch
    )
    if bad:
        raise KBError(f"invalid branch name {branch!r}")
    return branch


def strip_credentials(url: str) -> str:
    """``https://user:token@host/r`` -> ``https://host/r``: what may leave this machine (a snapshot's clones).

    An ssh user name is kept: it is no secret, and ssh authenticates by key.
    """
    return re.sub(r"^(https?://)[^/@]+@", r"\1", url, flags=re.IGNORECASE)


def check_transport(url: str) -> None:
    """Refuse a URL whose transport could run a command (``ext::``, an option-like ``-...``, unknown schemes)."""
    if not url or url.startswith("-"):
        raise KBError(f"refused URL {redact(url)!r}: it must not be empty or start with '-'")
    if "::" in url.split("/", 1)[0] or url.lower().startswith("ext::"):
        raise KBError(f"refused URL {redact(url)!r}: the transport is not allowed (only https, http, ssh, git, file, local paths)")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ALLOWED_SCHEMES:
            raise KBError(f"refused URL {redact(url)!r}: transport {scheme!r} is not allowed (only https, http, ssh, git, file, local paths)")
        if scheme != "file" and not urlsplit(url).hostname:
            raise KBError(f"refused URL {redact(url)!r}: no host")


def validate_url(url: str) -> str:
    """Accept https/http/ssh/git/file URLs, scp-like ``user@host:path`` and local paths."""
    check_transport(url)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        return url
    local = Path(url).expanduser()
    if local.exists():
        if not (local.is_dir() or local.suffix == ".bundle"):
            raise KBError(f"{url!r} is neither a git repository folder nor a .bundle file")
        return str(local.resolve())
    if SCP_RE.match(url) and not url.startswith(("/", ".", "~")):
        return url
    raise KBError(f"{url!r} is not a URL and no such local path exists")


def validate_web_url(web_url: str | None) -> str | None:
    """A repository's web page, for permalinks: http(s) with a host, or none.

    A browser review added `javascript:alert(1)`: accepted, listed as a link on the Sources page, and every
    "open on the web" link of its documents went nowhere.
    """
    if web_url is None or not web_url.strip():
        return None
    web_url = web_url.strip()
    parts = urlsplit(web_url)
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise KBError(f"refused web URL {redact(web_url)!r}: give the repository's web page as http(s)://host/path "
                      "(it makes the permalinks), or leave it empty")
    return web_url.rstrip("/")


def host_of(url: str) -> str:
    if "://" in url:
        return urlsplit(url).hostname or ""
    m = SCP_RE.match(url)
    return m.group("host") if m and not Path(url).exists() else "local"


def web_url_for(url: str) -> str:
    """The browsable web page of a gitee/github/gitlab repository, if known."""
    host = host_of(url)
    if host not in {"gitee.com", "github.com", "gitlab.com"}:
        return ""
    path = urlsplit(url).path if "://" in url else SCP_RE.match(url).group("path")  # type: ignore[union-attr]
    path = path.strip("/").removesuffix(".git")
    return f"https://{host}/{path}" if path else ""


def _git_error(exc: git.GitCommandError, spec_url: str, progress: GitProgress, verb: str = "clone") -> KBError:
    """A one-line reason from git's own words; with progress on, they arrive on the progress object."""
    stderr = "\n".join([(exc.stderr or "").replace("\\n", "\n"), *progress.error_lines, *progress.other_lines])
    lines = [l.strip().strip("'").strip() for l in stderr.splitlines() if l.strip()]
    reason = next((l.split("fatal:", 1)[1].strip() for l in lines if "fatal:" in l), "")
    reason = redact_all(reason or (lines[-1] if lines else f"git exited with status {exc.status}"))
    host = host_of(spec_url)
    if host == "local":
        return KBError(f"cannot {verb} {redact(spec_url)}: {reason}")
    return KBError(f"cannot reach {host or 'the remote'}: {reason}")


def redact_all(text: str) -> str:
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@", r"\1***@", text)


def remote_head_branch(url: str) -> str | None:
    """The branch a clone without ``--branch`` would follow, asked of the remote before anything is cloned.

    Its ``HEAD`` symref where the server reports one; else (a bundle, a dumb server) the one branch at ``HEAD``'s
    commit, as ``git clone`` itself guesses. None when the remote can't be asked or doesn't tell: the clone decides.
    """
    try:
        out = git.cmd.Git().ls_remote("--symref", url)
    except git.GitCommandError:
        return None
    refs: dict[str, str] = {}
    for line in out.splitlines():
        left, _, ref = line.partition("\t")
        if left.startswith("ref: refs/heads/") and ref == "HEAD":
            return left.removeprefix("ref: refs/heads/")
        refs[ref] = left
    at_head = [r.removeprefix("refs/heads/") for r, sha in refs.items()
               if r.startswith("refs/heads/") and sha == refs.get("HEAD")]
    return at_head[0] if len(at_head) == 1 else None


def clone(spec: SourceSpec, dest: Path, progress: Progress = no_progress) -> str:
    """Bare-clone ``spec`` into ``dest`` and return the branch to follow.

    Branches are fetched straight into ``refs/heads`` so a later fetch moves
    them; a failure removes the half-made folder.
    """
    if dest.exists():  # no source has this name (checked first): a folder left behind by hand or by a crash
        raise KBError(f"folder {dest} already exists, though no source uses it: delete it, then add the source")
    watcher = GitProgress(progress, "clone")
    try:
        kwargs = {"branch": spec.branch} if spec.branch else {}
        repo = git.Repo.clone_from(spec.url, dest, bare=True, progress=watcher, **kwargs)
        with repo.config_writer() as cfg:
            cfg.set_value('remote "origin"', "fetch", "+refs/heads/*:refs/heads/*")
        branch = spec.branch or repo.head.reference.name
        repo.commit(f"refs/heads/{branch}")
        return branch
    except git.GitCommandError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise _git_error(exc, spec.url, watcher) from None
    except (ValueError, TypeError, git.BadName) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise KBError(f"{redact(spec.url)}: branch {spec.branch or 'HEAD'!r} not found ({exc})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def open_repo(name: str, kind: str, repo_path: Path, url: str = "") -> git.Repo:
    """A source's repository, or one error saying that it is missing and what to do about it.

    Sync, fetch, upload and reading a document all come here: a data folder restored from a snapshot made without
    ``--with-repos`` has its chunks but not its clones, and each of them must say so the same way, not crash.
    A git source's clone comes back by adding it again; a files-only source's uploads exist nowhere else.
    """
    try:
        return git.Repo(repo_path)
    except (git.NoSuchPathError, git.InvalidGitRepositoryError):
        if kind == "git":
            raise KBError(f"the clone of {redact(url)} is missing ({repo_path}): its chunks stay searchable; "
                          f"kb sync {repo_path.name} clones it anew from its remote") from None
        raise KBError(f"the uploaded files of source {name!r} are missing ({repo_path}): its chunks stay searchable, "
                      f"but it can't be synced or take more uploads; import a snapshot made with --with-repos, or "
                      f"remove it (kb remove {name}) and upload its files again") from None


def fetch(repo_path: Path, branch: str, url: str, progress: Progress = no_progress) -> str:
    """Fetch the remote and return the branch's new head commit.

    A clone whose folder is gone (a snapshot imported without ``--with-repos`` while the remote was away, a folder
    deleted by hand) is cloned anew: its indexed commit is the remote's too, so the sync goes on from it. Before,
    the only way back was to remove the source and add it again, embedding all of it anew.
    """
    if not repo_path.exists() and url:
        try:
            clone(SourceSpec(repo_path.name, validate_url(url), branch), repo_path, progress)
        except KBError as exc:
            raise KBError(f"the clone ({repo_path}) is missing and cannot be cloned anew: {exc}; its chunks stay "
                          "searchable, and the next sync tries again") from None
        return head_commit(repo_path, branch)
    repo = open_repo("", "git", repo_path, url)
    watcher = GitProgress(progress, "fetch")
    try:
        fetched = repo.remote("origin").fetch(progress=watcher)
    except git.GitCommandError as exc:
        raise _git_error(exc, url, watcher, verb="fetch from") from None
    advertised = {i.name for i in fetched} | {str(i.remote_ref_path).strip().removeprefix("refs/heads/") for i in fetched}
    if fetched and branch not in advertised:
        # the fetch doesn't prune: the clone's branch stays where it was, and every sync said "unchanged" forever
        raise KBError(f"branch {branch!r} no longer exists on {redact(url)}: the source stays at its last indexed "
                      "commit, its chunks searchable; remove it and add it again with another --branch")
    return head_commit(repo_path, branch)


def head_commit(repo_path: Path, branch: str) -> str:
    try:
        return git.Repo(repo_path).commit(f"refs/heads/{branch}").hexsha
    except (git.BadName, ValueError):
        raise KBError(f"branch {branch!r} not found in {repo_path.name}") from None


def init_files_repo(dest: Path) -> str:
    """A local repository for uploads; returns its branch."""
    dest.mkdir(parents=True, exist_ok=False)
    repo = git.Repo.init(dest, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "kb upload")
        cfg.set_value("user", "email", "kb@localhost")
    return "main"


SAFE_FILE_RE = re.compile(r"^[^\x00-\x1f\x7f/\\:*?\"<>|]{1,200}$")


def safe_upload_name(raw_name: str, allowed: tuple[str, ...]) -> str:
    """Keep only a plain, harmless base name, or refuse."""
    name = raw_name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if raw_name != name and (".." in raw_name.split("/") or raw_name.startswith(("/", "\\"))):
        raise KBError(f"refused file name {raw_name!r}: paths are not allowed")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a name in another encoding, as the shell passed its bytes (git's index refused it
        # half-way, with a traceback, and the file stayed in the upload folder untracked: an operator review)
        raise KBError(f"refused file name {ascii(raw_name)}: not UTF-8; rename the file") from None
    if not name or name.startswith((".", "-")) or not SAFE_FILE_RE.fullmatch(name):
        raise KBError(f"refused file name {raw_name!r}")
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in allowed:
        raise KBError(f"refused {name!r}: extension {('.' + ext) if ext else '(none)'} is not allowed (allowed: {', '.join(allowed)})")
    return name


def check_upload_size(name: str, size: int, limit: int) -> None:
    """Refuse a file over ``KB_UPLOAD_MAX_BYTES``; the CLI asks before reading a file, the dashboard after."""
    if size > limit:
        raise KBError(f"{name}: {size:,} bytes is over the upload limit of {limit:,} (KB_UPLOAD_MAX_BYTES)")


def named_files(files: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
    """One upload's files by name; two with one name are refused (the upload folder holds one file of each name,
    and the dashboard's dict of them kept the second without a word: a browser review)."""
    out: dict[str, bytes] = {}
    twice = []
    for name, data in files:
        if name in out:
            twice.append(name)
        out[name] = data
    if twice:
        raise KBError(f"two files named {', '.join(repr(n) for n in sorted(set(twice)))} in one upload: "
                      "an upload folder holds one file of each name; rename one or upload them separately")
    return out


def upload_outcome(report: dict, given: int) -> dict[str, int]:
    """What an upload did with its ``given`` files: how many are new, changed, unchanged, and skipped.

    A skipped file (binary, empty, not UTF-8, over KB_MAX_FILE_BYTES) is committed and listed among the source's
    documents with its reason, as a git source's would be, but it is not indexed: the dashboard said "Indexed 2
    file(s)" when both were skipped (a browser review). The dashboard and ``kb upload`` both say it from these counts.
    """
    skipped = {x["path"] for x in report.get("skipped", [])}
    new = len(set(report.get("added", [])) - skipped)
    changed = len(set(report.get("modified", [])) - skipped)
    return {"new": new, "changed": changed, "unchanged": max(0, given - len(skipped) - new - changed),
            "skipped": len(skipped)}


def outcome_text(counts: dict[str, int]) -> str:
    """``"2 new, 4 skipped, not indexed"``: the non-zero counts of :func:`upload_outcome`."""
    labels = (("new", "new"), ("changed", "changed"), ("unchanged", "unchanged"), ("skipped", "skipped, not indexed"))
    return ", ".join(f"{counts[key]} {label}" for key, label in labels if counts[key]) or "nothing"


def commit_uploads(name: str, repo_path: Path, files: dict[str, bytes]) -> str:
    """Write files into the upload repo and commit them; returns the commit."""
    repo = open_repo(name, "files", repo_path)
    target = repo_path / UPLOADS_DIR
    target.mkdir(exist_ok=True)
    rels = []
    for name, data in files.items():
        (target / name).write_bytes(data)
        rels.append(f"{UPLOADS_DIR}/{name}")
    repo.index.add(rels)
    if repo.head.is_valid() and not repo.index.diff("HEAD"):
        return repo.head.commit.hexsha
    # no hooks: the upload repository is ours, and a hook in it (a snapshot's, say) must not run on an upload
    return repo.index.commit(f"upload {', '.join(files)}", skip_hooks=True).hexsha
