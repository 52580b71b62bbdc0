"""Shared fixtures: the default model folder and tiny random models of each supported architecture."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from serving.models import prepare_default_model

    return str(prepare_default_model())


TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False, "head_dim": 16}),
}


def make_tiny_model(folder, arch: str, tokenizer_path: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random HF model of `arch` (with the default model's tokenizer) into `folder`.

    Weights use a large init scale so logits are peaked: greedy choices then do not hinge on float noise.
    """
    import transformers
    from transformers import AutoTokenizer

    cfg_name, model_name, extra = TINY_ARCHS[arch]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, tie_word_embeddings=(arch == "llama"),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, default_model_path):
    cache: dict = {}

    def make(arch: str = "llama", **overrides) -> str:
        key = (arch, repr(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, default_model_path,
                                         **overrides)
        return cache[key]

    return make
