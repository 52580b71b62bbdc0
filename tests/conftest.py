"""Shared fixtures: the default model folder and tiny random models of each supported architecture."""

from __future__ import annotations

import os

import pytest
import torch

from loraplex.paths import home

# Every fresh data dir a test makes (a served model's, a training job's) loads the C kernels built once for the
# session instead of compiling them again (~6 s each).
os.environ.setdefault("LORAPLEX_KERNEL_CACHE", str(home() / "kernels"))


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


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapter(base_path, folder, rank, seed, targets=LORA_TARGETS, alpha=None, rslora=False,
                      std=0.3, base_name=None):
    """A PEFT LoRA with random A and B (PEFT starts B at zero, which would make every adapter a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets,
                                            use_rslora=rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(folder)
    if base_name:
        import json
        from pathlib import Path

        cfg_file = Path(folder) / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_file.write_text(json.dumps(cfg))
    return str(folder)
