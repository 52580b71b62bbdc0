"""The training recipe on a tiny random Llama with a real (temporary) MLflow store: tracking, registry,
resume == uninterrupted, and errors raised before anything is created."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import validate_config
from serving.router.sim import free_port
from training.testing import isolated_home, make_tiny_llama, qa_records, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """LORAPLEX_HOME and MLFLOW_TRACKING_URI in a temp folder for the whole module; a tiny model and data."""
    root = tmp_path_factory.mktemp("train")
    saved = {k: os.environ.get(k) for k in ("LORAPLEX_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["LORAPLEX_HOME"] = str(isolated_home(root))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    data = write_jsonl(root / "qa.jsonl", qa_records(12))
    yield {"root": root, "model": make_tiny_llama(root / "tiny"), "data": data}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(env, out: str, **kw):
    base = dict(base_model=env["model"], datasets=[{"path": env["data"]}], max_steps=6, micro_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=5e-3, lora_dropout=0.1, warmup_steps=1,
                val_set_size=2, eval_steps=3, save_steps=2, output_dir=str(env["root"] / out),
                num_sample_generations=1, sample_max_new_tokens=4, mlflow_experiment="unit")
    base.update(kw)
    return validate_config(base)


def _weights(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted_and_everything_is_tracked(env):
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.registry import resolve_adapter_uri
    from training.trainer import TrainingInterrupted, train

    full = train(_cfg(env, "full", register_as="tiny-unit", alias="champion"), progress=False)

    with pytest.raises(TrainingInterrupted):
        train(_cfg(env, "stopped"), progress=False, stop_after_steps=3)  # checkpoint at step 2, stop after 3
    assert sorted(p.name for p in (env["root"] / "stopped" / "checkpoints").iterdir()) == ["step-2"]
    client = MlflowClient()
    interrupted_run = client.search_runs([client.get_experiment_by_name("unit").experiment_id],
                                         "attributes.status = 'KILLED'")[0].info.run_id
    resumed = train(_cfg(env, "stopped"), progress=False, resume=True)

    a, b = _weights(full.adapter_dir), _weights(resumed.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.run_id == interrupted_run and client.get_run(resumed.run_id).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(resumed.run_id, "loss")} == set(range(1, 7))

    # the run: params, per-step metrics, eval metrics, tags, artifacts
    run = client.get_run(full.run_id)
    assert run.data.params["learning_rate"] == "0.005" and run.data.params["lora_r"] == "8"
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss", "eval_perplexity"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(full.run_id, "eval_loss")] == [3, 6]
    assert run.data.tags["base_model"] == env["model"] and len(run.data.tags["dataset_hash"]) == 64
    assert run.data.tags["code_version"].startswith("0.1.0")
    arts = {f.path for f in client.list_artifacts(full.run_id)}
    assert {"config.yaml", "adapter", "tokenizer", "samples.jsonl"} <= arts
    assert {f.path for f in client.list_artifacts(full.run_id, "adapter")} >= {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}

    # registry: the alias resolves to a PEFT folder with the same weights and the configured base name
    folder = resolve_adapter_uri("models:/tiny-unit@champion")
    assert all(torch.equal(_weights(folder)[k], a[k]) for k in a)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == env["model"]
    assert full.model_uri == "models:/tiny-unit@champion"
    assert resolve_adapter_uri("models:/tiny-unit/1") == folder
    assert (resolve_adapter_uri(f"runs:/{full.run_id}/adapter") / "adapter_model.safetensors").exists()

    # eval loss, checked with HF's own loss on the held-out examples through PEFT's loader
    from transformers import AutoTokenizer

    from training.data import IGNORE
    from training.trainer import prepare_data

    tok = AutoTokenizer.from_pretrained(env["model"])
    _, eval_ex, _, _ = prepare_data(_cfg(env, "full"), tok)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["model"]), str(folder)).eval()
    total = count = 0
    with torch.no_grad():
        for e in eval_ex:
            n = sum(1 for lab in e.labels[1:] if lab != IGNORE)
            total += float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss) * n
            count += n
    assert full.eval_loss == pytest.approx(total / count, rel=1e-4)
    assert full.eval_perplexity == pytest.approx(math.exp(full.eval_loss), rel=1e-6)


def test_training_reduces_loss_with_packing(env):
    from training.trainer import train

    res = train(_cfg(env, "packed", sample_packing=True, sequence_len=128, max_steps=8, lora_dropout=0.0,
                     val_set_size=0, eval_steps=None, save_steps=None, learning_rate=2e-2,
                     lora_target_modules="all-linear", num_sample_generations=0), progress=False)
    from mlflow import MlflowClient

    losses = [m.value for m in sorted(MlflowClient().get_metric_history(res.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_setup_errors_are_clear_and_leave_nothing_behind(env, monkeypatch):
    from mlflow import MlflowClient

    from training.tracking import RunTracker, TrackingError
    from training.trainer import TrainingError, train

    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match=r"adapter: qlora .* needs a CUDA GPU .*Use adapter: lora"):
            train(_cfg(env, "q", adapter="qlora"), progress=False)
    with pytest.raises(TrainingError, match=r"lora_target_modules: 'qq_proj' matches no Linear layer .* q_proj"):
        train(_cfg(env, "t", lora_target_modules=["q_proj", "qq_proj"], mlflow_experiment="never"), progress=False)
    assert MlflowClient().get_experiment_by_name("never") is None
    with pytest.raises(TrainingError, match="base_model: model path '/nonexistent/model' does not exist"):
        train(_cfg(env, "b", base_model="/nonexistent/model"), progress=False)
    with pytest.raises(TrainingError, match="--resume: no checkpoint"):
        train(_cfg(env, "fresh"), progress=False, resume=True)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match=r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"):
        train(_cfg(env, "u"), progress=False)
    monkeypatch.undo()

    # a registration that fails half-way (MLflow rejects the alias) removes the version and the new model
    tracker = RunTracker("unit-reg")
    adapter = env["root"] / "fake-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tracker.log_artifacts(adapter, "adapter")
    with pytest.raises(TrackingError, match="registering the adapter as 'half' failed: .*reserved"):
        tracker.register_adapter("half", "latest", {})
    assert MlflowClient().search_registered_models("name = 'half'") == []


def test_adapter_names_its_base_by_repo_id_and_the_merge_card_too(env, tmp_path):
    """A base folder that holds a Hub model (its config's _name_or_path) gives its repo id, not this machine's
    path, as the adapter's base_model_name_or_path; base_model_id overrides; a merged export says the same."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.evaluate import merge_adapter
    from training.trainer import train

    hub = tmp_path / "hub-copy"
    shutil.copytree(env["model"], hub)
    cfg = json.loads((hub / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "acme-labs/tiny-llama"}))
    quick = dict(max_steps=1, save_steps=None, eval_steps=None, val_set_size=0, num_sample_generations=0)
    found = train(_cfg(env, "id-found", base_model=str(hub), **quick), progress=False)
    declared = json.loads((Path(found.adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert declared == "acme-labs/tiny-llama"
    given = train(_cfg(env, "id-given", base_model=str(hub), base_model_id="acme-labs/other-name", **quick),
                  progress=False)
    assert json.loads((Path(given.adapter_dir) / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "acme-labs/other-name"
    # PEFT loads it on the weights without looking the name up anywhere
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hub), found.adapter_dir)
    merged = merge_adapter(found.adapter_dir, tmp_path / "merged", base_model=str(hub))
    assert "base_model: acme-labs/tiny-llama\n" in (merged / "README.md").read_text()
    with pytest.raises(Exception, match="base_model_id: 'no slash' is not a Hugging Face repo id"):
        _cfg(env, "bad", base_model_id="no slash")
