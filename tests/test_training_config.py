"""Training config schema: validation with key paths, --set overrides, path resolution, the shipped config."""

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, data) -> Path:
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_keys_and_bad_values_are_reported_with_key_paths(tmp_path):
    path = _write(tmp_path, {"datasets": [{"path": "d.jsonl", "typ": "chat"}], "lora_rr": 8, "lora_r": -1,
                             "adapter": "dora", "lr_scheduler": "wobbly"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "datasets.0.typ: unknown key" in msg
    assert "lora_rr: unknown key" in msg
    assert "lora_r: Input should be greater than 0" in msg
    assert "adapter:" in msg and "'lora' or 'qlora'" in msg
    assert "lr_scheduler:" in msg


def test_cross_field_rules(tmp_path):
    base = {"datasets": [{"path": "d.jsonl"}]}
    with pytest.raises(ConfigError, match="alias needs register_as"):
        validate_config({**base, "alias": "champion"})
    with pytest.raises(ConfigError, match="bf16 and fp16"):
        validate_config({**base, "bf16": True, "fp16": True})
    with pytest.raises(ConfigError, match="register_as: 'bad name!'"):
        validate_config({**base, "register_as": "bad name!"})
    with pytest.raises(ConfigError, match="alias: 'latest' cannot be an MLflow alias"):
        validate_config({**base, "register_as": "m", "alias": "latest"})
    with pytest.raises(ConfigError, match="datasets: List should have at least 1 item"):
        validate_config({"datasets": []})
    cfg = validate_config(base)
    assert cfg.num_epochs == 1.0 and cfg.max_steps is None  # the default when neither is given


def test_set_overrides_are_yaml_typed_and_reach_nested_keys(tmp_path):
    path = _write(tmp_path, {"datasets": [{"path": "d.jsonl"}], "learning_rate": 1e-4})
    cfg = load_config(path, ["learning_rate=3e-3", "datasets.0.type=alpaca", "lora_target_modules=[q_proj, v_proj]",
                             "max_grad_norm=null", "register_as=acme", "alias=champion"])
    assert cfg.learning_rate == pytest.approx(3e-3) and isinstance(cfg.learning_rate, float)
    assert cfg.datasets[0].type == "alpaca"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.max_grad_norm is None
    with pytest.raises(ConfigError, match="datasets.3 is not an index of a list of 1"):
        apply_overrides({"datasets": [{}]}, ["datasets.3.path=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["learning_rate"])
    with pytest.raises(ConfigError, match="lora_r: Input should be a valid integer"):
        load_config(path, ["lora_r=eight"])


def test_relative_dataset_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    path = _write(tmp_path, {"datasets": [{"path": "d.jsonl"}]})
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert cfg.datasets[0].path == str(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_acme_config_is_valid_and_its_dataset_ships():
    cfg = load_config(REPO / "configs/train/smollm2-acme-support.yaml")
    assert cfg.base_model == "smollm2-135m-instruct" and cfg.register_as == "acme-support"
    assert Path(cfg.datasets[0].path).is_file()
    assert Path(cfg.datasets[0].path).read_text().count("\n") >= 30


def test_fingerprint_ignores_bookkeeping_but_not_hyperparameters():
    base = validate_config({"datasets": [{"path": "/x.jsonl"}]})
    same = validate_config({"datasets": [{"path": "/x.jsonl"}], "save_steps": 5, "eval_steps": 3})
    other = validate_config({"datasets": [{"path": "/x.jsonl"}], "learning_rate": 1e-3})
    assert base.training_fingerprint() == same.training_fingerprint() != other.training_fingerprint()
