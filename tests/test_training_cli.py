"""`loraplex train | eval | merge` on a tiny random Llama, checked against HF transformers + PEFT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from loraplex.cli import main
from training.testing import isolated_home, make_tiny_llama, qa_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    saved = {k: os.environ.get(k) for k in ("LORAPLEX_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["LORAPLEX_HOME"] = str(isolated_home(root))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    model = make_tiny_llama(root / "tiny")
    write_jsonl(root / "qa.jsonl", qa_records(8))
    cfg = {"base_model": model, "datasets": [{"path": "qa.jsonl"}], "max_steps": 3, "micro_batch_size": 4,
           "learning_rate": 1e-2, "lora_target_modules": ["q_proj", "v_proj", "down_proj"], "output_dir": "out",
           "num_sample_generations": 1, "sample_max_new_tokens": 4, "register_as": "cli-tiny", "alias": "champion"}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    yield {"root": root, "model": model, "cfg": root / "cfg.yaml"}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_train_eval_merge(env, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = env["root"]
    monkeypatch.chdir(root)
    # the console entry point, in a subprocess: --set overrides, --json result line
    out = subprocess.run([sys.executable, "-m", "loraplex.cli", "train", str(env["cfg"]), "--set", "max_steps=2",
                          "--set", "lora_r=4", "--json"], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["model_uri"] == "models:/cli-tiny@champion"
    adapter = Path(result["adapter_dir"])
    assert adapter == root / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    # eval of the registered adapter: loss equals HF's own loss through PEFT on the same examples
    assert main(["eval", "models:/cli-tiny@champion", "--data", str(root / "qa.jsonl"), "--samples", "1",
                 "--max-new-tokens", "3", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["base_model"] == env["model"] and ev["examples"] == 8 and len(ev["samples"]) == 1
    tok = AutoTokenizer.from_pretrained(env["model"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["model"]), str(adapter)).eval()
    from training.config import DatasetSpec
    from training.data import IGNORE, build_examples

    exs = build_examples([DatasetSpec(path=str(root / "qa.jsonl"))], tok, chat_template=None, train_on_inputs=False,
                         sequence_len=2048, excess_length_strategy="truncate")
    total = count = 0
    with torch.no_grad():
        for e in exs:
            n = sum(1 for lab in e.labels[1:] if lab != IGNORE)
            loss = peft_model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
            total, count = total + float(loss) * n, count + n
    assert ev["eval_loss"] == pytest.approx(total / count, rel=1e-4)

    # merge: the merged folder's logits equal base + adapter through PEFT
    assert main(["merge", str(adapter), "-o", str(root / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(root / "merged").eval()
    ids = torch.tensor([exs[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert (root / "merged" / "tokenizer.json").exists()


def test_cli_errors_exit_2_with_a_clear_message(env, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"path": "x.jsonl", "kind": "chat"}], "lora_rr": 3}))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraplex: error:") and "datasets.0.kind: unknown key" in err and "lora_rr: unknown key" in err

    (tmp_path / "broken.jsonl").write_text(json.dumps(qa_records(1)[0]) + "\n{nope\n")
    assert main(["train", str(env["cfg"]), "--set", f"datasets.0.path={tmp_path / 'broken.jsonl'}"]) == 2
    assert "broken.jsonl:2: invalid JSON" in capsys.readouterr().err

    assert main(["train", str(env["cfg"]), "--set", f"datasets.0.path={tmp_path / 'missing.jsonl'}"]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err

    assert main(["eval", "models:/no-such-model@champion", "--data", str(tmp_path / "broken.jsonl")]) == 2
    assert "'models:/no-such-model@champion' is not in the MLflow registry" in capsys.readouterr().err
    assert main(["merge", env["model"], "-o", str(tmp_path / "m")]) == 2
    assert "is not an adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_train_as_a_ray_task(env, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(env["root"])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["train", str(env["cfg"]), "--ray", "--set", "max_steps=1", "--set", "register_as=ray-tiny",
                     "--set", "output_dir=ray-out", "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        ray.shutdown()
    assert result["steps"] == 1 and result["model_uri"] == "models:/ray-tiny@champion"
    assert (env["root"] / "ray-out" / "adapter" / "adapter_model.safetensors").exists()
    from mlflow import MlflowClient

    assert MlflowClient().get_run(result["run_id"]).info.status == "FINISHED"
