"""serving.embeddings.Embedder on the real bundled all-MiniLM-L6-v2, against an independent per-text reference."""

import functools
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from serving.embeddings import Embedder, EmbeddingInputError
from serving.models import ModelNotFoundError, embedding_model_path

TEXTS = [
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog. " * 60,  # > 256 tokens: truncated
    "Paris is the capital of France.",
    "",
    "Ünïcödé 東京 text",
]


@pytest.fixture(scope="module")
def embedder():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: OpenMP spinning slows small batches badly
    yield Embedder()
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _bert():
    folder = str(embedding_model_path())
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def _reference(text: str) -> np.ndarray:
    """One text at a time, no padding: BERT's tokens (first 256) averaged, then unit length."""
    tok, model = _bert()
    ids = tok(text)["input_ids"]
    ids = ids[:255] + [tok.sep_token_id] if len(ids) > 256 else ids
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    vec = hidden.mean(dim=0).numpy()
    return vec / np.linalg.norm(vec)


def test_default_model_metadata(embedder):
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dim == 384
    assert embedder.max_tokens == 256


def test_embed_matches_unpadded_reference(embedder):
    vecs = embedder.embed(TEXTS, batch_size=2)  # padded, length-sorted batches
    assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(vecs[i], _reference(text), atol=2e-5)


def test_batch_size_and_order_do_not_change_results(embedder):
    a = embedder.embed(TEXTS, batch_size=64)
    b = embedder.embed(TEXTS[::-1], batch_size=1)[::-1]
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_semantic_similarity(embedder):
    q, same, other = embedder.embed(
        ["How can I change my password?", "Steps to reset a forgotten password", "Recipe for banana bread"]
    )
    assert q @ same > q @ other + 0.3


def test_count_tokens(embedder):
    counts = embedder.count_tokens(TEXTS, truncate=False)
    assert counts[3] == 2  # [CLS] [SEP]
    assert counts[1] > 256
    assert embedder.count_tokens(TEXTS)[1] == 256
    assert embedder.count_tokens([]) == []


def test_empty_list_and_bad_input(embedder):
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(EmbeddingInputError, match="list of strings"):
        embedder.embed("not a list")
    with pytest.raises(EmbeddingInputError, match=r"texts\[1\]"):
        embedder.embed(["ok", 3])
    with pytest.raises(ModelNotFoundError):
        Embedder("/nonexistent/embedding-model")


def test_thread_safe(embedder):
    expected = embedder.embed(TEXTS)
    results, errors = [], []

    def work():
        try:
            for _ in range(2):
                results.append(embedder.embed(TEXTS, batch_size=3))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        np.testing.assert_allclose(r, expected, atol=2e-5)
