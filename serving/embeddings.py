"""Sentence embeddings with transformers alone: a sentence-transformers folder (default all-MiniLM-L6-v2).

Reproduces sentence-transformers' Transformer -> Pooling -> Normalize pipeline (mean pooling over the
attention mask, L2 normalisation) without depending on that package.

    emb = Embedder()                      # the bundled all-MiniLM-L6-v2, no network
    vecs = emb.embed(["hello", "world"])  # float32 [2, 384], unit rows
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from serving.models import DEFAULT_EMBEDDING_MODEL, ModelNotFoundError, embedding_model_path

_DEFAULT_ALIASES = {DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}", "default"}


class EmbeddingInputError(ValueError):
    """Bad input to embed(): not a list of strings."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Embedder:
    """A loaded sentence-embedding model. Thread-safe: one lock serialises tokenisation and forward passes."""

    def __init__(self, source: str | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if source is None or source in _DEFAULT_ALIASES:
            folder: str = str(embedding_model_path())
            self.name = DEFAULT_EMBEDDING_MODEL
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                if not (path / "config.json").exists():
                    raise ModelNotFoundError(f"embedding model folder {source!r} has no config.json")
                folder = str(path)
                self.name = path.name
            elif source.startswith(("/", "./", "../", "~")):
                raise ModelNotFoundError(f"embedding model path {source!r} does not exist")
            else:
                folder = source  # an HF hub id: needs a network or the HF cache
                self.name = source
        self.source = folder
        self.device = torch.device(device)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(self.device).eval()
        local = Path(folder)
        st_config = _read_json(local / "sentence_bert_config.json") if local.is_dir() else {}
        pooling = _read_json(local / "1_Pooling" / "config.json") if local.is_dir() else {}
        # sentence-transformers truncates at max_seq_length (256 for MiniLM), not the tokenizer's 512.
        limit = st_config.get("max_seq_length") or getattr(self.tokenizer, "model_max_length", 512)
        self.max_tokens = int(min(limit, self.model.config.max_position_embeddings))
        self.do_lower_case = bool(st_config.get("do_lower_case", False))
        if pooling.get("pooling_mode_cls_token"):
            self.pooling = "cls"
        elif pooling.get("pooling_mode_max_tokens"):
            self.pooling = "max"
        else:
            self.pooling = "mean"
        self.dim = int(pooling.get("word_embedding_dimension") or self.model.config.hidden_size)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, device={self.device})"

    @staticmethod
    def _check(texts) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise EmbeddingInputError("texts must be a list of strings")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EmbeddingInputError(f"texts[{i}] must be a string, got {type(text).__name__}")
        return list(texts)

    def _prep(self, texts: list[str]) -> list[str]:
        return [t.lower() for t in texts] if self.do_lower_case else texts

    def count_tokens(self, texts: list[str], truncate: bool = True) -> list[int]:
        """Tokens per text as the model sees them (special tokens included; capped at max_tokens if truncate)."""
        texts = self._prep(self._check(texts))
        if not texts:
            return []
        with self._lock:
            enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        counts = [len(ids) for ids in enc]
        return [min(c, self.max_tokens) for c in counts] if truncate else counts

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of `text` (no special tokens, no truncation): the chunker's ruler."""
        with self._lock:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(a, b) for a, b in enc["offset_mapping"] if b > a]

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [n, dim], each row L2-normalised. Longer inputs are truncated to max_tokens."""
        texts = self._prep(self._check(texts))
        if batch_size < 1:
            raise EmbeddingInputError("batch_size must be >= 1")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        torch = self._torch
        # Longest first, like sentence-transformers: batches of similar length waste less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state  # [b, t, d]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "max":
                    pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
                else:
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out
