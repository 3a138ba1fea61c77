"""``python -m kb``: the command-line contract of DESIGN §6.

Every command takes ``--json`` and then prints exactly one JSON object on
stdout. Messages and progress go to stderr. Expected failures (the
:class:`core.errors.UserError` family) exit with status 1 and a one-line
message, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from core.errors import UserError
from core.settings import split_list
from kb.errors import KBError
from kb.log import KINDS as LOG_KINDS

Handler = Callable[[argparse.Namespace], dict]


def _kb(args: argparse.Namespace):
    from kb.service import KnowledgeBase

    return KnowledgeBase()


def _progress(args: argparse.Namespace):
    from kb.progress import TqdmProgress

    return TqdmProgress(enabled=_bars(args))


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars on stderr: on a terminal unless -q, or wherever --progress asks for them."""
    return bool(not args.quiet and sys.stderr.isatty() or args.progress)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text)


def cmd_add(args: argparse.Namespace) -> dict:
    kb, progress = _kb(args), _progress(args)
    try:
        if args.defaults:
            if args.name or args.url:
                raise KBError("kb add --defaults takes no NAME or URL: it registers the six default repos")
            results = kb.add_defaults(progress)
            for r in results:
                print(f"{'ok ' if r['ok'] else 'ERR'} {r['name']}: {r['message']}", file=sys.stderr)
            failed = [r for r in results if not r["ok"]]  # any: the exit status says so, as `kb sync`'s does
            return {"sources": results, **({"error": "; ".join(f"{r['name']}: {r['message']}" for r in failed)}
                                           if failed else {})}
        if not args.name or not args.url:
            raise KBError("usage: kb add NAME URL_OR_PATH [--branch B]  (or kb add --defaults)")
        exts = split_list(args.extensions) or None if args.extensions else None
        row = kb.add_source(args.name, args.url, args.branch, args.web_url, exts, progress)
    finally:
        progress.close()
    _say(args, f"added {row.name} ({row.url}, branch {row.branch}); run `kb sync {row.name}` to index it")
    return {"source": row.as_dict()}


def cmd_remove(args: argparse.Namespace) -> dict:
    removed = _kb(args).remove_source(args.name)
    _say(args, f"removed {args.name} and {removed} chunks")
    return {"removed": args.name, "chunks_deleted": removed}


def cmd_sources(args: argparse.Namespace) -> dict:
    rows = _kb(args).sources()
    for r in rows:
        _say(args, f"{r.name:24} {r.kind:5} {r.branch:12} {(r.indexed_commit or 'not indexed')[:12]:12} {r.url}")
    return {"sources": [r.as_dict() for r in rows]}


def _print_report(args: argparse.Namespace, rep: dict) -> None:
    if args.json:
        return
    if rep["error"]:
        print(f"{rep['name']}: ERROR {rep['error']}", file=sys.stderr)
        return
    dry = " (dry run: what a sync would do, nothing written)" if rep["dry_run"] else ""
    before, after = (rep["commit_before"] or "none")[:10], (rep["commit_after"] or "none")[:10]
    print(
        f"{rep['name']}: {before} -> {after}{dry}: files +{rep['files_added']} ~{rep['files_modified']} "
        f"-{rep['files_deleted']}; chunks embedded {rep['chunks_embedded']}, reused {rep['chunks_reused']}, "
        f"deleted {rep['chunks_deleted']}; passages embedded {rep['passages_embedded']}; {rep['seconds']:.2f}s"
    )
    if rep["dry_run"]:
        for tag, key in (("+", "added"), ("~", "modified"), ("-", "deleted")):
            for p in rep[key]:
                print(f"  {tag} {p}")
    for s in rep["skipped"]:
        print(printable(f"  skipped {s['path']}: {s['reason']}"), file=sys.stderr)
    over = rep["chunks_overlong"]
    if over:
        print(
            f"  warning: {len(over)} chunks are longer than the embedding model's window of {over[0]['window']} tokens; "
            f"their tails are not embedded (e.g. {over[0]['path']}:{over[0]['line_start']}-{over[0]['line_end']}, "
            f"{over[0]['tokens']} tokens). Consider `kb rechunk --unit tokens`.",
            file=sys.stderr,
        )


def cmd_sync(args: argparse.Namespace) -> dict:
    kb, progress = _kb(args), _progress(args)
    try:
        reports = [r.as_dict() for r in kb.sync(args.names or None, dry_run=args.dry_run, progress=progress)]
    finally:
        progress.close()
    for rep in reports:
        _print_report(args, rep)
    failed = [r for r in reports if r["error"]]
    out = {"sources": reports}
    if failed:
        out["error"] = "; ".join(f"{r['name']}: {r['error']}" for r in failed)
    return out


def cmd_upload(args: argparse.Namespace) -> dict:
    from kb.ingest.sources import check_upload_size, named_files, outcome_text, upload_outcome

    given = []
    for f in args.files:
        p = Path(f)
        if p.is_dir():
            raise KBError(f"{f} is a folder: give its files (e.g. {f.rstrip('/')}/*.md)")
        if not p.is_file():
            raise KBError(f"no such file: {f}")
    kb = _kb(args)
    limit = kb.settings.upload_max_bytes
    for f in args.files:  # sized before read: a file of gigabytes was read whole only to be refused
        p = Path(f)
        try:
            check_upload_size(p.name, p.stat().st_size, limit)
            given.append((p.name, p.read_bytes()))
        except OSError as exc:  # unreadable (permissions, a device gone): one line, as for a missing file
            raise KBError(f"cannot read {f}: {exc.strerror or exc}") from None
    files = named_files(given)
    progress = _progress(args)
    try:
        rep = kb.upload(files, args.source, progress).as_dict()
    finally:
        progress.close()
    _print_report(args, rep)
    out = {"sources": [rep]}
    if rep["error"]:
        out["error"] = rep["error"]
        return out
    out["files"] = counts = upload_outcome(rep, len(files))
    _say(args, f"{len(files)} file(s): {outcome_text(counts)}")
    if counts["skipped"] >= len(files):
        # every file given was refused (binary, empty, too big, not UTF-8): a failure, not a quiet success
        out["error"] = f"none of the {len(files)} file(s) was indexed: each is listed as skipped, with its reason"
        if not args.json:
            print(f"error: {out['error']}", file=sys.stderr)
    return out


def cmd_stats(args: argparse.Namespace) -> dict:
    s = _kb(args).stats()
    _say(args, "\n".join(f"{k:16} {v}" for k, v in s.items()))
    return s


def cmd_rechunk(args: argparse.Namespace) -> dict:
    kb = _kb(args)
    config = kb.rechunk_config(splitter=args.splitter, size=args.chunk_size, overlap=args.chunk_overlap,
                               unit=args.unit, heading_prefix=args.heading_prefix, passage_size=args.passage_size)
    progress = _progress(args)
    try:
        out = kb.rechunk(config, progress)
    finally:
        progress.close()
    _say(args, f"built {out['collection']} ({out['chunk_config']}, {out['chunks']} chunks, {out['seconds']}s); "
               f"it is live now. The previous {out['previous']} stays until `kb drop-collection`.")
    return out


def cmd_collections(args: argparse.Namespace) -> dict:
    rows = _kb(args).collections()
    for r in rows:
        _say(args, f"{'*' if r['live'] else ' '} {r['name']:40} {r['count']:>7} chunks {r['passages']:>7} passages  "
                   f"dim {r['dimension']}  "
                   f"{r['embed_model']}  {r['chunk_config']}  [{r['status']}]")
    return {"collections": rows}


def cmd_drop(args: argparse.Namespace) -> dict:
    _kb(args).drop_collection(args.name)
    _say(args, f"dropped {args.name}")
    return {"dropped": args.name}


def cmd_verify(args: argparse.Namespace) -> dict:
    from kb.verify import KINDS

    kb, progress = _kb(args), _progress(args)
    try:
        out = kb.verify(repair=args.repair, progress=progress)
    finally:
        progress.close()
    if not args.json:
        for rep in out.get("reports", []):
            _print_report(args, rep)
        print(("healthy" if out["healthy"] else "NOT healthy") + (" after repair" if out["repaired"] else ""))
        for kind, total in out["totals"].items():
            examples = [p for p in out["problems"] if p["kind"] == kind]
            print(f"  {kind}: {total} ({KINDS[kind]})")
            for p in examples[:5]:
                print(f"    {p['source']}" + (f"/{p['path']}" if p["path"] else "")
                      + (f" @ {p['commit']}" if p["commit"] else "") + f": {p['count']}")
            if len(examples) > 5:
                print(f"    … and {len(examples) - 5} more")
        if not out["healthy"] and not out["repaired"]:
            print("run `kb verify --repair` to re-index what is inconsistent", file=sys.stderr)
        if not out["healthy"] and out["repaired"] and "missing_commit" in out["totals"]:
            # a repair re-indexes from the clone: one that lacks the commit can't be repaired from it
            print("the clone of " + ", ".join(sorted({p["source"] for p in out["problems"]
                                                       if p["kind"] == "missing_commit"}))
                  + " lacks the indexed commit, so a repair can't rebuild from it: sync it (a git source fetches the "
                  "commit again), restore it from a snapshot made with --with-repos, or remove the source",
                  file=sys.stderr)
        left = out.get("import_leftovers", [])
        if left:
            print(f"note: a snapshot import was interrupted and left {'; '.join(left)}: `kb verify --repair` "
                  "(or the next import) removes them")
        for row in out.get("not_indexed", []):
            print(f"note: {row['source']} has commits not yet indexed (head {row['head'][:10]}): "
                  f"`kb sync {row['source']}` indexes them")
    if not out["healthy"]:
        out["error"] = "the knowledge base is not consistent" + (" after repair" if out["repaired"] else "")
    return out


def cmd_export(args: argparse.Namespace) -> dict:
    kb, progress = _kb(args), _progress(args)
    try:
        out = kb.export_snapshot(args.file, with_repos=args.with_repos, progress=progress, overwrite=args.force)
    finally:
        progress.close()
    _say(args, f"wrote {out['path']} ({out['bytes'] / 2**20:.1f} MiB): {out['sources']} sources, {out['chunks']} chunks, "
               f"{out['passages']} passages" + (f", {len(out['repos'])} clones" if out["with_repos"] else "")
               + f" in {out['seconds']}s")
    return out


def cmd_import(args: argparse.Namespace) -> dict:
    kb, progress = _kb(args), _progress(args)
    try:
        out = kb.import_snapshot(args.file, progress=progress)
    finally:
        progress.close()
    clones = out["clones"]
    _say(args, f"imported {out['collection']}: {out['sources']} sources, {out['chunks']} chunks, {out['passages']} passages "
               f"in {out['seconds']}s (clones restored {len(clones['restored'])}, cloned again {len(clones['recloned'])}, "
               f"missing {len(clones['missing'])})")
    for m in clones["missing"]:
        print(f"  warning: no clone of {m['name']}: {m['reason']}", file=sys.stderr)
    return out


def cmd_search(args: argparse.Namespace) -> dict:
    from kb.search.engine import SearchEngine
    from kb.search.hits import SCORE_NOTES

    kb = _kb(args)
    opts = _options(args, kb, mmr=args.mmr)
    hits = SearchEngine(kb).search(args.query, opts)
    if not args.json:
        print(f"score: {SCORE_NOTES[opts.mode]}")
        for h in hits:
            print(f"{h.rank:>2}. {h.score:.4f} [{'+'.join(h.found_by)}] {h.citation}")
            print("    " + h.text[:200].replace("\n", " "))
            if h.url:
                print(f"    {h.url}")
        if not hits:
            print("no hits")
    return {"hits": [{k: h.as_dict()[k] for k in ("rank", "score", "mode", "source", "path", "line_start", "line_end",
                                                   "commit", "url", "text", "heading", "found_by", "ranks", "scores")}
                     for h in hits], "score": SCORE_NOTES[opts.mode]}


def _quiet_model_loading(args: argparse.Namespace) -> None:
    """transformers' "Loading weights" bar only where progress bars are shown, not under -q or in a pipe. Set
    before transformers is imported (it reads this once, at import): importing it here to switch the bar off raced
    the search thread's import of it."""
    if not _bars(args):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _ready_chat_model(settings, rag: bool):
    """The chat model, loaded and (for a RAG answer) with the answer rules already read into its cache."""
    from core.llm import build_chat_model
    from kb.answer.chain import prime_answer_prompt

    llm = build_chat_model(settings)  # LLMError / GGUFError for bad configuration or missing parts
    if rag:
        prime_answer_prompt(llm)
    return llm


def cmd_ask(args: argparse.Namespace) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from kb.answer.chain import Answer, Answerer
    from kb.search.engine import SearchEngine

    started = time.perf_counter()
    if not args.question.strip():  # before the model loads (seconds) to say so
        raise KBError("the question is empty")
    _quiet_model_loading(args)
    kb = _kb(args)
    engine = None if args.no_rag else SearchEngine(kb)
    opts = _options(args, kb)
    # The model loads and reads its rules (llama.cpp, in C, without the GIL) while this thread reads what the
    # first search needs: a cold `kb ask` spent ~3 s loading the model, then ~4 s in its first search. An index
    # that can't be read is an error at once, not after the model has loaded.
    if engine is not None:
        engine.check()
    with ThreadPoolExecutor(max_workers=1) as pool:
        ready = pool.submit(_ready_chat_model, kb.settings, engine is not None)
        if engine is not None:
            engine.warm()
        llm = ready.result()
    result = Answer(question=args.question, answer="")
    stream_start = time.perf_counter()
    for piece in Answerer(llm, engine, opts).stream(args.question, rag=not args.no_rag, result=result):
        if not args.json:
            print(piece, end="", flush=True)
    if not args.json:
        print()
        if result.declined and result.sources:  # replaced by one sentence naming the search
            if result.unverified:
                print("\n(None of the above was found in the sources, so it is not given as the answer.)")
            print(f"\n{result.answer}")
        claims = [x for x in result.sentences if x.claim]
        if claims:
            print("\nSentences:")
            for x in claims:
                hit = result.sources[x.source - 1] if x.supported else None
                # the source's name too, as the Sources block writes it (it read "[1] uploads/good.md:3-3": a review)
                where = (f"[{x.source}] {hit.source}/{hit.path}:{x.line_start}-{x.line_end}" if hit is not None
                         else "not found in the sources")
                print(f"  {where:60} {x.text[:80]}")
        if result.sources:
            print("\nSources:")
            for i, h in enumerate(result.sources, 1):
                mark = "*" if i in result.cited else " "
                print(f"{mark}[{i}] {h.citation}" + (f"  {h.url}" if h.url else ""))
        setup = stream_start - started
        print(f"({result.seconds:.1f}s, first token after {result.first_token_seconds or 0:.1f}s; before that "
              f"{setup:.1f}s loading the model and the index)", file=sys.stderr)
    from kb.log import log_answer

    log_answer(kb.settings, result)
    return result.as_dict()


def cmd_eval_answers(args: argparse.Namespace, questions: list[dict], kb) -> dict:
    from kb.answer.chain import Answerer
    from kb.search.engine import SearchEngine

    opts = _options(args, kb)
    engine = SearchEngine(kb)
    # set up as the dashboard is before anyone asks (the index warmed, the rules read): the first question's times
    # are then a user's, not the set-up's (it waited 11 s for its first word against 6-7 s for the others)
    engine.warm()
    answerer = Answerer(_ready_chat_model(kb.settings, rag=True), engine, opts)
    show = (lambda i, n: print(f"\r{i}/{n} answered", end="", file=sys.stderr)) if sys.stderr.isatty() else (lambda i, n: None)
    # kept in KB_HOME/evals/answers, as the Evaluation page keeps its runs (and `kb eval`'s retrieval runs are kept)
    report = kb.run_and_save_answer_evaluation(answerer, questions, opts, str(args.questions), progress=show)
    _warn_not_saved(report)
    if not args.json:
        fmt = lambda v: "-" if v is None else ("yes" if v is True else "no" if v is False else v)  # noqa: E731
        for r in report["rows"]:
            verdict = (f"facts {fmt(r.get('facts'))}, gold cited {fmt(r.get('gold_cited'))}" if r["answerable"]
                       else f"declined {fmt(r.get('declined'))}") + (", withheld" if "withheld" in r else "")
            print(f"{r['id']:28} {verdict:34} {r['ttft_s'] or 0:5.1f}s  {r['answer'][:70]!r}")
        print(f"\nn={report['n']} facts={fmt(report['facts'])} facts_shown={fmt(report['facts_shown'])} "
              f"gold_cited={fmt(report['gold_cited'])} "
              f"declined={fmt(report['declined'])} withheld={fmt(report['withheld'])} "
              f"ttft_median={report['ttft_median']}s "
              f"seconds_median={report['seconds_median']}s (k={report['k']}, {report['mode']})")
    return report


def _warn_not_saved(report: dict) -> None:
    """The scores are printed all the same; only keeping the run failed."""
    if "not_saved" in report:
        print(f"warning: {report['not_saved']}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> dict:
    from kb.evaluate import load_questions
    from kb.question_sets import resolve
    from kb.search.engine import SearchEngine

    questions = load_questions(resolve(args.questions))
    if args.answers:
        _quiet_model_loading(args)  # before anything imports transformers
    kb = _kb(args)
    _note_unindexed(questions, kb)
    if args.answers:
        return cmd_eval_answers(args, questions, kb)
    report = kb.run_and_save_evaluation(SearchEngine(kb), questions, _options(args, kb), str(args.questions))
    _warn_not_saved(report)
    if not args.json:
        for r in report["results"]:
            print(f"{r['id']:24} {('rank ' + str(r['rank'])) if r['rank'] else 'MISS':8} {r['question'][:60]}")
        k = report["k"]
        print(f"\nn={report['n']} mode={report['mode']} k={k}  hit@1={report['hit@1']:.3f}  "
              f"hit@{k}={report['hit@k']:.3f}  mrr={report['mrr']:.3f}{_facts_at(report, k)}")
        for cat, c in report["by_category"].items():
            print(f"  {cat:14} n={c['n']:<3} hit@1={c['hit@1']:.3f}  hit@{k}={c['hit@k']:.3f}  "
                  f"mrr={c['mrr']:.3f}{_facts_at(c, k)}")
    return report


def _note_unindexed(questions: list[dict], kb) -> None:
    """Questions on a source this knowledge base doesn't index can only miss: said before they are scored."""
    from kb.evaluate import unindexed

    missing, n = unindexed(questions, kb.indexed_sources())
    if missing:
        print(f"note: {n} of {len(questions)} questions name a source not indexed here ({', '.join(missing)}): "
              "they can only miss", file=sys.stderr)


def _facts_at(scores: dict, k: int) -> str:
    """The key facts anywhere in the top k texts, where the questions list any."""
    return f"  facts@{k}={scores['facts@k']:.3f}" if "facts@k" in scores else ""


def cmd_log(args: argparse.Namespace) -> dict:
    """``kb log``: the records of KB_HOME/logs, oldest first (see kb/log.py for each kind's fields)."""
    from core.settings import load_settings
    from kb import log as runlog

    if args.limit < 0:
        raise KBError(f"--limit {args.limit}: expected a number of records, 0 for all")
    since = runlog.parse_since(args.since) if args.since is not None else None
    kinds = sorted(set(args.kind)) if args.kind else None
    home = load_settings().home  # not KnowledgeBase(): reading the log must work whatever state the KB is in
    if home.exists() and not home.is_dir():
        raise KBError(f"KB_HOME {home} is a file, not a folder: there is no log to read")
    records = runlog.read(home, since=since, kinds=kinds)
    if args.limit:
        records = records[-args.limit:]
    if not args.json:
        for rec in records:
            print(runlog.describe(rec))
        if not records:
            print("nothing logged" + (f" since {args.since}" if args.since else "")
                  + (f" of kind {', '.join(kinds)}" if kinds else "") + f" (in {runlog.log_dir(home)})",
                  file=sys.stderr)
    return {"records": records, "since": runlog.iso(since) if since is not None else None, "kinds": kinds,
            "n": len(records), "folder": str(runlog.log_dir(home))}


def cmd_watch(args: argparse.Namespace) -> dict:
    """``kb watch``: fetch every git source now and then every interval; sync only what changed (cron, systemd).

    Each pass is a job kept in KB_HOME/jobs, like the dashboard's scheduled sync
    (KB_SYNC_EVERY). With ``--json`` each pass prints one JSON line (the fields
    of ``kb sync --json``, plus ``unchanged`` and ``backing_off``); ``--once``
    prints just that one. A scheduled snapshot (``--snapshot-every``,
    KB_SNAPSHOT_EVERY) due after a pass is written then: one more line,
    ``"kind": "snapshot"`` (under ``snapshot`` with ``--once``). SIGTERM ends
    the running pass at a safe point.
    """
    import signal
    import threading
    import time

    from core.settings import parse_interval
    from kb.jobs import CANCELLED, JobQueue, watch

    every = parse_interval(args.every, "--every") if args.every else None
    kb = _kb(args)
    every = kb.settings.sync_every if every is None else every
    if not every and not args.once:
        raise KBError("give an interval, e.g. `kb watch --every 15m` (or set KB_SYNC_EVERY), or use --once")
    progress = _progress(args)
    snap_every = (parse_interval(args.snapshot_every, "--snapshot-every") if args.snapshot_every
                  else kb.settings.snapshot_every)
    queue = JobQueue(kb, every=every, snapshot_every=snap_every, start=False, forward=progress)
    stop = threading.Event()
    last: dict = {}
    failed_passes: list = []

    def on_term(signum, frame) -> None:  # stop at the next safe point, then exit
        stop.set()
        queue.request_stop()

    def on_run(job: dict) -> None:
        rep = job.get("report") or {}
        if job["kind"] == "export":  # the scheduled snapshot after a pass
            snap = {"job": job["id"], "state": job["state"], **rep, **({"error": job["error"]} if job.get("error") else {})}
            if args.once and job["state"] != "done":  # a cron job's exit status says the backup failed too
                last.setdefault("error", f"the scheduled snapshot {job['state']}: {job.get('error') or ''}".strip())
            if args.json and args.once:
                last["snapshot"] = snap  # --once prints one JSON object: the pass's, with its snapshot in it
            elif args.json:
                print(json_line({"kind": "snapshot", **snap}), flush=True)
            elif job["state"] == "done":
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} snapshot: {rep['path']} ({rep['bytes'] / 2**20:.1f} MiB)"
                      + (f", {len(rep['removed'])} older removed" if rep.get("removed") else ""), flush=True)
            else:
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} snapshot {job['state']}: {job.get('error') or ''}",
                      file=sys.stderr, flush=True)
            return
        last.clear()
        last.update({"job": job["id"], "state": job["state"], **rep})
        if job.get("error"):
            last["error"] = job["error"]
        # A pass the stop signal ended at a safe point did what it was asked to: not a failure. On a busy machine the
        # signal often lands mid-pass, and the summary said "failed_passes": 1 for a clean stop.
        stopped_mid_pass = job["state"] == CANCELLED and stop.is_set()
        if not stopped_mid_pass and (job["state"] != "done" or job.get("error")
                                     or any(r.get("error") for r in rep.get("sources", []))):
            failed_passes.append(job["id"])
        if args.json:
            if not args.once:
                print(json_line(last), flush=True)
            return
        for r in rep.get("sources", []):
            _print_report(args, r)
        failed = [r for r in rep.get("sources", []) if r.get("error")]
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {job['state']}: {len(rep.get('sources', [])) - len(failed)} synced, "
              f"{len(rep.get('unchanged', []))} unchanged, {len(failed)} failed, "
              f"{len(rep.get('backing_off', []))} backing off" + (f"; {job['error']}" if job.get("error") else ""),
              flush=True)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        runs = watch(kb, every, once=args.once, runs=args.runs, progress=progress, on_run=on_run, stop=stop, queue=queue)
    finally:
        progress.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.once:
        return last
    out = {"runs": runs, "every": every, "stopped": "signal" if stop.is_set() else "done",
           "failed_passes": len(failed_passes)}
    if failed_passes and args.runs and not stop.is_set():  # a bounded watch is a script's: its status tells
        out["error"] = f"{len(failed_passes)} of {runs} passes failed"
    return out


def _options(args: argparse.Namespace, kb, **extra):
    """Search options from the flags, falling back to KB_TOP_K and KB_RETRIEVAL_MODE."""
    from kb.search.hits import SearchOptions

    k = kb.settings.top_k if args.k is None else args.k  # -k 0 is refused by SearchOptions, not read as the default
    source = getattr(args, "source", None)
    if source and not kb.manifest.has_source(source):  # "no hits" would read as a search that found nothing
        names = ", ".join(r.name for r in kb.sources()) or "none yet"
        raise KBError(f"no source named {source!r} (sources: {names})")
    return SearchOptions(k=k, mode=args.mode or kb.settings.retrieval_mode, threshold=getattr(args, "threshold", None),
                         source=getattr(args, "source", None), path_prefix=getattr(args, "path_prefix", None), **extra)


def _positive(raw: str) -> int:
    """A count of 1 or more: `--runs 0` and `--runs -1` each ran one pass."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors keep the ``--json`` promise of one JSON object on stdout.

    An operator review: `kb search --json x -k two` printed only argparse's usage on stderr, so a script
    reading stdout got nothing to parse. The status stays argparse's 2 (a usage error), the text as before.
    """

    def __init__(self, *args, json_errors: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print(json_line({"error": f"{self.prog}: {message}", "usage": self.format_usage().strip()}))
        super().error(message)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    """The `kb` command line; `json_errors` (``--json`` given) also writes usage errors as JSON on stdout."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    p = _Parser(prog="kb", description="Knowledge base for retrieval-augmented chat.", json_errors=json_errors)
    sub = p.add_subparsers(dest="command", required=True,
                           parser_class=lambda **kw: _Parser(json_errors=json_errors, **kw))

    a = sub.add_parser("add", parents=[common], help="clone and register a source")
    a.add_argument("name", nargs="?")
    a.add_argument("url", nargs="?", metavar="URL_OR_PATH")
    a.add_argument("--branch")
    a.add_argument("--web-url", help="web page of the repository, for permalinks (gitee/github are detected)")
    a.add_argument("--extensions", help="comma-separated extensions to index (default md,txt,rst)")
    a.add_argument("--defaults", action="store_true", help="register the six InternLM-ecosystem repos on gitee")
    a.set_defaults(func=cmd_add)

    r = sub.add_parser("remove", parents=[common], help="delete a source and its chunks")
    r.add_argument("name")
    r.set_defaults(func=cmd_remove)

    sub.add_parser("sources", parents=[common], help="list sources").set_defaults(func=cmd_sources)

    s = sub.add_parser("sync", parents=[common], help="fetch and incrementally re-index")
    s.add_argument("names", nargs="*")
    s.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    s.set_defaults(func=cmd_sync)

    u = sub.add_parser("upload", parents=[common], help="add files to a files-only source")
    u.add_argument("files", nargs="+")
    u.add_argument("--source", required=True)
    u.set_defaults(func=cmd_upload)

    sub.add_parser("stats", parents=[common], help="counts").set_defaults(func=cmd_stats)

    rc = sub.add_parser("rechunk", parents=[common], help="build a new collection with other chunking, then switch")
    rc.add_argument("--chunk-size", type=int, required=True)
    rc.add_argument("--chunk-overlap", type=int, required=True)
    rc.add_argument("--splitter", choices=["recursive", "markdown"])
    rc.add_argument("--unit", choices=["chars", "tokens"], help="measure chunks in characters or model tokens")
    rc.add_argument("--heading-prefix", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend the heading path to the embedded text")
    rc.add_argument("--passage-size", type=int,
                    help="size of the passages searched to find chunks, 0 for none (default KB_PASSAGE_SIZE, 120)")
    rc.set_defaults(func=cmd_rechunk)

    sub.add_parser("collections", parents=[common], help="list Chroma collections").set_defaults(func=cmd_collections)
    d = sub.add_parser("drop-collection", parents=[common], help="delete a collection that is not live")
    d.add_argument("name")
    d.set_defaults(func=cmd_drop)

    v = sub.add_parser("verify", parents=[common], help="check the manifest against the vector store; --repair fixes")
    v.add_argument("--repair", action="store_true", help="re-index only what is inconsistent")
    v.set_defaults(func=cmd_verify)

    x = sub.add_parser("export", parents=[common], help="write a snapshot: manifest, live collection (+ clones)")
    x.add_argument("file", metavar="FILE.tar.gz")
    x.add_argument("--with-repos", action="store_true", help="include every source's clone")
    x.add_argument("--force", action="store_true", help="replace FILE if it exists")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("import", parents=[common], help="load a snapshot into an empty knowledge base")
    i.add_argument("file", metavar="FILE.tar.gz")
    i.set_defaults(func=cmd_import)

    ranked = argparse.ArgumentParser(add_help=False)
    ranked.add_argument("-k", type=int, help="hits to return (default KB_TOP_K, 5)")
    ranked.add_argument("--mode", choices=["dense", "bm25", "hybrid"], help="default KB_RETRIEVAL_MODE, hybrid")
    retrieval = argparse.ArgumentParser(add_help=False, parents=[ranked])
    retrieval.add_argument("--threshold", type=float, help="minimum score in the mode's own scale (higher is better)")
    retrieval.add_argument("--source", help="only this source")
    retrieval.add_argument("--path-prefix", help="only paths starting with this")

    q = sub.add_parser("search", parents=[common, retrieval], help="retrieve chunks")
    q.add_argument("query")
    q.add_argument("--mmr", action="store_true", help="diversify dense results (maximal marginal relevance)")
    q.set_defaults(func=cmd_search)

    k = sub.add_parser("ask", parents=[common, retrieval], help="answer a question with sources")
    k.add_argument("question")
    k.add_argument("--no-rag", action="store_true", help="ask the LLM directly, without retrieval")
    k.set_defaults(func=cmd_ask)

    e = sub.add_parser("eval", parents=[common, ranked], help="hit@1, hit@k and MRR on a JSONL question file")
    e.add_argument("questions", help="a JSONL question file, or a shipped set's name (dev, holdout, overview-blind6, …)")
    e.add_argument("--answers", action="store_true",
                   help="ask every question with the LLM: facts stated, gold lines cited, unanswerable declined")
    e.set_defaults(func=cmd_eval)

    lg = sub.add_parser("log", parents=[common], help="what happened: jobs, searches, answers, errors (KB_HOME/logs)")
    lg.add_argument("--since", help="only records from this long ago (30m, 1h, 2d, 1h30m) or since a date or time "
                                    "(2025-06-01, 2025-06-01T08:00)")
    lg.add_argument("--kind", action="append", choices=LOG_KINDS,
                    help="only records of this kind (repeat for several)")
    lg.add_argument("--limit", type=int, default=0, help="only the last N records")
    lg.set_defaults(func=cmd_log)

    wt = sub.add_parser("watch", parents=[common], help="fetch every git source on an interval; sync what changed",
                        description="Fetch every git source on an interval and sync what changed. With --json: one "
                                    "JSON line per pass (and per scheduled snapshot), then a summary line {runs, every, "
                                    "stopped, failed_passes}; with --once, one JSON object. With --runs, the exit "
                                    "status is 1 when a pass failed.")
    wt.add_argument("--every", help="interval: 30s, 15m, 1h, 1h30m (default KB_SYNC_EVERY)")
    wt.add_argument("--snapshot-every", help="also write a snapshot (with the clones) to KB_HOME/snapshots this "
                                             "often, after a pass, keeping the newest KB_SNAPSHOT_KEEP "
                                             "(default KB_SNAPSHOT_EVERY: off)")
    wt.add_argument("--once", action="store_true", help="one pass, then exit (for cron)")
    wt.add_argument("--runs", type=_positive, help="stop after this many passes (1 or more)")
    wt.set_defaults(func=cmd_watch)
    return p


def _log_error(exc: BaseException, args: argparse.Namespace) -> None:
    """Record an unexpected error in KB_HOME/logs (never raises: the real error matters more)."""
    try:
        from core.settings import load_settings
        from kb import log as runlog

        runlog.log_error(load_settings().home, exc, origin=f"kb {args.command}")
    except Exception:
        pass


# Commands that only read the index and the models: nothing of theirs is left to write once they return, so
# `python -m kb` ends them with exit_now (a loaded chat model made `kb ask` spend 1.2-1.5 s tearing itself down).
READ_ONLY = frozenset({"ask", "search", "eval"})


CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text for a terminal with its control characters written out (``\\x1b``): a file's name or lines in a
    repository may hold escape sequences, which cleared an operator's screen or forged lines of ``kb log`` (a
    security review). Tabs and line breaks stay."""
    return CONTROL_RE.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


class PrintableStream:
    """stdout with ``printable`` applied to everything written (JSON escapes its own control characters)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(printable(text))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser("--json" in argv).parse_args(argv))


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown.

    At exit Python frees every object one by one: a loaded chat model's ~4.6 GB of tensors are thousands of
    separate unmaps, each stalling the process's other threads, which took 1.2-1.5 s after `kb ask` had printed
    everything (README "Command line"); the kernel frees the same memory at once. Only for READ_ONLY commands,
    after their output is flushed: atexit handlers are skipped, so nothing may still be unwritten (their logs
    and cache files are written and renamed before they return). mypy ends its runs the same way.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that went away (`kb search … | head -1`): nothing more can reach it
            pass
    os._exit(code)


def json_line(obj: object) -> str:
    """One JSON object for stdout, in UTF-8 whatever it quotes: a file name that is not UTF-8 reaches Python as lone
    surrogates, which stdout refuses, and the error about that name failed in its own handler (an operator review)."""
    return json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode("utf-8")


def run(args: argparse.Namespace) -> int:
    stdout, sys.stdout = sys.stdout, PrintableStream(sys.stdout)
    try:
        return _run(args)
    finally:
        sys.stdout = stdout


def _run(args: argparse.Namespace) -> int:
    try:
        out = args.func(args)
        if args.json:
            print(json_line(out))
    except BrokenPipeError:
        # the reader went away (`kb search … | head -1`): stop quietly, as Unix tools do, with the shell's status
        # for it; what is still buffered goes nowhere rather than failing again at exit
        with contextlib.suppress(OSError, ValueError, AttributeError):
            out_fd = sys.stdout.fileno()
            os.dup2(os.open(os.devnull, os.O_WRONLY), out_fd)
        return 141
    except UserError as exc:
        if args.json:
            print(json_line({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: logged, then Python prints its traceback as before
        _log_error(exc, args)
        raise
    return 1 if out.get("error") else 0
