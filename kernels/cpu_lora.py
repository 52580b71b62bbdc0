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


class _Weights:
    """One call's adapter weights (lora_as, lora_bs), checked and marshalled for the C kernel once: the engine
    passes the same view objects every step, so per call only x, y and the slots are left to pass (this cut
    the Python side of a call by about half)."""

    def __init__(self, lora_as, lora_bs):
        self.tensors = (*lora_as, *lora_bs)  # held, so the ids in the cache key stay theirs
        wdtype = lora_as[0].dtype
        self.fn = None  # the C function, None where the layouts or dtypes do not fit it
        if wdtype not in _KERNELS or any(w.dtype is not wdtype or not w.is_cpu for w in self.tensors):
            return
        if any(a.stride(2) != 1 or a.stride(1) != a.shape[2] or 1 not in b.stride()[1:]
               for a, b in zip(lora_as, lora_bs)):
            return
        self.rank, self.slots, self.in_features = lora_as[0].shape[1], lora_as[0].shape[0], lora_as[0].shape[2]
        if self.rank > cpu_native.limits()["max_rank"]:
            return
        m = len(lora_as)
        arr = lambda vals: (ctypes.c_int64 * m)(*vals)  # noqa: E731
        self.args = (arr([a.data_ptr() for a in lora_as]), arr([a.stride(0) for a in lora_as]),
                     arr([b.data_ptr() for b in lora_bs]), arr([b.stride(0) for b in lora_bs]),
                     arr([b.stride(1) for b in lora_bs]), arr([b.stride(2) for b in lora_bs]),
                     arr([b.shape[1] for b in lora_bs]))
        self.weight_dtype, self.fn = wdtype, getattr(cpu_native.lib(), _KERNELS[wdtype])


_cache: dict[tuple[int, ...], _Weights] = {}


def _weights(lora_as, lora_bs) -> _Weights:
    key = (*map(id, lora_as), *map(id, lora_bs))
    w = _cache.get(key)
    if w is None:
        if len(_cache) > 2048:  # the engine needs layers x module groups x a few (slots, rank) shapes
            _cache.clear()
        w = _cache[key] = _Weights(lora_as, lora_bs)
    return w


def ok(x, lora_as, lora_bs, token_lora, ys, scale) -> bool:
    """Whether this call takes the C path: float32 CPU activations, float32 or bfloat16 weights (the engine's
    lora_dtype), unit scale (the engine folds scales into B), layouts the kernel reads, and a batch that is not a
    few long same-slot runs (prefill chunks; one adapter for a whole float32 batch)."""
    if isinstance(scale, torch.Tensor) or scale != 1.0 or not lora_as or x.stride(1) != 1:
        return False
    if any(y.stride(1) != 1 for y in ys) or not cpu_native.usable(x, *ys):
        return False
    w = _weights(lora_as, lora_bs)
    if w.fn is None:
        return False
    plan = ref_lora.step_plan(token_lora, w.slots)
    if plan.max_n == 0 or plan.max_slot >= w.slots:  # out-of-range slots: torch raises for them
        return False
    if plan.runs is None:
        return True
    # a few same-slot runs: torch's GEMMs, except short (decode) runs on bf16 weights, which torch would upcast
    return w.weight_dtype is not x.dtype and max(end - start for _, start, end in plan.runs) <= MAX_C_RUN


def lora_apply(x, lora_as, lora_bs, token_lora, ys):
    """As kernels.ref_lora.lora_apply with scale 1; callers check ok() first."""
    ref_lora.check_apply_args(x, lora_as, lora_bs, token_lora, ys)
    w = _weights(lora_as, lora_bs)
    slots = token_lora if token_lora.dtype == torch.int32 and token_lora.is_contiguous() \
        else token_lora.to(torch.int32).contiguous()
    m = len(ys)
    w.fn(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], slots.data_ptr(), m, *w.args,
         (ctypes.c_int64 * m)(*[y.data_ptr() for y in ys]), (ctypes.c_int64 * m)(*[y.stride(0) for y in ys]),
         w.rank, cpu_native.threads())
    return ys
