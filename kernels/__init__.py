"""loraplex's kernels: paged attention, multi-LoRA shrink/expand and top-k retrieval scoring.

Each kernel has a vectorised torch reference (`ref_*`) and a Triton version (`triton_*`, imported lazily on
first CUDA use); the decoder's element-wise ops have torch references in `ref_ops`. On float32 CPU tensors,
decode attention, multi-LoRA and those ops also run as C (`cpu_attention`, `cpu_lora`, `cpu_ops`, built by
`cpu_native` on first use); `kernels.dispatch` picks one per call (see its docstring).
"""

from kernels.dispatch import (
    BACKENDS,
    KernelBackendError,
    LoRAGroup,
    backend_for,
    lora_apply,
    lora_expand,
    lora_group,
    lora_shrink,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention,
    prepare,
    rms_norm,
    rotary,
    silu_and_mul,
    requested_backend,
    set_backend,
    topk_scores,
)

__all__ = [
    "BACKENDS",
    "KernelBackendError",
    "backend_for",
    "requested_backend",
    "set_backend",
    "prepare",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "paged_decode_attention",
    "prefill_attention",
    "paged_prefill_attention",
    "lora_shrink",
    "lora_expand",
    "lora_apply",
    "lora_group",
    "LoRAGroup",
    "topk_scores",
]
