"""RAG building blocks without the embedding model: chunking, parsers, filters, the FAISS index and its
atomic persistence (checked against brute-force numpy search)."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.rag.chunking import chunk_text, whitespace_spans
from serving.rag.errors import InvalidInputError, UnsupportedFileTypeError
from serving.rag.filters import check_filter, matches
from serving.rag.index import VectorIndex, check_params
from serving.rag.parsers import html_to_text, parse_bytes

# ---- chunking ------------------------------------------------------------------------------------------------

DOC = """# Intro
First paragraph of the introduction, a few words long.

Second paragraph of the introduction.

## Details
""" + " ".join(f"w{i}" for i in range(120)) + """

# Other section
Short text. Another sentence here. And a third one!
"""


def test_chunks_are_exact_slices_within_budget_and_never_cross_headings():
    chunks = chunk_text(DOC, max_tokens=20, overlap=5)
    assert len(chunks) > 6
    for c in chunks:
        assert DOC[c.start:c.end] == c.text
        assert c.tokens == len(whitespace_spans(c.text)) <= 20
        # a heading line may only open a chunk
        assert all(not line.startswith("#") for line in c.text.splitlines()[1:])
    headings = [c.heading for c in chunks]
    assert headings[0] == "Intro" and "Intro > Details" in headings and headings[-1] == "Other section"
    # every word of the document is in some chunk
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(DOC) if not ch.isspace())


def test_long_runs_overlap_by_the_requested_tokens():
    text = " ".join(f"t{i}" for i in range(100))
    chunks = chunk_text(text, max_tokens=20, overlap=5)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # overlapping
        shared = set(a.text.split()) & set(b.text.split())
        assert len(shared) == 5
    assert chunk_text(text, max_tokens=20, overlap=0)[1].text.split()[0] == "t20"


def test_paragraphs_are_packed_not_split():
    paras = [" ".join(f"p{j}w{i}" for i in range(6)) for j in range(6)]
    chunks = chunk_text("\n\n".join(paras), max_tokens=13, overlap=0)
    assert [c.text for c in chunks] == ["\n\n".join(paras[i:i + 2]) for i in range(0, 6, 2)]


def test_chunking_bad_parameters():
    with pytest.raises(InvalidInputError, match="chunk_overlap"):
        chunk_text("a b c", max_tokens=10, overlap=6)
    with pytest.raises(InvalidInputError, match="chunk_tokens"):
        chunk_text("a b c", max_tokens=2)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab #.\n")), max_size=300), st.integers(8, 30))
def test_chunking_properties(text, max_tokens):
    overlap = max_tokens // 4
    chunks = chunk_text(text, max_tokens=max_tokens, overlap=overlap)
    from serving.rag.chunking import _HEADING

    # heading lines may be left out (they live on in Chunk.heading); every other word is in some chunk
    heading_lines = [m.span() for m in _HEADING.finditer(text)]
    words = [(a, b) for a, b in whitespace_spans(text) if not any(h0 <= a < h1 for h0, h1 in heading_lines)]
    covered = set()
    for c in chunks:
        assert text[c.start:c.end] == c.text and c.text.strip()
        assert c.tokens <= max_tokens
        covered.update(range(c.start, c.end))
    assert all(a in covered for a, _ in words)
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


# ---- parsers -------------------------------------------------------------------------------------------------

def test_html_headings_and_blocks():
    html = ("<html><head><title>T</title><style>p{}</style></head><body><h1>Top</h1><p>One &amp; two.</p>"
            "<div>Three<br>four</div><script>var x;</script><h3>Sub</h3><ul><li>a</li><li>b</li></ul></body></html>")
    assert html_to_text(html) == "# Top\n\nOne & two.\n\nThree\n\nfour\n\n### Sub\n\na\n\nb"


def test_parse_bytes_types_and_errors():
    assert parse_bytes("a.md", "# x\r\ny".encode()) == "# x\ny"
    assert parse_bytes("a.TXT", b"\xef\xbb\xbfhello") == "hello"
    with pytest.raises(UnsupportedFileTypeError, match=r"'\.docx'.*supported: \.htm"):
        parse_bytes("report.docx", b"x")
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        parse_bytes("a.txt", b"\xff\xfe\x00bad")
    assert parse_bytes("a.pdf", _tiny_pdf("The warranty lasts two years.")) == "The warranty lasts two years."
    with pytest.raises(InvalidInputError, match="not a readable PDF"):
        parse_bytes("b.pdf", b"%PDF-1.4 garbage")


def _tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, built by hand (objects, xref table, trailer)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


# ---- filters -------------------------------------------------------------------------------------------------

def test_filters_match_and_validate():
    meta = {"lang": "en", "year": 2023, "tags": ["hr", "policy"]}
    assert matches(meta, {"lang": "en", "year": {"$gte": 2020, "$lt": 2024}})
    assert matches(meta, {"tags": "hr"}) and not matches(meta, {"tags": "it"})
    assert matches(meta, {"$or": [{"lang": "de"}, {"year": {"$in": [2022, 2023]}}]})
    assert matches(meta, {"team": {"$exists": False}, "lang": {"$ne": "de"}})
    assert not matches(meta, {"$not": {"lang": "en"}})
    assert not matches(meta, {"year": {"$gt": "2020"}})  # no cross-type comparisons
    for bad, where in [({"year": {"$near": 1}}, r"filter\.year\.\$near"), ({"$xor": []}, r"filter\.\$xor"),
                       ({"a": {"$in": 3}}, r"filter\.a\.\$in"), ([1], "filter")]:
        with pytest.raises(InvalidInputError) as err:
            check_filter(bad)
        assert err.value.param and __import__("re").fullmatch(where, err.value.param)


# ---- index ---------------------------------------------------------------------------------------------------

def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, centers=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    return _unit(c[rng.integers(0, centers, n)] + 0.35 * rng.normal(size=(n, d)))


def _brute(queries, vecs, ids, k):
    scores = queries @ vecs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), ids[top]


def _recall(got, ref):
    return np.mean([len(set(g) & set(r)) / len(r) for g, r in zip(got, ref)])


@pytest.mark.parametrize("kind,params", [("flat", {}), ("ivf", {"min_ann": 500, "nprobe": 16}),
                                         ("hnsw", {"min_ann": 500, "ef_search": 64})])
def test_index_against_brute_force(kind, params):
    d, n = 32, 3000
    vecs, ids = _clustered(n, d), np.arange(n, dtype=np.int64) * 7 + 1
    queries = _clustered(20, d, seed=1)
    index = VectorIndex(d, kind, params)
    index.add(ids[:2000], vecs[:2000])
    index.add(ids[2000:], vecs[2000:])
    assert index.uses_ann == (kind != "flat")
    scores, got = index.search(queries, 10)
    ref_s, ref_i = _brute(queries, vecs, ids, 10)
    if kind == "flat":
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    else:
        assert _recall(got, ref_i) >= 0.9
    # removal: removed ids never come back, results stay close to brute force over what is left
    gone = ids[::3]
    assert index.remove(gone) == gone.size
    keep = ~np.isin(ids, gone)
    _, got = index.search(queries, 10)
    assert not np.isin(got, gone).any()
    assert _recall(got, _brute(queries, vecs[keep], ids[keep], 10)[1]) >= (1.0 if kind == "flat" else 0.85)
    # filtered search: small allowed set is exact; a large one goes through the ANN index
    for allowed in (ids[keep][:50], ids[keep][: keep.sum() * 3 // 4]):
        _, got = index.search(queries, 10, allowed_ids=allowed)
        rows = np.isin(ids, allowed)
        ref = _brute(queries, vecs[rows], ids[rows], 10)[1]
        assert np.isin(got, allowed).all()
        assert _recall(got, ref) >= (1.0 if kind == "flat" or allowed.size == 50 else 0.85)
    # k larger than the index: padded with -1
    small = VectorIndex(d, kind, params)
    small.add(ids[:3], vecs[:3])
    s, i = small.search(queries[:1], 5)
    assert list(i[0, 3:]) == [-1, -1] and np.isneginf(s[0, 3:]).all()


def test_index_errors():
    index = VectorIndex(8)
    with pytest.raises(InvalidInputError, match="dimension mismatch: query embeddings have 5") as err:
        index.search(np.ones((1, 5)), 3)
    assert err.value.code == "dimension_mismatch"
    with pytest.raises(InvalidInputError, match="NaN"):
        index.add([1], np.full((1, 8), np.nan))
    with pytest.raises(InvalidInputError, match="index must be one of"):
        check_params("annoy", {})
    with pytest.raises(InvalidInputError, match="unknown index_params for hnsw: nprobe"):
        check_params("hnsw", {"nprobe": 3})
    with pytest.raises(InvalidInputError, match=r"index_params\.nprobe"):
        check_params("ivf", {"nprobe": 0})


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_persistence_roundtrip_and_generations(tmp_path, kind):
    d, n = 16, 1200
    vecs, ids = _clustered(n, d), np.arange(n, dtype=np.int64)
    index = VectorIndex(d, kind, {} if kind == "flat" else {"min_ann": 1000})
    index.add(ids, vecs)
    index.remove(ids[:10])
    index.save(tmp_path, seq=3)
    index.add([5000], vecs[:1])
    index.save(tmp_path, seq=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["generation"] == 2 and manifest["seq"] == 4
    assert sorted(os.listdir(tmp_path)) == sorted(["manifest.json", *manifest["files"].values()])
    loaded, seq = VectorIndex.load(tmp_path)
    assert seq == 4 and len(loaded) == len(index) and loaded.uses_ann == index.uses_ann
    q = _clustered(5, d, seed=3)
    np.testing.assert_array_equal(loaded.search(q, 8)[1], index.search(q, 8)[1])


def test_crash_during_save_keeps_the_previous_generation(tmp_path, monkeypatch):
    d = 8
    index = VectorIndex(d)
    index.add(np.arange(10), _clustered(10, d))
    index.save(tmp_path, seq=1)
    index.add([99], _clustered(1, d, seed=5))

    import serving.rag.index as mod

    real_replace, calls = os.replace, []

    def crash_on_manifest(src, dst):
        calls.append(dst)
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash before the manifest swap")
        return real_replace(src, dst)

    monkeypatch.setattr(mod.os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        index.save(tmp_path, seq=2)
    monkeypatch.setattr(mod.os, "replace", real_replace)
    loaded, seq = VectorIndex.load(tmp_path)
    assert seq == 1 and len(loaded) == 10
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # temp files cleaned up


def test_corrupt_files_are_detected(tmp_path):
    from serving.rag.index import IndexCorruptError

    index = VectorIndex(4)
    index.add([1, 2], _clustered(2, 4))
    index.save(tmp_path, seq=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    with open(tmp_path / manifest["files"]["vectors"], "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(IndexCorruptError, match="checksum"):
        VectorIndex.load(tmp_path)


def test_exact_search_through_kernels_topk_matches_faiss():
    # The CUDA path (kernels.dispatch.topk_scores) run on the CPU, where the dispatch picks the torch reference.
    d, n = 48, 2500
    vecs, ids = _clustered(n, d), np.arange(n, dtype=np.int64) * 3 + 2
    queries = _clustered(7, d, seed=9)
    by_faiss, by_kernels = VectorIndex(d, exact="faiss"), VectorIndex(d, exact="kernels")
    for index in (by_faiss, by_kernels):
        index.add(ids, vecs)
        index.remove(ids[:100])
    s1, i1 = by_faiss.search(queries, 10)
    s2, i2 = by_kernels.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_array_equal(i2, _brute(queries, vecs[100:], ids[100:], 10)[1])
