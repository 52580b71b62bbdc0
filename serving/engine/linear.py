"""The projections' weight formats on the CPU, each taking and returning float32 activations.

- float32: the dense weight pre-packed once into oneDNN's blocked layout. torch's default CPU GEMM repacks the
  weight on every call; packing once made our projections 1.4-1.8x and the 49k-row LM head 2.5x faster for
  decode batches on a 2-core CPU.
- bfloat16: half the weight bytes per step; our C kernel over a weight packed for it, at every row count
  (AVX512-BF16 dot products, else AVX2 FMAs on the widened weight, else scalar loops); oneDNN's bf16 GEMM
  where the C kernels cannot build (without AVX512-BF16, oneDNN emulates bf16: on the 2-core AVX2 VM 1.4x slower
  than our AVX2 tiles for one row, 6x for 32).
- int8 (per output channel, symmetric) and int4 (groups of 32 along the input, asymmetric, as GGUF's Q4_1):
  weight-only quantized at load. Both run our C kernels (each weight row widened to bf16 once per step, in
  cache, then AVX512-BF16 dot products with every activation row; on AVX2, widened to float32 for FMAs); where
  the C library cannot build, int8 and int4 run torch's fused dequantize-and-multiply CPU ops (the ones torchao
  uses). Activations meet them in bfloat16. Quantizing at load keeps one loader for every checkpoint
  (safetensors or our converted GGUF).

Why activations stay float32 around bf16/quantized weights: the residual stream, norms, RoPE, softmax and the
KV-cache writes run in our float32 C kernels (kernels/csrc), and a [tokens, hidden] cast per projection costs
microseconds against the weight bytes it saves.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.engine.errors import ModelLoadError

INT4_GROUP = 32


def bf16_native() -> bool:
    """The CPU has AVX512-BF16 (or AMX): oneDNN's bfloat16 GEMMs run in hardware, not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_fast() -> bool:
    """bf16 weights run at hardware speed here: oneDNN has AVX512-BF16, or our C kernels build (AVX2 + FMA at
    least; scalar loops do not count)."""
    from kernels import cpu_native

    return bf16_native() or (cpu_native.usable() and cpu_native.lib().lp_isa() >= 1)


def cpu_path(dtype: torch.dtype, quantization: str | None) -> str:
    """One line for `loraplex prepare` and the log: which weight path runs on this CPU."""
    from kernels import cpu_native

    c = cpu_native.usable()  # what BF16Linear, Int8Linear and Int4Linear check
    isa = cpu_native.ISA[cpu_native.lib().lp_isa()] if c else ""
    onednn = "AVX512-BF16" if bf16_native() else "bf16 emulated (this CPU lacks AVX512-BF16)"
    if quantization in ("int8", "int4") and c:
        return f"{quantization} weights (C kernel: rows widened once per step, {isa})"
    if quantization:
        return f"{quantization} weights (torch fused dequant-matmul, {onednn} activations)"
    if dtype == torch.bfloat16:
        kernel = f"C kernel, packed weights, {isa}" if c else f"oneDNN, {onednn}"
        return f"bf16 weights and KV cache, float32 activations ({kernel})"
    return "float32 weights (oneDNN pre-packed)"


class PackedLinear(nn.Module):
    """A dense float32 projection packed for oneDNN; the dense weight is dropped after packing, so memory does
    not double."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), 32)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        """Weight bytes one forward reads."""
        return self.packed.numel() * self.packed.element_size()

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


class BF16Linear(nn.Module):
    """A dense bfloat16 projection. Where our C kernels build (and K % 32 == 0), the weight is packed once for
    lp_linear_bf16 (groups of 32 outputs with each pair of inputs side by side: no horizontal sums, 64-byte loads)
    and only that copy is kept; every row count runs it, decode steps and prefill alike. SmolLM2's 30 layers on
    the 2-core VM: 1 row 3.9 ms, 32 rows 10.4 ms (the row-layout C tiles before it: 4.5 and 17.0), 64 rows 6.4 ms
    for 10 layers against oneDNN's 13.8, 512 rows 49.9 vs 51.7. Elsewhere the dense weight runs oneDNN's bf16
    GEMM. GEMV_ROWS: the most rows the fused decode step (and a prefill run as decode rows) takes."""

    GEMV_ROWS = 64
    C_KIND = 0  # lp_proj's kind in the fused step's layer table (serving.engine.fused_decode)
    c_scales = None  # the C kernel's scales operand (none for bf16)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        from kernels import cpu_native

        self._lib = cpu_native.lib() if self.in_features % 32 == 0 and cpu_native.usable() else None
        dense = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        if self._lib is not None:
            packed = torch.empty(self._lib.lp_packed_bf16_len(*dense.shape), dtype=torch.bfloat16)
            self._lib.lp_pack_bf16(dense.data_ptr(), *dense.shape, packed.data_ptr())
            self.register_buffer("packed", packed)
        else:
            self.register_buffer("weight", dense)
            self.bias_bf16 = None if bias is None else self.bias.detach().to(torch.bfloat16)  # oneDNN's operand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lib is None:
            return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias_bf16).float()
        from kernels import cpu_native

        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or x2.stride(1) != 1:
            x2 = x2.float().contiguous()
        y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        self._lib.lp_linear_bf16(x2.data_ptr(), x2.stride(0), x2.shape[0], self.in_features, self.packed.data_ptr(),
                                 self.out_features, None if self.bias is None else self.bias.data_ptr(),
                                 y.data_ptr(), cpu_native.threads())
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return (self.packed if self._lib is not None else self.weight).numel() * 2

    @property
    def c_weight(self) -> torch.Tensor:
        return self.packed


class _QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the packed `qweight` is their C kernels' weight operand (each format
    names its `c_scales`), and those kernels (lp_linear_i8, lp_linear_q4) share a signature."""

    @property
    def c_weight(self) -> torch.Tensor:
        return self.qweight

    def _c_forward(self, fn, x: torch.Tensor) -> torch.Tensor:
        from kernels import cpu_native

        y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        fn(x.data_ptr(), x.stride(0), x.shape[0], self.in_features, self.c_weight.data_ptr(),
           self.c_scales.data_ptr(), self.out_features, None if self.bias is None else self.bias.data_ptr(),
           y.data_ptr(), cpu_native.threads())
        return y


class Int8Linear(_QuantizedLinear):
    """Weight-only int8: w ~ q * scale[out], q in [-127, 127]. Our C kernel (lp_linear_i8: int8 rows widened to
    bf16 once per step, AVX512-BF16 dot products) for every row count; torch's fused op where it cannot run."""

    C_KIND = 1

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.scales_f32 = self.scales.float()  # the C kernel's operand (the bf16-rounded scales torch's op uses)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        from kernels import cpu_native

        self._lib = cpu_native.lib() if self.in_features % 32 == 0 and cpu_native.usable() else None

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2

    @property
    def c_scales(self) -> torch.Tensor:
        return self.scales_f32

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lib is not None and x.dim() == 2 and x.stride(1) == 1 and x.dtype == torch.float32:
            return self._c_forward(self._lib.lp_linear_i8, x)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales).float()
        return y if self.bias is None else y + self.bias


class Int4Linear(_QuantizedLinear):
    """Weight-only 4-bit in groups of INT4_GROUP inputs: w ~ q * scale + min, q in [0, 15] (GGUF Q4_1's form).
    Our C kernel (lp_linear_q4: a group's 16 bytes widened to bf16 once per step, in cache, then the bf16 tiles)
    where it can run: torch's `_weight_int4pack_mm_for_cpu` ran one stream at 49-51 tok/s, a fifth of the 84 MB
    step's bandwidth bound. Elsewhere torch's op, which takes (scale, zero) with w = (q - 8) * scale + zero, so
    zero = min + 8 * scale."""

    C_KIND = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        n, k = w.shape
        if k % INT4_GROUP:
            raise ModelLoadError(f"quantization int4 needs every projection's input size divisible by "
                                 f"{INT4_GROUP}, got {k}")
        self.out_features, self.in_features = n, k
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32)
        from kernels import cpu_native

        self._lib = cpu_native.lib() if cpu_native.usable() else None
        if self._lib is not None:  # a group's byte i: q[i] | q[i + 16] << 4 (GGUF's nibble order)
            half = INT4_GROUP // 2
            self.register_buffer("qweight", (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8).reshape(n, k // 2))
            self.register_buffer("scales_mins", torch.cat([scale, lo], -1).contiguous())  # [n, groups, 2] float32
        else:
            self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1))
            zero = lo + 8 * scale
            self.register_buffer("scales_zeros", torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], -1)
                                 .to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @property
    def nbytes(self) -> int:
        extra = self.scales_mins.numel() * 4 if self._lib is not None else self.scales_zeros.numel() * 2
        return self.qweight.numel() * self.qweight.element_size() + extra

    @property
    def c_scales(self) -> torch.Tensor:
        return self.scales_mins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lib is not None:
            return self._c_forward(self._lib.lp_linear_q4, x.float().contiguous())
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.qweight, INT4_GROUP,
                                              self.scales_zeros).float()
        return y if self.bias is None else y + self.bias


def cpu_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
               quantization: str | None) -> nn.Module:
    """The CPU projection for this weight format (see the module docstring)."""
    if quantization == "int8":
        return Int8Linear(weight, bias)
    if quantization == "int4":
        return Int4Linear(weight, bias)
    if dtype == torch.bfloat16:
        return BF16Linear(weight, bias)
    return PackedLinear(weight, bias)
