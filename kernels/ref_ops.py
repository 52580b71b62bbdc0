"""Torch references for the decoder's element-wise ops (the production path on GPUs and wherever the C kernels
of kernels/cpu_ops.py do not run): RMSNorm with the residual add, SwiGLU, rotary embedding — as HF computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """(norm(h), h) with h = residual + x (added into residual in place) or h = x when residual is None;
    the norm in float32, as HF's LlamaRMSNorm."""
    h = x if residual is None else residual.add_(x)
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype), h


def silu_and_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2*I] (gate then up) -> silu(gate) * up [T, I]."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D] -> x rotated (a new tensor here; the C version rotates in place)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
