"""The command-line contract: --json objects on stdout, errors on stderr, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, git


def kb(home, *args, env_extra=None, check_json=True):
    env = {**os.environ, "KB_HOME": str(home), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "kb", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout) if check_json and "--json" in args else None
    return proc, out


def kb_here(home, monkeypatch, capsys, *args, env_extra=None) -> tuple[int, str, str]:
    """``kb ARGS`` through the same ``run`` as ``python -m kb``, in this process: for contracts checked many times
    over, where an interpreter start per case (about 2 s) was most of the time. Status, stdout, stderr."""
    from kb.cli import main

    for key, value in {"KB_HOME": str(home), **(env_extra or {})}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, tiny_st_dir):
    return tmp_path_factory.mktemp("cli-home"), {"KB_EMBED_MODEL": str(tiny_st_dir)}


def test_a_pass_the_stop_signal_ends_is_no_failed_pass(tmp_path, monkeypatch, capsys):
    """Under load SIGTERM landed mid-pass, the pass was cancelled at a safe point, and `kb watch` summed it up as
    "failed_passes": 1. A pass that fails on its own still counts."""
    import kb.jobs

    def passes(states):
        def fake_watch(kb, every, *, on_run, stop, **_):
            for i, state in enumerate(states):
                if state == "cancelled":
                    os.kill(os.getpid(), signal.SIGTERM)  # the real handler: stop set, the queue asked to stop
                    assert stop.wait(10)
                on_run({"id": f"j{i}", "kind": "sync", "state": state, "report": {"sources": [], "unchanged": ["x"]}})
            return len(states)
        return fake_watch

    for states, failed in ((["done", "cancelled"], 0), (["failed", "cancelled"], 1)):
        monkeypatch.setattr(kb.jobs, "watch", passes(states))
        code, out, _ = kb_here(tmp_path / "home", monkeypatch, capsys, "watch", "--every", "1h", "--json")
        summary = json.loads(out.strip().splitlines()[-1])
        assert code == 0 and summary["stopped"] == "signal" and summary["failed_passes"] == failed, out


def test_add_sync_stats_search_json(cli_home, corpus):
    home, env = cli_home
    proc, out = kb(home, "add", "lagent", str(corpus / "lagent.bundle"), "--json", env_extra=env)
    assert proc.returncode == 0 and out["source"]["name"] == "lagent"
    proc, out = kb(home, "sync", "lagent", "lagent", "--dry-run", "--json", env_extra=env)
    assert len(out["sources"]) == 1  # a name given twice is synced once (it was synced and reported twice)
    rep = out["sources"][0]
    assert rep["files_added"] > 0 and rep["chunks_embedded"] > 0 and rep["dry_run"] is True
    proc, out = kb(home, "stats", "--json", env_extra=env)
    assert out["chunks"] == 0  # the dry run wrote nothing
    proc, out = kb(home, "sync", "--json", env_extra=env)
    rep = out["sources"][0]
    keys = ["name", "commit_before", "commit_after", "files_added", "files_modified", "files_deleted",
            "chunks_embedded", "chunks_reused", "chunks_deleted", "seconds"]
    assert all(k in rep for k in keys) and rep["chunks_embedded"] > 0
    proc, out = kb(home, "stats", "--json", env_extra=env)
    assert out["sources"] == 1 and out["documents"] > 0 and out["chunks"] > 0 and len(out["collections"]) == 1
    for mode in ("dense", "bm25", "hybrid"):
        proc, out = kb(home, "search", "agent action", "-k", "3", "--mode", mode, "--json", env_extra=env)
        assert proc.returncode == 0 and len(out["hits"]) == 3
        hit = out["hits"][0]
        assert {"rank", "score", "mode", "source", "path", "line_start", "line_end", "commit", "url", "text"} <= set(hit)
    proc, out = kb(home, "collections", "--json", env_extra=env)
    assert out["collections"][0]["live"] is True
    proc, _ = kb(home, "sync", env_extra=env)
    assert proc.returncode == 0 and "chunks embedded 0" in proc.stdout and "(did)" not in proc.stdout
    proc, _ = kb(home, "sync", "--dry-run", env_extra=env)  # said "(would)" / "(did)" (an operator review)
    assert proc.returncode == 0 and "(dry run: what a sync would do, nothing written)" in proc.stdout


def test_usage_errors_keep_the_json_promise(cli_home):
    """An operator review: with --json, a usage error printed argparse's text on stderr only, stdout empty."""
    home, env = cli_home
    proc, out = kb(home, "search", "--json", "x", "-k", "two", env_extra=env)
    assert proc.returncode == 2 and "invalid int value: 'two'" in out["error"] and out["usage"].startswith("usage: kb search")
    assert "invalid int value" in proc.stderr  # the text as before
    proc, _ = kb(home, "search", "x", "-k", "two", env_extra=env)
    assert proc.returncode == 2 and proc.stdout == ""  # without --json, stdout stays empty


@pytest.mark.parametrize(
    "args,message",
    [
        (["add", "--", "-bad", "/tmp"], "invalid source name"),
        (["add", "--", "x", "--upload-pack=touch /tmp/p"], "refused URL"),
        (["add", "evil", "ext::sh -c 'touch /tmp/pwned'"], "not allowed"),
        (["add", "x", "https://gitee.com/InternLM/xtuner", "--branch=-x"], "invalid branch"),
        (["sync", "nope"], "no source named"),
        (["drop-collection", "nope"], "no collection"),
        (["rechunk", "--chunk-size", "100", "--chunk-overlap", "200"], "overlap"),
        (["upload", "/no/such/file.md", "--source", "f"], "no such file"),
        (["upload", "/tmp", "--source", "f"], "/tmp is a folder: give its files"),  # was "no such file"
        (["upload", "/proc/self/mem", "--source", "f"], "cannot read /proc/self/mem"),  # was OSError's traceback
        (["search", "xtuner", "--threshold", "nan"], "the threshold must be a number"),  # was "no hits", status 0
        (["search", "  "], "empty"),
        (["search", "xtuner", "-k", "0"], "k must be between 1 and 200"),  # was read as the default
        (["ask", "  "], "the question is empty"),  # said before the model loads
        (["search", "xtuner", "--source", "nosuch"], "no source named 'nosuch'"),  # was "no hits", status 0
        (["add", "x", "/tmp", "--extensions", "../x,*"], "invalid extension(s) '../x', '*'"),  # matched none, silently
        (["export", "/proc/kb.tar.gz"], "cannot write the snapshot in /proc"),  # was mkdtemp's traceback
        (["export", "/etc/passwd"], "already exists; give another file name, or --force"),  # was replaced unasked
        (["eval", "/no/such.jsonl"], "no such question file"),
        (["eval", "/tmp"], "/tmp is a folder: give a question file"),  # was "no such question file"
        (["eval", "/proc/self/mem"], "cannot read /proc/self/mem"),  # was OSError's traceback
        (["export", "/etc/passwd/kb.tar.gz"], "/etc/passwd is a file, not a folder"),  # was "does not exist"
    ],
)
def test_errors_are_clear(cli_home, args, message, monkeypatch, capsys):
    home, env = cli_home
    code, _, err = kb_here(home, monkeypatch, capsys, *args, env_extra=env)
    assert code == 1 and message in err and err.startswith("error:")
    json_args = args[:1] + ["--json"] + args[1:]
    code, out, _ = kb_here(home, monkeypatch, capsys, *json_args, env_extra=env)
    assert code == 1 and message in json.loads(out)["error"]


def test_an_upload_over_the_limit_is_refused_before_it_is_read(cli_home, tmp_path, monkeypatch, capsys):
    """It was read whole first (an operator review): 8 GiB here, sparse, so that reading it would show."""
    home, env = cli_home
    big = tmp_path / "big.md"
    with open(big, "wb") as fh:
        fh.truncate(8 * 2**30)
    code, _, err = kb_here(home, monkeypatch, capsys, "upload", str(big), "--source", "f", env_extra=env)
    assert code == 1 and "big.md: 8,589,934,592 bytes is over the upload limit" in err


def test_an_unreadable_snapshot_is_one_line_and_changes_nothing(cli_home, tmp_path, monkeypatch, capsys):
    """An archive that can't be read (or a disk that fills while its parts are written) was OSError's traceback."""
    _, env = cli_home
    code, out, _ = kb_here(tmp_path / "empty", monkeypatch, capsys, "import", "/proc/self/mem", "--json", env_extra=env)
    assert code == 1 and json.loads(out)["error"].startswith("cannot import mem: ")
    assert not [p for p in (tmp_path / "empty").iterdir() if p.name.startswith(".import-")]


def test_an_error_is_one_line_from_the_process_too(cli_home):
    """The cases above run in this process; the same contract once through ``python -m kb`` itself."""
    home, env = cli_home
    proc, _ = kb(home, "search", "xtuner", "--source", "nosuch", env_extra=env)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.startswith("error: no source named 'nosuch'")
    assert proc.stderr.count("\n") == 1
    proc, out = kb(home, "search", "--json", "xtuner", "--source", "nosuch", env_extra=env)
    assert proc.returncode == 1 and list(out) == ["error"] and out["error"].startswith("no source named 'nosuch'")


def test_an_upload_file_name_that_is_not_utf8_is_refused_before_anything_is_written(cli_home, tmp_path):
    """An operator review: a Latin-1 name ("caf\\xe9.md") got git's traceback, and the file stayed in the upload
    folder untracked for good."""
    home, env = cli_home
    raw = os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.md")
    with open(raw, "wb") as fh:
        fh.write(b"# Cafe\n\nA page.\n")
    proc, _ = kb(home, "upload", os.fsdecode(raw), "--source", "latin", env_extra=env)
    assert proc.returncode == 1 and "not UTF-8; rename the file" in proc.stderr
    assert not (home / "repos" / "latin").exists()
    # under --json too: the error quoting that name failed in its own handler, a traceback; now valid UTF-8 JSON
    # whose string holds the name as Python read it
    proc, out = kb(home, "upload", os.fsdecode(raw + b"x"), "--source", "latin", "--json", env_extra=env)
    assert proc.returncode == 1 and out["error"].startswith("no such file: ") and "caf\udce9.mdx" in out["error"]


def test_an_upload_whose_every_file_is_refused_fails(cli_home, tmp_path):
    """Every file skipped (binary, empty) exited 0, its reasons only as indented lines (a review); nothing stored
    changes either way."""
    home, env = cli_home
    (tmp_path / "blob.md").write_bytes(b"\x00\x01\x02 binary")
    (tmp_path / "empty.md").write_bytes(b"")
    proc, out = kb(home, "upload", str(tmp_path / "blob.md"), str(tmp_path / "empty.md"), "--source", "refused",
                   "--json", env_extra=env)
    assert proc.returncode == 1 and "none of the 2 file(s) was indexed" in out["error"]
    assert {s["path"] for s in out["sources"][0]["skipped"]} == {"uploads/blob.md", "uploads/empty.md"}
    assert out["files"] == {"new": 0, "changed": 0, "unchanged": 0, "skipped": 2}
    (tmp_path / "blob2.md").write_bytes(b"\x00\x03 binary too")
    proc, _ = kb(home, "upload", str(tmp_path / "blob2.md"), "--source", "refused", env_extra=env, check_json=False)
    assert proc.returncode == 1 and "error: none of the 1 file(s) was indexed" in proc.stderr  # said in text too
    assert "1 file(s): 1 skipped, not indexed" in proc.stdout
    (tmp_path / "ok.md").write_bytes(b"# Notes\n\nA file that is indexed.\n")
    proc, out = kb(home, "upload", str(tmp_path / "ok.md"), str(tmp_path / "blob.md"), "--source", "refused",
                   "--json", env_extra=env)
    assert proc.returncode == 0 and "error" not in out, out
    # blob.md is the same bytes as before, skipped then: still skipped, not "unchanged" as if indexed (a review)
    assert out["files"] == {"new": 1, "changed": 0, "unchanged": 0, "skipped": 1}
    (again,) = [s for s in out["sources"][0]["skipped"] if s["path"] == "uploads/blob.md"]
    assert again["reason"].endswith("(unchanged since it was skipped)")
    (tmp_path / "ok.md").write_bytes(b"# Notes\n\nA file that is indexed, changed.\n")
    (tmp_path / "more.md").write_bytes(b"# More\n\nAnother one.\n")
    proc, _ = kb(home, "upload", str(tmp_path / "ok.md"), str(tmp_path / "more.md"), "--source", "refused",
                 env_extra=env, check_json=False)
    assert proc.returncode == 0 and "2 file(s): 1 new, 1 changed" in proc.stdout, proc.stdout


# git's HTTPS to a closed local port: unreachable on any machine, at once, whatever the network
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": "",
              "GIT_TERMINAL_PROMPT": "0"}


def test_unreachable_host_is_named(cli_home):
    home, env = cli_home
    proc, out = kb(home, "add", "InternLM", "https://tok:pw@gitee.com/InternLM/InternLM", "--json",
                   env_extra={**env, **NO_NETWORK})
    assert proc.returncode == 1 and "gitee.com" in out["error"] and "pw@" not in proc.stdout + proc.stderr
    assert not (home / "repos" / "InternLM").exists()


def test_defaults_that_fail_to_add_fail_the_command(tmp_path):
    """Six "cannot reach gitee.com" lines used to end with status 0 (a CLI review)."""
    proc, out = kb(tmp_path / "home", "add", "--defaults", "--json", env_extra=NO_NETWORK)
    assert proc.returncode == 1 and len(out["sources"]) == 6 and not any(r["ok"] for r in out["sources"])
    assert "gitee.com" in out["error"] and proc.stderr.count("ERR ") == 6
    proc, _ = kb(tmp_path / "home", "add", "x", "/tmp", "--defaults")
    assert proc.returncode == 1 and "takes no NAME or URL" in proc.stderr


def test_a_data_folder_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "home").write_text("not a folder")
    for args in (["stats"], ["search", "xtuner"], ["sync"], ["log"]):
        proc, _ = kb(tmp_path / "home", *args)
        assert proc.returncode == 1 and proc.stderr.startswith("error: KB_HOME") and "is a file" in proc.stderr
    assert (tmp_path / "home").read_text() == "not a folder"


def test_eval_contract(cli_home, tmp_path, corpus):
    home, env = cli_home
    qfile = tmp_path / "q.jsonl"
    qfile.write_text('{"id": "q1", "question": "agent action", "repo": "lagent", "path": "README.md", "line_start": 1, "line_end": 9999}\n'
                     '{"id": "q2", "question": "agent action", "repo": "lagent", "path": "no/such.md", "line_start": 1, "line_end": 2}\n')
    kb(home, "add", "lagent", str(corpus / "lagent.bundle"), env_extra=env)  # already there when run in file order
    assert kb(home, "sync", "lagent", env_extra=env)[0].returncode == 0
    proc, out = kb(home, "eval", str(qfile), "-k", "5", "--mode", "bm25", "--json", env_extra=env)
    assert proc.returncode == 0
    assert {"n", "hit@1", "hit@k", "mrr", "k", "mode", "misses"} <= set(out) and out["n"] == 2 and out["mode"] == "bm25"
    # it scores for real: the README question is found, the question about a file that does not exist is missed
    assert out["hit@k"] == 0.5 and out["misses"] == ["q2"] and out["by_category"]["specific"]["n"] == 2
    proc, _ = kb(home, "eval", str(qfile), env_extra=env)
    assert "hit@1=" in proc.stdout and "q1" in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1"}\n')
    proc, out = kb(home, "eval", str(bad), "--json", env_extra=env)
    assert proc.returncode == 1 and "missing field" in out["error"]
    # a shipped set by name; a name that is neither a file nor a set lists the sets
    proc, out = kb(home, "eval", "holdout", "--mode", "bm25", "--json", env_extra=env)
    assert proc.returncode == 0 and out["n"] + len(out.get("not_indexed", [])) == 36
    proc, out = kb(home, "eval", "holdup", "--json", env_extra=env)
    assert proc.returncode == 1 and "no such question file: holdup" in out["error"] and "overview-blind6" in out["error"]


def test_a_question_id_must_be_a_string(tmp_path):
    """``"id": null`` passed the checks and failed in the report's formatting, with a traceback (an operator review)."""
    from kb.errors import KBError
    from kb.evaluate import load_questions

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": null, "question": "q", "repo": "r", "path": "p", "line_start": 1, "line_end": 1}\n')
    with pytest.raises(KBError, match=r'q.jsonl:1: "id" must be a non-empty string'):
        load_questions(bad)


def test_a_run_that_cannot_be_kept_is_still_reported(cli_home, tmp_path, corpus, monkeypatch, capsys):
    """Saving the run failed after it had finished (a full disk, a file where the folder goes): a traceback, and the
    scores (minutes of the model's time with --answers) were lost (an operator review)."""
    home, env = cli_home
    qfile = tmp_path / "q.jsonl"
    qfile.write_text('{"id": "q1", "question": "agent action", "repo": "lagent", "path": "README.md", '
                     '"line_start": 1, "line_end": 9999}\n')
    kb(home, "add", "lagent", str(corpus / "lagent.bundle"), env_extra=env)  # already there when run in file order
    kb(home, "sync", "lagent", env_extra=env)
    evals = home / "evals"
    aside = home / "evals-aside"
    if evals.exists():
        evals.rename(aside)
    try:
        evals.write_text("a file where the runs' folder goes")
        code, out, err = kb_here(home, monkeypatch, capsys, "eval", str(qfile), "--mode", "bm25", "--json",
                                 env_extra=env)
    finally:
        evals.unlink()
        if aside.exists():
            aside.rename(evals)
    report = json.loads(out)
    assert code == 0 and report["n"] == 1 and "could not be kept" in report["not_saved"]
    assert err.startswith("warning: the run could not be kept in")


def test_rechunk_below_the_passage_size_uses_one_rule(cli_home, corpus):
    """`kb rechunk --chunk-size 100` clamps the passage size (120 by default) as the Documents page does."""
    home, env = cli_home
    kb(home, "add", "lagent", str(corpus / "lagent.bundle"), env_extra=env)  # already there when run in file order
    assert kb(home, "sync", "lagent", env_extra=env)[0].returncode == 0
    proc, out = kb(home, "rechunk", "--chunk-size", "100", "--chunk-overlap", "10", "--json", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "+passages 100" in out["chunk_config"] and out["chunks"] > 0


def _lagent_with_the_default_model(cli_home, corpus, gguf, max_tokens: int) -> tuple:
    """The CLI home with lagent indexed, and the environment that answers with the default GGUF in llama.cpp
    (greedy, ``max_tokens`` at most): what the commands that ask the model run on."""
    home, env = cli_home
    env = {**env, "KB_LLM": "llamacpp", "KB_LLM_GGUF": str(gguf), "KB_LLM_MAX_TOKENS": str(max_tokens),
           "KB_LLM_TEMPERATURE": "0"}
    _, stats = kb(home, "stats", "--json", env_extra=env)
    if not stats["sources"]:
        kb(home, "add", "lagent", str(corpus / "lagent.bundle"), "--json", env_extra=env)
    kb(home, "sync", "--json", env_extra=env)
    return home, env


def test_ask_answers_from_the_index_and_says_how_long_the_set_up_took(cli_home, corpus, default_gguf_path):
    """`kb ask` end to end, as a user runs it: the model loads (and reads its rules) while the index is read."""
    home, env = _lagent_with_the_default_model(cli_home, corpus, default_gguf_path, max_tokens=40)
    proc, _ = kb(home, "ask", "What is Lagent?", "-q", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    answer, _, sources = proc.stdout.partition("\nSources:\n")
    assert answer.strip(), proc.stdout
    assert "lagent/README.md:" in sources and "*[" in sources, proc.stdout  # a source it cites, starred
    _, _, sentences = answer.partition("\nSentences:\n")
    supported = [line for line in sentences.splitlines() if line.strip().startswith("[")]
    assert all(line.strip().split()[1].startswith("lagent/") for line in supported), proc.stdout  # source/path:a-b
    assert "s loading the model and the index)" in proc.stderr, proc.stderr
    # `kb ask` ends without the interpreter's teardown (cli.exit_now): what it wrote before is all there
    proc, logged = kb(home, "log", "--kind", "answer", "--kind", "search", "--json", env_extra=env)
    kinds = [r["kind"] for r in logged["records"]]
    assert kinds[-2:] == ["search", "answer"], logged


def test_eval_answers_json_contract(cli_home, corpus, default_gguf_path, tmp_path):
    """`kb eval QUESTIONS --answers --json` through the real chain and model: the report the README and the issue
    name, a row per question, and whether the excerpts held the facts (``facts_shown``)."""
    home, env = _lagent_with_the_default_model(cli_home, corpus, default_gguf_path, max_tokens=24)
    qfile = tmp_path / "answers.jsonl"
    qfile.write_text(
        '{"id": "a", "question": "What is Lagent?", "repo": "lagent", "path": "README.md", "line_start": 1, '
        '"line_end": 9999, "facts": [["agent"]]}\n'
        '{"id": "u", "question": "How much does a Lagent enterprise licence cost?", "repo": "lagent", "path": "", '
        '"line_start": 0, "line_end": 0, "answerable": false}\n', encoding="utf-8")
    proc, out = kb(home, "eval", str(qfile), "--answers", "-k", "2", "--json", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert {"n", "facts", "facts_shown", "gold_cited", "declined", "coverage", "ttft_median", "seconds_median", "k",
            "mode", "rows"} <= set(out)
    assert out["n"] == 2 and out["k"] == 2 and [r["id"] for r in out["rows"]] == ["a", "u"]
    answered, unanswerable = out["rows"]
    assert answered["facts_shown"] is True and out["facts_shown"] == 1.0, "the README's lines say what Lagent is"
    assert answered["sources"] and isinstance(answered["facts"], bool) and isinstance(answered["gold_cited"], bool)
    assert isinstance(unanswerable["declined"], bool) and "facts" not in unanswerable
    assert all(r["ttft_s"] is not None and r["seconds"] >= r["ttft_s"] for r in out["rows"])
    saved = sorted((home / "evals" / "answers").glob("*.json"))  # kept as the Evaluation page keeps its runs
    assert saved and json.loads(saved[-1].read_text())["n"] == 2


def test_ask_with_an_index_it_cannot_read_fails_before_loading_the_model(cli_home, monkeypatch, capsys):
    """The index is checked before the model starts loading in its thread: the error comes at once (1.5 s for the
    whole process against 6.3 s when it waited for the model), and no model is loaded for an answer that can't be."""
    from kb import cli

    home, env = cli_home
    for key, value in {"KB_HOME": str(home), "KB_CHROMA_URL": "http://127.0.0.1:9", **env}.items():
        monkeypatch.setenv(key, value)
    loads = []
    monkeypatch.setattr(cli, "_ready_chat_model", lambda *args: loads.append(args))
    assert cli.main(["ask", "What is Lagent?"]) == 1
    assert "cannot reach the Chroma server at http://127.0.0.1:9" in capsys.readouterr().err
    assert loads == []


def test_a_reader_that_goes_away_ends_the_command_quietly(cli_home, monkeypatch, capsys):
    """`kb search … | head -1`: the next write fails with a broken pipe, which is no error of ours."""
    from kb import cli

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    home, env = cli_home
    for key, value in {"KB_HOME": str(home), **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "stdout", Gone())
    assert cli.main(["stats"]) == 141
    assert cli.main(["sources", "--json"]) == 141
    assert "Traceback" not in capsys.readouterr().err



def test_a_file_name_cannot_write_escape_sequences_to_the_terminal(tmp_path, monkeypatch, capsys, tiny_st_dir):
    """A security review: a repository's file named with ESC [2J cleared the operator's screen in `kb sync` output."""
    repo = tmp_path / "remote"
    git("init", "-q", "-b", "main", str(repo))
    name = "clear\x1b[2Jme\rforged.md"
    (repo / name).write_text("# Title\n\nSome text about agents.\n")
    git("add", "-A", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=repo)
    env = {"KB_EMBED_MODEL": str(tiny_st_dir)}
    code, out, err = kb_here(tmp_path / "home", monkeypatch, capsys, "add", "esc", str(repo), env_extra=env)
    assert code == 0, err
    code, out, err = kb_here(tmp_path / "home", monkeypatch, capsys, "sync", "esc", "--dry-run", env_extra=env)
    assert code == 0, err
    assert "clear\\x1b[2Jme\\x0dforged.md" in out and "\x1b" not in out and "\r" not in out
    code, out, err = kb_here(tmp_path / "home", monkeypatch, capsys, "sync", "esc", "--dry-run", "--json",
                             env_extra=env)
    assert code == 0 and "\x1b" not in out and name in out.encode().decode("unicode_escape")  # JSON escapes it
