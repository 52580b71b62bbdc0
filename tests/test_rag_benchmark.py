"""benchmarks/retrieval.py runs end to end on a small synthetic corpus and reports its figures."""

import json

from benchmarks import retrieval


def test_retrieval_benchmark_small(capsys):
    import faiss
    import torch

    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        assert retrieval.main(["--n", "3000", "--dim", "64", "--queries", "30", "--skip-ingest"]) == 0
    finally:  # main() sets both thread counts for the process
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    search = result["search"]
    assert search["n"] == 3000 and search["exact"]["qps"] > 0
    for kind, param in (("ivf", "nprobe"), ("hnsw", "ef_search")):
        sweep = search[kind]["sweep"]
        assert [row[param] for row in sweep] == retrieval.SWEEPS[kind][1]
        assert all(0.0 <= row["recall_at_10"] <= 1.0 for row in sweep)
        assert sweep[-1]["recall_at_10"] >= 0.95  # the widest search is close to exact
    vecs, queries = retrieval.synthetic_corpus(2000, 64, 10)
    assert vecs.shape == (2000, 64) and queries.shape == (10, 64)
    assert abs(float((vecs ** 2).sum(axis=1).mean()) - 1.0) < 1e-5
