"""Load a model folder (or random weights at its shapes) into our Llama-family forward."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from serving.engine.errors import ModelLoadError
from serving.engine.model import ArchSpec, CausalLM

# HF architecture name -> what differs. Anything else is refused: we only run what we test against HF.
ARCHITECTURES = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def load_hf_config(source: str):
    from serving.models import ModelNotFoundError, resolve_model
    from transformers import AutoConfig

    try:
        path = resolve_model(source)
        return path, AutoConfig.from_pretrained(path)
    except ModelNotFoundError as exc:
        raise ModelLoadError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc


def arch_spec(cfg) -> ArchSpec:
    archs = list(getattr(cfg, "architectures", None) or [])
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ModelLoadError(
        f"unsupported architecture {archs or cfg.model_type!r}: loraplex runs {', '.join(ARCHITECTURES)}"
    )


def rope_parameters(cfg) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling, computed by transformers' own RoPE functions (scaling types included)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ModelLoadError(f"unsupported RoPE scaling {rope_type!r}: supported are {', '.join(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")


def max_context(cfg, requested: int | None) -> int:
    """The model's context, capped by max_model_len. Mistral's sliding window caps it too: within the window,
    full attention is exact, and we do not implement windowed attention."""
    limit = int(getattr(cfg, "max_position_embeddings", 2048))
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        limit = min(limit, int(window))
    if requested is not None:
        if requested <= 0:
            raise ModelLoadError(f"max_model_len must be positive, got {requested}")
        if requested > limit:
            raise ModelLoadError(f"max_model_len {requested} exceeds the model's context of {limit} tokens")
        limit = requested
    return limit


def _checkpoint_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    return files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def _hub_folder(source: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # network or auth errors: say what to do
        raise ModelLoadError(f"cannot download {source!r} from the Hugging Face hub: {exc}") from exc


def _map_weights(model: CausalLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours, fusing q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    out["embed_tokens.weight"] = state["embed_tokens.weight"]
    out["norm.weight"] = state["norm.weight"]
    if model.lm_head is not None:
        out["lm_head.weight"] = state.get("lm_head.weight", state["embed_tokens.weight"])
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        for kind in ("weight", "bias"):
            parts = [state.get(f"{a}{n}_proj.{kind}") for n in "qkv"]
            if all(t is not None for t in parts):
                out[f"{a}qkv_proj.{kind}"] = torch.cat(parts, 0)
        out[f"{a}o_proj.weight"] = state[f"{a}o_proj.weight"]
        if f"{a}o_proj.bias" in state:
            out[f"{a}o_proj.bias"] = state[f"{a}o_proj.bias"]
        if layer.self_attn.q_norm is not None:
            out[f"{a}q_norm.weight"] = state[f"{a}q_norm.weight"]
            out[f"{a}k_norm.weight"] = state[f"{a}k_norm.weight"]
        m = p + "mlp."
        out[f"{m}gate_up_proj.weight"] = torch.cat([state[f"{m}gate_proj.weight"], state[f"{m}up_proj.weight"]], 0)
        out[f"{m}down_proj.weight"] = state[f"{m}down_proj.weight"]
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}{n}.weight"] = state[f"{p}{n}.weight"]
    return out


def build_model(source: str, load_format: str, dtype: torch.dtype, device: torch.device, max_model_len: int | None,
                quantization: str | None = None):
    """Returns (model, hf_config, model_folder, context_length). On the CPU, float32 and bfloat16 weights are
    packed for oneDNN and int8/int4 quantized at load (serving.engine.linear), around float32 activations."""
    path, cfg = load_hf_config(source)
    spec = arch_spec(cfg)
    ctx = max_context(cfg, max_model_len)
    inv_freq, scaling = rope_parameters(cfg)
    with torch.device("meta"):
        model = CausalLM(cfg, spec, inv_freq.to("meta"), scaling, ctx)
    model = model.to_empty(device=device)
    if load_format == "dummy":
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    else:
        folder = Path(path)
        if not folder.is_dir():
            folder = _hub_folder(path)
        try:
            weights = _map_weights(model, _read_state_dict(folder))
            missing, unexpected = model.load_state_dict(weights, strict=False, assign=False)
        except KeyError as exc:
            raise ModelLoadError(f"checkpoint in {folder} lacks weight {exc}") from exc
        missing = [m for m in missing if not m.startswith("rope_")]
        if missing:
            raise ModelLoadError(f"checkpoint in {folder} lacks weights: {missing[:5]}")
        path = str(folder)
    cpu_packed = device.type == "cpu" and (dtype in (torch.float32, torch.bfloat16) or quantization)
    if quantization and not cpu_packed:
        raise ModelLoadError(f"quantization {quantization!r} runs on the CPU only (device: cpu)")
    if not (cpu_packed and model.pack_linears(dtype, quantization)):
        model = model.to(dtype=dtype)  # CUDA, float16, or a torch build without oneDNN: plain torch ops
    model.set_rope(inv_freq.to(device), scaling, ctx)  # after the dtype cast, so the tables stay float32
    model.eval()
    return model, cfg, path, ctx


def load_generation_eos(path: str, cfg, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    gen_file = Path(path) / "generation_config.json"
    if gen_file.exists():
        value = json.loads(gen_file.read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids
