"""Multi-LoRA shrink+expand in C on the CPU: float32 activations, float32 or bfloat16 adapter weights
(lp_lora_apply_f32 / lp_lora_apply_bf16w in kernels/csrc/cpu_kernels.c).

For decode-shaped batches (a few tokens per adapter slot) the torch path pads tokens into per-slot batched
matmuls; the C kernel instead walks the tokens and reads each slot's A and B in place, once per token (from
cache for a slot's later tokens). B may be [slots, out, r] with either axis contiguous (the engine keeps it
rank-major on the CPU). Batches of long same-adapter runs (prefill, one adapter for everything) stay
on the torch path, whose plain GEMMs are faster there.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cpu_native, ref_lora

_KERNELS = {torch.float32: "lp_lora_apply_f32", torch.bfloat16: "lp_lora_apply_bf16w"}
MAX_C_RUN = 32  # longest same-slot run of tokens the C kernel takes from torch's GEMMs when weights are bf16


def ok(x, lora_as, lora_bs, token_lora, ys, scale) -> bool:
    """Whether this call takes the C path: float32 CPU activations, float32 or bfloat16 weights (the engine's
    lora_dtype), unit scale (the engine folds scales into B), layouts the kernel reads, and a batch that is not a
    few long same-slot runs (prefill chunks; one adapter for a whole float32 batch)."""
    if isinstance(scale, torch.Tensor) or scale != 1.0 or not lora_as or x.stride(1) != 1:
        return False
    wdtype = lora_as[0].dtype
    if wdtype not in _KERNELS or any(w.dtype is not wdtype or not w.is_cpu for w in (*lora_as, *lora_bs)):
        return False
    if any(a.stride(2) != 1 or a.stride(1) != a.shape[2] or 1 not in b.stride()[1:] or y.stride(1) != 1
           for a, b, y in zip(lora_as, lora_bs, ys)):
        return False
    if not cpu_native.usable(x, *ys) or lora_as[0].shape[1] > cpu_native.limits()["max_rank"]:
        return False
    plan = ref_lora.step_plan(token_lora, lora_as[0].shape[0])
    if plan.max_n == 0 or plan.max_slot >= lora_as[0].shape[0]:  # out-of-range slots: torch raises for them
        return False
    if plan.runs is None:
        return True
    # a few same-slot runs: torch's GEMMs, except short (decode) runs on bf16 weights, which torch would upcast
    return wdtype is not x.dtype and max(end - start for _, start, end in plan.runs) <= MAX_C_RUN


def lora_apply(x, lora_as, lora_bs, token_lora, ys):
    """As kernels.ref_lora.lora_apply with scale 1; callers check ok() first."""
    ref_lora.check_apply_args(x, lora_as, lora_bs, token_lora, ys)
    slots = token_lora if token_lora.dtype == torch.int32 and token_lora.is_contiguous() \
        else token_lora.to(torch.int32).contiguous()
    m = len(lora_as)
    arr = lambda vals: (ctypes.c_int64 * m)(*vals)  # noqa: E731
    getattr(cpu_native.lib(), _KERNELS[lora_as[0].dtype])(
        x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], slots.data_ptr(), m,
        arr([a.data_ptr() for a in lora_as]), arr([a.stride(0) for a in lora_as]),
        arr([b.data_ptr() for b in lora_bs]), arr([b.stride(0) for b in lora_bs]),
        arr([b.stride(1) for b in lora_bs]), arr([b.stride(2) for b in lora_bs]), arr([b.shape[1] for b in lora_bs]),
        arr([y.data_ptr() for y in ys]), arr([y.stride(0) for y in ys]), lora_as[0].shape[1], cpu_native.threads())
    return ys
