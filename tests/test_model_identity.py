"""Served models know who they are: repo ids and aliases, the adapter base check, system_fingerprint.

Adapters are real PEFT folders whose `base_model_name_or_path` names the base the way other tools write it
(a Hub id, in another letter case, a local copy's path, our API name, an alias); each one that loads must give
HF + PEFT's greedy output. The refusals (another model, wrong shapes even with force) are checked too.
"""

from __future__ import annotations

import json
import shutil

import pytest

from serving.engine import EngineConfig, SamplingParams
from serving.engine.errors import AdapterError
from serving.engine.llm_engine import LLMEngine
from serving.identity import DEFAULT_MODEL_HF_ID, model_identity
from tests.conftest import make_lora_adapter

HF_ID = "acme-labs/Tiny-Llama-64"


@pytest.fixture(scope="module")
def base(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def engine(base):
    return LLMEngine(EngineConfig(model=base, dtype="float32", served_name="tiny", hf_id=HF_ID, aliases=("tiny-chat",),
                                  num_kv_blocks=128, max_lora_rank=16))


def peft_greedy(base_path, adapter, prompts, n):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return [merged.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)[0, len(ids):].tolist() for ids in prompts]


def test_identity_from_config_source_and_folder(base, tmp_path):
    assert model_identity("smollm2-135m-instruct", "smollm2-135m-instruct").hf_id == DEFAULT_MODEL_HF_ID
    assert model_identity("q", "Qwen/Qwen2.5-0.5B-Instruct").hf_id == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_identity("t", base).hf_id is None  # a folder that says nothing about its origin
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "_name_or_path": HF_ID}))
    assert model_identity("t", str(copy)).hf_id == HF_ID
    assert model_identity("t", str(copy), hf_id="other/name").hf_id == "other/name"  # the config's hf_id wins
    ident = model_identity("t", base, HF_ID, ["a1", "a2"])
    assert ident.names() == ["t", HF_ID, "a1", "a2"]


def test_default_model_folder_names_its_repo_id(default_model_path):
    from serving.identity import folder_hf_id

    assert folder_hf_id(default_model_path) == DEFAULT_MODEL_HF_ID


def test_adapters_naming_the_model_any_way_load_and_match_peft(engine, base, tmp_path):
    copy = tmp_path / "local-copy-of-tiny"  # a local copy of the same weights whose config names the repo id
    shutil.copytree(base, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "_name_or_path": HF_ID}))
    names = {"hub": HF_ID, "case": HF_ID.upper(), "copy": str(copy), "api": "tiny", "alias": "tiny-chat",
             "own-folder": base, "remote-path": "/data/elsewhere/Tiny-Llama-64"}
    prompts = [engine.tokenizer("Hello there, friend")["input_ids"]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = set()
    for i, (name, declared) in enumerate(names.items()):
        folder = make_lora_adapter(base, tmp_path / name, 4, seed=100 + i, base_name=declared)
        engine.add_lora(name, folder)
        info = next(a for a in engine.lora.list() if a.name == name)
        assert info.warnings == [] and info.forced is False, (name, info.warnings)
        ours = engine.generate(prompts, params, lora_names=[name])[0].outputs[0].token_ids
        assert ours == peft_greedy(base, folder, prompts, 6)[0], name
        outputs.add(tuple(ours))
    assert len(outputs) > 1  # the adapters really change the output


def test_a_base_the_server_cannot_place_loads_with_a_warning(engine, base, tmp_path, caplog):
    folder = make_lora_adapter(base, tmp_path / "a", 4, seed=1, base_name="/data/smollm2")
    with caplog.at_level("WARNING", logger="loraplex.lora"):
        engine.add_lora("unplaced", folder)
    info = next(a for a in engine.lora.list() if a.name == "unplaced")
    assert len(info.warnings) == 1 and "/data/smollm2" in info.warnings[0] and "not on this server" in info.warnings[0]
    assert "/data/smollm2" in caplog.text


def test_another_models_id_is_refused_unless_forced(engine, base, tmp_path):
    folder = make_lora_adapter(base, tmp_path / "m", 4, seed=2, base_name="meta-llama/Llama-3.1-8B")
    with pytest.raises(AdapterError) as e:
        engine.add_lora("mismatch", folder)
    assert "meta-llama/Llama-3.1-8B" in e.value.message and "tiny" in e.value.message and HF_ID in e.value.message
    assert e.value.code == "adapter_base_mismatch" and '"force": true' in e.value.message
    assert "mismatch" not in {a.name for a in engine.lora.list()}  # nothing left half-loaded
    engine.add_lora("mismatch", folder, force=True)
    info = next(a for a in engine.lora.list() if a.name == "mismatch")
    assert info.forced is True and "meta-llama/Llama-3.1-8B" in info.warnings[0]
    prompts = [engine.tokenizer("Forced adapter")["input_ids"]]
    ours = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                           lora_names=["mismatch"])[0].outputs[0].token_ids
    assert ours == peft_greedy(base, folder, prompts, 5)[0]


def test_wrong_shapes_are_refused_whatever_the_name_and_force(engine, tiny_model_factory, tmp_path):
    wide = tiny_model_factory("llama", hidden_size=96, intermediate_size=160)
    for declared in (HF_ID, "tiny", "someone/else"):
        folder = make_lora_adapter(wide, tmp_path / declared.replace("/", "_"), 4, seed=3, base_name=declared)
        with pytest.raises(AdapterError, match="has shape"):
            engine.add_lora("wide", folder, force=True)
        assert "wide" not in {a.name for a in engine.lora.list()}


def test_a_folder_holding_another_architecture_is_refused(engine, base, tiny_model_factory, tmp_path):
    qwen = tiny_model_factory("qwen2")  # same sizes, so only the folder's config tells it apart
    folder = make_lora_adapter(base, tmp_path / "q", 4, seed=4, base_name=qwen)
    with pytest.raises(AdapterError, match="another model"):
        engine.add_lora("qwen-base", folder)


def test_system_fingerprint_is_stable_and_follows_dtype(base):
    def fp(**kw):
        cfg = EngineConfig(model=base, num_kv_blocks=16, enable_lora=False, **{"dtype": "float32", **kw})
        return LLMEngine(cfg).system_fingerprint

    first, again = fp(), fp()
    assert isinstance(first, str) and first.startswith("fp_") and first == again
    assert fp(dtype="bfloat16") != first
    assert fp(seed=7) != first


def test_serve_config_aliases_and_hf_id_are_checked():
    from serving.config import ConfigError, parse_config

    cfg = parse_config({"models": [{"name": "a", "aliases": ["small"], "hf_id": "org/a"}], "governance":
                        {"enabled": False}})
    assert cfg.models[0].identity().names() == ["a", "org/a", "small"]
    with pytest.raises(ConfigError, match=r"models\[1\].aliases\[0\]: 'a' already names another model"):
        parse_config({"models": [{"name": "a"}, {"name": "b", "aliases": ["a"]}], "governance": {"enabled": False}})
    with pytest.raises(ConfigError, match=r"models\[0\].hf_id: 'not a repo' is not a Hugging Face repo id"):
        parse_config({"models": [{"name": "a", "hf_id": "not a repo"}], "governance": {"enabled": False}})
