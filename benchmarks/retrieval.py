"""Retrieval quality and speed: recall@10 of IVF / HNSW against exact search, query latency, ingestion rate.

    python benchmarks/retrieval.py [--n 100000] [--dim 384] [--queries 500] [--ingest-chunks 2000]
                                   [--kinds ivf,hnsw] [--quick] [--device cpu|cuda] [--threads 1]

Two parts, reported separately because embedding 100k chunks with MiniLM on a small CPU takes too long:
  ingestion   real documents (generated text) through CollectionService: parse, chunk, embed with
              all-MiniLM-L6-v2, SQLite, index, atomic save; chunks/s end to end.
  search      a synthetic corpus of --n unit vectors (d=384) with topic / subtopic cluster structure like
              sentence embeddings, queries drawn from the same distribution (not in the index). Exact
              (flat) search is the baseline; IVF nprobe and HNSW efSearch are swept, and for each kind the
              cheapest setting with recall@10 >= 0.95 is reported with its speed-up over exact search.
Latencies are per single query (one at a time, as a chat request retrieves). Ends with one JSON line.
Target: recall@10 >= 0.95 for the approximate indexes at >= 5x the exact search's query rate.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import emit, machine  # noqa: E402
from serving.rag.index import VectorIndex  # noqa: E402

console = Console(stderr=True)
TARGET_RECALL, TARGET_SPEEDUP, K = 0.95, 5.0, 10
SWEEPS = {"ivf": ("nprobe", [4, 8, 16, 32, 64, 128]), "hnsw": ("ef_search", [16, 32, 64, 96, 128, 256])}


def synthetic_corpus(n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors shaped like sentence embeddings: a shared direction (anisotropy), n/1000 topics, n/10
    subtopics and a large per-text part. A query's nearest neighbour has cosine ~0.5, its 10th ~0.4, random
    pairs ~0.07 (MiniLM on real text: similar), so the top 10 are near-ties, which is hard for approximate
    search; queries are drawn from the same distribution and are not in the index."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    shared = unit(rng.normal(size=(1, dim)))
    topics = unit(rng.normal(size=(max(n // 1000, 8), dim)))
    subtopics = max(n // 10, 1)
    sub_topic = rng.integers(0, topics.shape[0], subtopics)
    sub_dir = unit(rng.normal(size=(subtopics, dim)))

    def draw(m):
        sub = rng.integers(0, subtopics, m)
        return unit(0.3 * shared + 0.5 * topics[sub_topic[sub]] + 0.6 * sub_dir[sub]
                    + 0.9 * unit(rng.normal(size=(m, dim))))

    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 50_000):
        out[start:start + 50_000] = draw(min(50_000, n - start))
    return out, draw(queries)


def timed_queries(index: VectorIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids [q, K], per-query seconds), one query at a time."""
    ids = np.empty((queries.shape[0], K), np.int64)
    lat = np.empty(queries.shape[0])
    for i in range(queries.shape[0]):
        t = time.perf_counter()
        _, got = index.search(queries[i:i + 1], K)
        lat[i] = time.perf_counter() - t
        ids[i] = got[0]
    return ids, lat


def recall_at_k(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(r)) / K for g, r in zip(got, ref)]))


def lat_stats(lat: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
            "p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 4),
            "qps": round(float(1.0 / lat.mean()), 1)}


def bench_search(args) -> dict:
    with console.status(f"generating {args.n} vectors (d={args.dim})"):
        vecs, queries = synthetic_corpus(args.n, args.dim, args.queries)
    ids = np.arange(args.n, dtype=np.int64)
    flat = VectorIndex(args.dim, "flat", device=args.device)
    flat.add(ids, vecs)
    timed_queries(flat, queries[:20])  # warm-up
    exact_ids, exact_lat = timed_queries(flat, queries)
    exact = lat_stats(exact_lat)
    nn_cos = float(np.mean(np.sum(queries * vecs[exact_ids[:, 0]], axis=1)))
    result = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": K, "exact": exact,
              "nearest_neighbour_cosine_mean": round(nn_cos, 3)}
    table = Table(title=f"search: n={args.n}, d={args.dim}, {args.queries} single queries, k={K}")
    for col in ("index", "setting", "recall@10", "p50 ms", "p95 ms", "qps", "speed-up"):
        table.add_column(col)
    table.add_row("flat (exact)", "-", "1.000", f"{exact['p50_ms']:.3f}", f"{exact['p95_ms']:.3f}",
                  f"{exact['qps']:.0f}", "1.0x")
    for kind in args.kinds:
        param, values = SWEEPS[kind]
        index = VectorIndex(args.dim, kind, {"min_ann": 1}, device=args.device)
        with console.status(f"building {kind} over {args.n} vectors"):
            t = time.perf_counter()
            index.add(ids, vecs)
            build_s = time.perf_counter() - t
        sweep, best = [], None
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{kind} {param} sweep", total=len(values))
            for value in values:
                index.set_search_params(**{param: value})
                timed_queries(index, queries[:20])
                got, lat = timed_queries(index, queries)
                row = {param: value, "recall_at_10": round(recall_at_k(got, exact_ids), 4), **lat_stats(lat)}
                row["speedup"] = round(row["qps"] / exact["qps"], 2)
                sweep.append(row)
                table.add_row(kind, f"{param}={value}", f"{row['recall_at_10']:.3f}", f"{row['p50_ms']:.3f}",
                              f"{row['p95_ms']:.3f}", f"{row['qps']:.0f}", f"{row['speedup']:.1f}x")
                if best is None and row["recall_at_10"] >= TARGET_RECALL:
                    best = row
                bar.advance(task)
        result[kind] = {"build_s": round(build_s, 2), "sweep": sweep, "chosen": best,
                        "meets_target": bool(best and best["speedup"] >= TARGET_SPEEDUP),
                        **({"nlist": int(index._ann.nlist)} if kind == "ivf" else {})}
    console.print(table)
    return result


def generated_documents(chunks: int, chunk_tokens: int, seed: int = 0) -> list[dict]:
    """Markdown documents of about `chunks` chunks: headings and paragraphs of words from the handbook corpus."""
    handbook = Path(__file__).resolve().parents[1] / "serving" / "rag" / "data" / "handbook"
    words = sorted({w.strip(".,:;()<>\"'/=") for p in handbook.iterdir() for w in p.read_text().split()} - {""})
    rng = random.Random(seed)
    docs, words_per_chunk = [], int(chunk_tokens * 0.6)
    per_doc = 10
    for d in range(max(1, chunks // per_doc)):
        parts = [f"# Document {d}"]
        for s in range(per_doc // 2):
            parts.append(f"## Section {s}")
            for _ in range(2):
                sentences = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "."
                             for _ in range(max(1, words_per_chunk // 12))]
                parts.append(" ".join(sentences))
        docs.append({"id": f"doc-{d}", "text": "\n\n".join(parts)})
    return docs


def bench_ingest(args) -> dict:
    from serving.rag.collections import CollectionService

    docs = generated_documents(args.ingest_chunks, args.chunk_tokens)
    with tempfile.TemporaryDirectory() as home:
        svc = CollectionService(home, device=args.device)
        svc.create_collection("bench", chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_tokens // 5)
        embedder = svc.embedder()  # load the model outside the timing
        embed_s = [0.0]
        real_embed = embedder.embed

        def timed_embed(texts, *a, **kw):
            t = time.perf_counter()
            try:
                return real_embed(texts, *a, **kw)
            finally:
                embed_s[0] += time.perf_counter() - t

        embedder.embed = timed_embed
        total, t0 = 0, time.perf_counter()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("ingesting (real embeddings)", total=len(docs))
            for i in range(0, len(docs), 20):
                res = svc.add_documents("bench", docs[i:i + 20])
                total += sum(d["chunks"] for d in res["data"])
                bar.advance(task, min(20, len(docs) - i))
        elapsed = time.perf_counter() - t0
        ingest_embed_s = embed_s[0]
        q = [timed(svc, f"what does section {i} say about travel and expenses?") for i in range(20)]
        svc.close()
    return {"documents": len(docs), "chunks": total, "chunk_tokens": args.chunk_tokens, "seconds": round(elapsed, 2),
            "chunks_per_s": round(total / elapsed, 1), "embedding_share": round(ingest_embed_s / elapsed, 3),
            "query_with_embedding_p50_ms": round(float(np.percentile(q, 50)) * 1e3, 2)}


def timed(svc, text: str) -> float:
    t = time.perf_counter()
    svc.query("bench", text, k=K)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="synthetic vectors in the search part (100000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=500, help="single queries timed per setting (500)")
    p.add_argument("--kinds", default="ivf,hnsw", help="approximate indexes to sweep (ivf,hnsw)")
    p.add_argument("--ingest-chunks", type=int, default=2000, help="chunks ingested with real embeddings (2000)")
    p.add_argument("--chunk-tokens", type=int, default=200)
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--quick", action="store_true", help="n=20000, 200 queries, 300 ingested chunks")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for exact search through kernels.topk_scores")
    p.add_argument("--threads", type=int, default=1,
                   help="FAISS OpenMP and torch threads (1: a server answers concurrent single queries, one per "
                        "thread; it also keeps timings stable on a shared machine)")
    args = p.parse_args(argv)
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.queries, args.ingest_chunks = min(args.n, 20_000), min(args.queries, 200), min(
            args.ingest_chunks, 300)
    args.kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in args.kinds if k not in SWEEPS]
    if bad:
        p.error(f"--kinds: unknown {', '.join(bad)} (use ivf, hnsw)")
    result = {"benchmark": "retrieval", "machine": machine(), "device": args.device, "threads": args.threads}
    if not args.skip_search:
        result["search"] = bench_search(args)
    if not args.skip_ingest:
        result["ingest"] = bench_ingest(args)
        ing = result["ingest"]
        console.print(f"ingestion: {ing['chunks']} chunks in {ing['seconds']} s = {ing['chunks_per_s']} chunks/s "
                      f"({ing['embedding_share']:.0%} of it embedding)")
    if not args.skip_search:
        result["meets_target"] = all(result["search"][k]["meets_target"] for k in args.kinds)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
