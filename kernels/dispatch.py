"""Kernel dispatch: Triton on CUDA, C on float32 CPU tensors where it builds, the torch references elsewhere.

Backend choice, highest priority first: `set_backend(name)` (the engine's `kernels` config; "auto" defers), then
the `LORAPLEX_KERNELS` environment variable (auto|torch|triton), then auto. Auto picks Triton when the tensors
are on CUDA and triton imports, torch otherwise — except that on float32 CPU tensors auto runs the C kernels
(decode attention, RMSNorm, SwiGLU, rotary, multi-LoRA; kernels.cpu_native) where they
build; "torch" forces torch. Forcing triton on CPU tensors needs TRITON_INTERPRET=1 (set
before the first Triton kernel module is imported).
"""

from __future__ import annotations

import importlib
import os

import torch

from kernels import ref_ops

BACKENDS = ("auto", "torch", "triton")
_configured: str = "auto"
_triton_ok: bool | None = None


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here (triton missing, or CPU tensors without the interpreter)."""


def _check(name: str, source: str) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the backend from configuration; "auto" (or None) leaves the choice to LORAPLEX_KERNELS / auto."""
    global _configured
    _configured = _check(name or "auto", "kernels backend")


def requested_backend() -> str:
    """The backend asked for, before looking at devices: the configured one, else LORAPLEX_KERNELS, else auto."""
    if _configured != "auto":
        return _configured
    return _check(os.environ.get("LORAPLEX_KERNELS", "auto"), "LORAPLEX_KERNELS")


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception:  # ImportError, or a broken install raising at import time
            _triton_ok = False
    return _triton_ok


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_for(device: torch.device) -> str:
    """'torch' or 'triton' for tensors on `device`, raising KernelBackendError where a forced triton cannot run."""
    want = requested_backend()
    if want == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if want == "auto":
        return "triton" if on_cuda and triton_available() and not interpreting() else "torch"
    if not triton_available():
        raise KernelBackendError("kernels backend 'triton' requested but triton is not installed "
                                 "(pip install triton, or use LORAPLEX_KERNELS=torch)")
    if not on_cuda and not interpreting():
        raise KernelBackendError(f"kernels backend 'triton' needs CUDA tensors, got {device.type}; set "
                                 "TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter, or use "
                                 "LORAPLEX_KERNELS=torch")
    return "triton"


def prepare(device: torch.device, dtype: torch.dtype) -> str:
    """Build now what auto will use for tensors of this device and dtype (the C kernels compile once per
    machine, ~3 s), so the first request does not wait for it; returns a line saying which kernels run."""
    backend = backend_for(device)
    # bfloat16 and quantized CPU models keep float32 activations, so they run the C kernels too (engine.linear)
    if backend == "torch" and requested_backend() == "auto" and device.type == "cpu" \
            and dtype in (torch.float32, torch.bfloat16):
        from kernels import cpu_native

        return cpu_native.status()
    return f"{backend} kernels"


def _impl(kind: str, device: torch.device):
    """The module implementing `kind` (attention, lora, topk) for `device`; imported on first use."""
    prefix = "triton" if backend_for(device) == "triton" else "ref"
    return importlib.import_module(f"kernels.{prefix}_{kind}")


def _hint(**hints):
    """Host-side maxima the caller already knows (saves Triton a device sync); the references ignore them."""
    return {k: v for k, v in hints.items() if v is not None}


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=None):
    """q [S, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [S, max_blocks]; seq_lens [S]."""
    impl = _impl("attention", q.device)
    if impl.__name__ == "kernels.ref_attention":  # supports() also checks that auto (not torch) was asked for
        from kernels import cpu_attention

        if cpu_attention.supports(q, k_cache, v_cache, block_tables, seq_lens):
            impl = cpu_attention
    extra = _hint(max_seq_len=max_seq_len) if impl.__name__ == "kernels.triton_attention" else {}
    return impl.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, **extra)


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal=True, max_seqlen_q=None):
    """Packed varlen attention: q [total_q, Hq, D], k/v [total_k, Hkv, D]; causal queries are the last positions."""
    impl = _impl("attention", q.device)
    extra = _hint(max_seqlen_q=max_seqlen_q) if impl.__name__ == "kernels.triton_attention" else {}
    return impl.prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, **extra)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_seqlen_q=None):
    """Chunked prefill / prefix hits: queries are each sequence's last positions, their KV already cached."""
    impl = _impl("attention", q.device)
    extra = _hint(max_seqlen_q=max_seqlen_q) if impl.__name__ == "kernels.triton_attention" else {}
    return impl.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, **extra)


def rms_norm(x, weight, eps, residual=None):
    """(RMSNorm(h) * weight, h) with h = residual + x, added into `residual` in place (h = x without one)."""
    from kernels import cpu_ops

    impl = cpu_ops if cpu_ops.ok_rms_norm(x, weight, residual) else ref_ops
    return impl.rms_norm(x, weight, eps, residual)


def silu_and_mul(gu):
    """gu [T, 2*I] (gate then up) -> silu(gate) * up [T, I]."""
    from kernels import cpu_ops

    return (cpu_ops if cpu_ops.ok_silu_and_mul(gu) else ref_ops).silu_and_mul(gu)


def rotary(x, cos, sin):
    """Rotary embedding (HF's rotate-half form) of x [T, heads, D] with cos/sin [T, D]; may rotate x in place."""
    from kernels import cpu_ops

    return (cpu_ops if cpu_ops.ok_rotary(x, cos, sin) else ref_ops).rotary(x, cos, sin)


def lora_shrink(x, lora_a, token_lora, scale=1.0):
    """t[i] = scale[slot] * lora_a[slot] @ x[i] with slot = token_lora[i]; rows with slot -1 get zeros."""
    return _impl("lora", x.device).lora_shrink(x, lora_a, token_lora, scale)


def lora_expand(t, lora_b, token_lora, y):
    """y[i] += lora_b[slot] @ t[i] in place (rows with slot -1 untouched); returns y."""
    return _impl("lora", t.device).lora_expand(t, lora_b, token_lora, y)


def lora_apply(x, lora_as, lora_bs, token_lora, ys, scale=1.0):
    """ys[i] += scale[slot] * lora_bs[i][slot] @ lora_as[i][slot] @ x[t] for every token t with a slot: shrink and
    expand for several modules that read the same input (q/k/v), in one call; returns ys."""
    impl = _impl("lora", x.device)
    if impl.__name__ == "kernels.ref_lora":  # ok() also checks that auto (not torch) was asked for
        from kernels import cpu_lora

        if cpu_lora.ok(x, lora_as, lora_bs, token_lora, ys, scale):
            return cpu_lora.lora_apply(x, lora_as, lora_bs, token_lora, ys)
    return impl.lora_apply(x, lora_as, lora_bs, token_lora, ys, scale)


class LoRAGroup:
    """LoRA modules that read one input (q/k/v, gate/up), bound once: g(x, token_lora, y) adds each module's
    delta into its columns of the fused projection output y, as lora_apply(x, lora_as, lora_bs, token_lora,
    [y[:, c] for c in columns]) would. Make them with lora_group; the engine keeps one per layer and module group
    across steps (the views stay valid while slots are refilled in place)."""

    def __init__(self, lora_as, lora_bs, columns):
        self.lora_as, self.lora_bs, self.columns = list(lora_as), list(lora_bs), list(columns)

    def __call__(self, x, token_lora, y):
        lora_apply(x, self.lora_as, self.lora_bs, token_lora, [y[:, c] for c in self.columns])
        return y


def lora_group(lora_as, lora_bs, columns: list[slice]):
    """A LoRAGroup; where Triton runs, its one-launch form (kernels.triton_lora.Group), else on the CPU its C form
    (kernels.cpu_lora.Group); both send what they do not take to lora_apply. Groups are for repeated calls with
    the same weight views: binding checks and marshals them once."""
    general = LoRAGroup(lora_as, lora_bs, columns)
    if not lora_as or not _plain_columns(lora_bs, general.columns):
        return general  # the general path (or its errors)
    if backend_for(lora_as[0].device) == "triton":
        return _impl("lora", lora_as[0].device).group(lora_as, lora_bs, general) or general
    if lora_as[0].is_cpu:
        from kernels import cpu_lora

        return cpu_lora.group(lora_as, lora_bs, general) or general
    return general


def _plain_columns(lora_bs, columns) -> bool:
    """One plain range of y's columns per module, as wide as its B's outputs: what the bound C and Triton forms
    write into (they take y's row pointer and each module's first column)."""
    return len(columns) == len(lora_bs) and all(
        isinstance(c, slice) and isinstance(c.start, int) and c.step in (None, 1) and b.dim() == 3
        and c.stop - c.start == b.shape[1] for c, b in zip(columns, lora_bs))


def topk_scores(queries, keys, k, metric="ip"):
    """(scores [q, k], ids [q, k] int64), best first; metric "ip" (inner product) or "cosine"; k clamps to n."""
    return _impl("topk", queries.device).topk_scores(queries, keys, k, metric)
