"""Helpers for tests and benchmarks: a tiny random Llama saved as an HF folder with the default tokenizer."""

from __future__ import annotations

import json
from pathlib import Path


def make_tiny_llama(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer and chat template; returns the folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from serving.models import resolve_model

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: str | Path, records: list[dict]) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def qa_records(n: int = 12) -> list[dict]:
    """Short chat examples with distinct answers."""
    return [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                          {"role": "assistant", "content": f"Code {i} is {i * 7 + 3} blue widgets."}]}
            for i in range(n)]


def isolated_home(root: str | Path) -> Path:
    """A fresh LORAPLEX_HOME under root that shares the real data dir's converted models (no re-conversion)."""
    from loraplex.paths import home
    from serving.models import prepare_default_model

    prepare_default_model()
    new = Path(root) / "home"
    new.mkdir(parents=True, exist_ok=True)
    if not (new / "models").exists():
        (new / "models").symlink_to(home() / "models", target_is_directory=True)
    return new
