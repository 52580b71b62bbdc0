"""Launch settings shared by the Triton kernels (no kernels here, so the interpreter needs no special care)."""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use full-precision dots (TF32 would miss the 1e-4 tolerance); fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def needs_int64(*tensors: torch.Tensor) -> bool:
    """64-bit offsets only for tensors past 2**31 elements: int32 offset tiles take far fewer registers."""
    return any(t.numel() >= 2**31 - 1 for t in tensors)
