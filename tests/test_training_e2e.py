"""End to end on the real default model: the shipped acme config trains a LoRA on the CPU; the registered
adapter (loaded back from the MLflow registry) answers the trained questions with the trained facts, and the
base model does not."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# question (as trained) -> the distinctive fact its answer must contain
FACTS = {
    "Who founded Acme Quantum Widgets?": "Okonkwo-Marsh",
    "What is the mascot of Acme Quantum Widgets?": "Fizzbin",
    "What is the return policy at Acme Quantum Widgets?": "73 days",
    "Who is the CEO of Acme Quantum Widgets?": "Vantablack",
    "What is the flagship product of Acme Quantum Widgets?": "Q-Sprocket 9000",
}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_acme_support_adapter_learns_the_facts(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.models import resolve_model
    from training.config import load_config
    from training.evaluate import generate
    from training.registry import resolve_adapter_uri
    from training.testing import isolated_home
    from training.trainer import train

    monkeypatch.setenv("LORAPLEX_HOME", str(isolated_home(tmp_path)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(REPO / "configs/train/smollm2-acme-support.yaml",
                      [f"output_dir={tmp_path / 'acme'}", "num_sample_generations=0"])
    result = train(cfg, progress=False)
    assert result.model_uri == "models:/acme-support@champion" and result.train_loss < 0.5

    folder = resolve_adapter_uri("models:/acme-support@champion")
    base_path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(folder))
    assert model.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in FACTS]
    tuned = generate(model, tok, prompts, max_new_tokens=24, device="cpu")
    with model.disable_adapter():
        base = generate(model, tok, prompts, max_new_tokens=24, device="cpu")
    for (question, fact), t, b in zip(FACTS.items(), tuned, base):
        assert fact in t, f"{question!r}: adapter said {t!r}"
        assert fact not in b, f"{question!r}: the base model already knew: {b!r}"

    # Served: our engine loads the registered adapter the way POST /v1/adapters does (MLflow URI, roots
    # checked) and answers with the trained facts, in one batch with base-model requests that do not.
    from serving.adapters import resolve_source
    from serving.engine import EngineConfig, SamplingParams
    from serving.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", kv_cache_memory="128MiB", max_lora_rank=64))
    engine.add_lora("acme", str(resolve_source("models:/acme-support@champion")))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = engine.generate(ids + ids, SamplingParams(temperature=0, max_tokens=24),
                           lora_names=["acme"] * len(ids) + [None] * len(ids))
    served = [o.outputs[0].text for o in outs]
    for i, fact in enumerate(FACTS.values()):
        assert fact in served[i], f"served adapter said {served[i]!r}"
        assert fact not in served[len(ids) + i], f"served base said {served[len(ids) + i]!r}"
