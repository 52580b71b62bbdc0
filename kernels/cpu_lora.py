"""Multi-LoRA shrink+expand in C on the CPU: float32 activations, float32 or bfloat16 adapter weights
(lp_lora_apply_f32|bf16w and lp_lora_runs_f32|bf16w in kernels/csrc/cpu_kernels.c).

Two kernels, chosen per step from its slot vector. Tokens mostly in same-slot runs (prefill chunks, one
adapter for a whole batch, several decodes per adapter) take the runs kernel: blocks of 4 tokens of one slot
share every weight load (B rank-major, as the engine keeps it on the CPU). Tokens on distinct slots (decode
with many adapters) take the per-token kernel, which reads each slot's A and B in place once per token; the
torch path would pad them into per-slot batched matmuls. Both read float32 or bfloat16 weights (the engine's
lora_dtype). With B out-major only the per-token kernel runs, up to runs of MAX_C_RUN tokens; longer runs go to
torch's GEMMs, as does anything else the kernels do not take.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cpu_native, ref_lora
from kernels.dispatch import requested_backend

_F32 = torch.float32
_KERNELS = {torch.float32: "lp_lora_apply_f32", torch.bfloat16: "lp_lora_apply_bf16w"}
_RUN_KERNELS = {torch.float32: "lp_lora_runs_f32", torch.bfloat16: "lp_lora_runs_bf16w"}
MAX_C_RUN = 32  # longest same-slot run the per-token kernel takes from torch's GEMMs (~64: torch's)


class _Weights:
    """Adapter weights (lora_as, lora_bs) checked and marshalled for the C kernel; fn is None where their dtypes
    or layouts do not fit it."""

    def __init__(self, lora_as, lora_bs):
        wdtype = lora_as[0].dtype
        self.fn = None
        if wdtype not in _KERNELS or any(w.dtype is not wdtype or not w.is_cpu for w in (*lora_as, *lora_bs)):
            return
        if any(a.stride(2) != 1 or a.stride(1) != a.shape[2] or 1 not in b.stride()[1:]
               for a, b in zip(lora_as, lora_bs)):
            return
        self.rank, self.slots, self.in_features = lora_as[0].shape[1], lora_as[0].shape[0], lora_as[0].shape[2]
        if self.rank > cpu_native.limits()["max_rank"]:
            return
        m = self.modules = len(lora_as)
        arr = lambda vals: (ctypes.c_int64 * m)(*vals)  # noqa: E731
        self.args = (arr([a.data_ptr() for a in lora_as]), arr([a.stride(0) for a in lora_as]),
                     arr([b.data_ptr() for b in lora_bs]), arr([b.stride(0) for b in lora_bs]),
                     arr([b.stride(1) for b in lora_bs]), arr([b.stride(2) for b in lora_bs]),
                     arr([b.shape[1] for b in lora_bs]))
        self.fn = getattr(cpu_native.lib(), _KERNELS[wdtype])
        rank_major = all(b.stride(1) == 1 for b in lora_bs)
        self.runs_fn = getattr(cpu_native.lib(), _RUN_KERNELS[wdtype]) if rank_major else None

    def kernel(self, token_lora):
        """The C function for this step's slots, or None (torch): none in range, or long runs without the runs
        kernel. Runs of 2+ tokens on average take the runs kernel, scattered slots the per-token one."""
        plan = ref_lora.step_plan(token_lora, self.slots)
        if plan.max_n == 0 or plan.max_slot >= self.slots:  # out-of-range slots: torch raises for them
            return None
        if self.runs_fn is not None and plan.tokens >= 2 * plan.segments:
            return self.runs_fn
        if plan.runs is None or max(end - start for _, start, end in plan.runs) <= MAX_C_RUN:
            return self.fn
        return None

    def run(self, fn, x, slots, y_ptrs, y_strides) -> None:
        m = self.modules
        fn(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], slots.data_ptr(), m, *self.args,
           (ctypes.c_int64 * m)(*y_ptrs), (ctypes.c_int64 * m)(*y_strides), self.rank, cpu_native.threads())


def ok(x, lora_as, lora_bs, token_lora, ys, scale) -> bool:
    """Whether this call takes the C path: float32 CPU activations, float32 or bfloat16 weights (the engine's
    lora_dtype), unit scale (the engine folds scales into B), layouts the kernel reads, and slots it takes."""
    if isinstance(scale, torch.Tensor) or scale != 1.0 or not lora_as or x.stride(1) != 1:
        return False
    if any(y.stride(1) != 1 for y in ys) or not cpu_native.usable(x, *ys):
        return False
    w = _Weights(lora_as, lora_bs)
    return w.fn is not None and w.kernel(token_lora) is not None


def lora_apply(x, lora_as, lora_bs, token_lora, ys):
    """As kernels.ref_lora.lora_apply with scale 1; callers check ok() first."""
    ref_lora.check_apply_args(x, lora_as, lora_bs, token_lora, ys)
    w = _Weights(lora_as, lora_bs)
    w.run(w.kernel(token_lora), x, token_lora.to(torch.int32).contiguous(), [y.data_ptr() for y in ys],
          [y.stride(0) for y in ys])
    return ys


class Group:
    """kernels.LoRAGroup's C form: the weights are marshalled once, the step's slots checked once per step, and
    a call passes just x and y's pointers to the kernel (the Python around ~120 calls a decode step cost ~8 ms
    on the 2-core CPU before, ~80 us a call with caches cold after the base GEMMs). The backend asked for is
    also read once per step (per new slot vector). Anything the kernel does not take goes to the general
    group."""

    def __init__(self, weights: _Weights, general):
        self.w, self.general = weights, general
        self.byte_offsets = [4 * c.start for c in general.columns]  # each module's columns in a float32 row
        self.width = max(c.stop for c in general.columns)
        self._tl = self._slots = self._fn = None
        self._columns = (ctypes.c_int64 * weights.modules)(*(c.start for c in general.columns))
        self._c_groups: dict[int, ctypes.Array] = {}

    def _step(self, token_lora) -> None:
        if token_lora is not self._tl:  # a new step (the engine builds a fresh slot vector each step)
            self._tl, self._slots = token_lora, token_lora.to(torch.int32).contiguous()
            ok = token_lora.dim() == 1 and requested_backend() == "auto"
            self._fn = self.w.kernel(token_lora) if ok else None

    def c_group(self, token_lora) -> int:
        """The address of this group's row for the fused decode step (lp_lora_group in cpu_kernels.c: the kernel
        __call__ would run for these slots, then its arguments), or 0 where __call__ would not take the C path.
        The fused step's tensors always fit the kernel (float32 rows of the projections' widths)."""
        self._step(token_lora)
        if self._fn is None:
            return 0
        fn = ctypes.cast(self._fn, ctypes.c_void_p).value
        row = self._c_groups.get(fn)
        if row is None:
            w = self.w
            row = (ctypes.c_int64 * 12)(fn, w.modules, w.in_features, w.rank,
                                        *(ctypes.addressof(a) for a in w.args), ctypes.addressof(self._columns))
            self._c_groups[fn] = row
        return ctypes.addressof(row)

    def __call__(self, x, token_lora, y):
        w = self.w
        self._step(token_lora)
        if not (self._fn is not None and x.dtype is _F32 and y.dtype is _F32 and x.is_cpu and y.is_cpu
                and x.stride(1) == 1 and y.stride(1) == 1 and x.shape[1] == w.in_features
                and x.shape[0] == y.shape[0] == token_lora.shape[0] and y.shape[1] >= self.width):
            return self.general(x, token_lora, y)
        base, row = y.data_ptr(), y.stride(0)
        w.run(self._fn, x, self._slots, [base + off for off in self.byte_offsets], [row] * w.modules)
        return y


def group(lora_as, lora_bs, general):
    """The C form of a LoRAGroup (columns already checked by kernels.lora_group) where its weights suit the C
    kernel and it builds here, else None."""
    if len(lora_as) != len(lora_bs) or not cpu_native.available():
        return None
    w = _Weights(lora_as, lora_bs)
    return Group(w, general) if w.fn is not None else None
