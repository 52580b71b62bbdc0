"""Training config: an Axolotl-style YAML schema, validated with pydantic before any model loads.

    cfg = load_config("configs/train/smollm2-acme-support.yaml", overrides=["learning_rate=1e-3"])

Unknown keys and bad values raise ConfigError listing every problem by key path (`datasets.0.type: ...`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplex.paths import home

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ConfigError(ValueError):
    """An invalid training config; the message names each offending key path."""


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # a .jsonl / .json / .csv file, or a folder written by datasets' save_to_disk
    type: Literal["chat", "alpaca", "completion"] = "chat"
    split: str | None = None  # for a saved DatasetDict; default "train"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = "smollm2-135m-instruct"
    base_model_id: str | None = None  # Hub repo id written into the adapter; None: found from base_model
    adapter: Literal["lora", "qlora"] = "lora"
    lora_r: int = Field(8, gt=0, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]

    datasets: list[DatasetSpec] = Field(min_length=1)
    eval_datasets: list[DatasetSpec] = []  # used instead of a val_set_size split when given
    chat_template: str | None = None  # None: the tokenizer's; "chatml"; or a Jinja template string / .jinja file
    train_on_inputs: bool = False  # False: loss on assistant answers / completions only
    sequence_len: int = Field(512, ge=8)
    excess_length_strategy: Literal["truncate", "drop", "error"] = "truncate"  # examples over sequence_len
    sample_packing: bool = False

    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)  # wins over num_epochs when both are set
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw_torch", "adamw", "adam", "sgd"] = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42

    val_set_size: float = Field(0.0, ge=0)  # < 1: a fraction of the training examples; >= 1: a count
    eval_steps: int | None = Field(None, gt=0)  # None: evaluate at the end only
    save_steps: int | None = Field(None, gt=0)  # None: no intermediate checkpoints
    save_total_limit: int = Field(2, ge=1)  # checkpoints kept in output_dir/checkpoints
    logging_steps: int = Field(1, ge=1)
    output_dir: str | None = None  # default: $LORAPLEX_HOME/training/<register_as or "run">

    bf16: bool | Literal["auto"] = False
    fp16: bool = False
    gradient_checkpointing: bool = False

    mlflow_experiment: str = "loraplex"
    register_as: str | None = None  # MLflow registered model name for the adapter
    alias: str | None = None  # e.g. champion -> models:/<register_as>@champion

    sample_prompts: list[str] | None = None  # None: the first prompts of the eval (else train) data
    num_sample_generations: int = Field(3, ge=0)
    sample_max_new_tokens: int = Field(48, ge=1)

    @field_validator("lora_target_modules")
    @classmethod
    def _targets_nonempty(cls, v):
        if isinstance(v, list) and (not v or any(not m.strip() for m in v)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return v

    @field_validator("base_model_id")
    @classmethod
    def _repo_id(cls, v):
        from serving.identity import is_repo_id

        if v is not None and not is_repo_id(v):
            raise ValueError(f"{v!r} is not a Hugging Face repo id ('org/name')")
        return v

    @field_validator("register_as", "alias")
    @classmethod
    def _valid_name(cls, v):
        return check_name(v) if v is not None else v

    @field_validator("alias")
    @classmethod
    def _alias_not_reserved(cls, v):
        return check_alias(v) if v is not None else v

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.num_epochs is None and self.max_steps is None:
            self.num_epochs = 1.0
        if self.alias and not self.register_as:
            raise ValueError("alias needs register_as")
        if self.bf16 is True and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        if self.eval_datasets and self.val_set_size:
            raise ValueError("give either val_set_size or eval_datasets, not both")
        return self

    # ---- derived values
    @property
    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir).expanduser().resolve()
        return home() / "training" / (self.register_as or "run")

    def flat_params(self) -> dict[str, str]:
        """The resolved config flattened to MLflow params (lists/dicts as JSON)."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(mode="json").items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        out["output_dir"] = str(self.resolved_output_dir)
        return out

    def training_fingerprint(self) -> str:
        """Hash of everything that changes the training trajectory (resume refuses a checkpoint with another)."""
        skip = {"eval_steps", "save_steps", "save_total_limit", "logging_steps", "register_as", "alias",
                "mlflow_experiment", "sample_prompts", "num_sample_generations", "sample_max_new_tokens",
                "output_dir"}
        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Set a.b.0.c = value in nested dicts/lists, creating dicts on the way."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {dotted}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping or list")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` strings; values are parsed as YAML (1e-3 -> float, [a, b] -> list, null)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
        _set_path(data, key, value)
    return data


def check_name(v: str) -> str:
    """A registered-model name or alias: letters, digits, '_', '.', '-'; at most 128."""
    if not _NAME.match(v):
        raise ValueError(f"{v!r} is not a valid name (letters, digits, '_', '.', '-'; at most 128)")
    return v


def check_alias(v: str) -> str:
    """An MLflow alias: a valid name that is not 'latest' or v<N>, without dots."""
    check_name(v)
    if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v) or "." in v:
        raise ValueError(f"{v!r} cannot be an MLflow alias ('latest' and v<N> are reserved; no dots)")
    return v


def error_list(exc: ValidationError) -> list[tuple[str, str]]:
    """(key path, message) per error, as every config error names them: `lora_r: unknown key`."""
    out = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators
        out.append((".".join(str(p) for p in err["loc"]) or "(config)",
                    "unknown key" if err["type"] == "extra_forbidden" else msg))
    return out


def _format_errors(exc: ValidationError) -> str:
    return "\n".join(f"  {loc}: {msg}" for loc, msg in error_list(exc))


def validate_config(data: dict, *, source: str = "config", config_dir: Path | None = None) -> TrainConfig:
    """Validate a config dict; relative paths resolve against config_dir (else the current directory)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of keys to values")
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_format_errors(exc)}") from None
    _resolve_relative(cfg, (config_dir or Path.cwd()).resolve())
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply --set overrides, validate.

    Relative dataset paths resolve against the config file's folder first, then the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    data = apply_overrides(data, overrides or [])
    return validate_config(data, source=str(path), config_dir=path.parent)


def _resolve_relative(cfg: TrainConfig, config_dir: Path) -> None:
    """Dataset paths: relative to the config's folder if the file is there, else to the current directory."""
    for spec in [*cfg.datasets, *cfg.eval_datasets]:
        p = Path(spec.path).expanduser()
        if p.is_absolute():
            continue
        cand = config_dir / p
        spec.path = str(cand.resolve() if cand.exists() else p.resolve())
    if cfg.chat_template and cfg.chat_template.endswith(".jinja") and not Path(cfg.chat_template).is_absolute():
        cand = config_dir / cfg.chat_template
        cfg.chat_template = str(cand.resolve() if cand.exists() else Path(cfg.chat_template).resolve())
    if cfg.output_dir and not Path(cfg.output_dir).expanduser().is_absolute():
        cfg.output_dir = str(Path(cfg.output_dir).resolve())  # output_dir: relative to where you run


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
