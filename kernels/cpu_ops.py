"""C versions of kernels/ref_ops.py for float32 on the CPU (kernels/csrc/cpu_kernels.c): each is one call that
reads its input once, where torch runs 3-6 small ops; `ok_*` says whether a call can take the C path."""

from __future__ import annotations

import torch

from kernels import cpu_native


def _rows(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1


def ok_rms_norm(x, weight, residual) -> bool:
    same = residual is None or (_rows(residual) and residual.shape == x.shape)
    return _rows(x) and weight.is_contiguous() and same \
        and cpu_native.usable(x, weight, *([] if residual is None else [residual]))


def rms_norm(x, weight, eps, residual=None):
    h = x if residual is None else residual
    out = torch.empty(x.shape, dtype=x.dtype)
    delta, delta_stride = (None, 0) if residual is None else (x.data_ptr(), x.stride(0))
    cpu_native.lib().lp_add_rms_norm_f32(h.data_ptr(), h.stride(0), delta, delta_stride, weight.data_ptr(),
                                         out.data_ptr(), x.shape[0], x.shape[1], float(eps),
                                         cpu_native.threads(x.shape[0]))
    return out, h


def ok_silu_and_mul(gu) -> bool:
    return gu.dim() == 2 and gu.is_contiguous() and gu.shape[1] % 2 == 0 and cpu_native.usable(gu)


def silu_and_mul(gu):
    t, i = gu.shape[0], gu.shape[1] // 2
    out = torch.empty((t, i), dtype=gu.dtype)
    cpu_native.lib().lp_silu_mul_f32(gu.data_ptr(), out.data_ptr(), t, i, cpu_native.threads(t))
    return out


def ok_rotary(x, cos, sin) -> bool:
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.shape[2] % 2 == 0 \
        and cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (x.shape[0], x.shape[2]) \
        and cpu_native.usable(x, cos, sin)


def rotary(x, cos, sin):
    cpu_native.lib().lp_rope_f32(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), x.shape[0], x.shape[1],
                                 x.shape[2], cpu_native.threads(x.shape[0]))
    return x
