"""Test support: which (device, dtype) cases to run, tolerances, and loading the Triton kernel modules so they
run on the CPU interpreter when there is no GPU (compiled on CUDA otherwise)."""

from __future__ import annotations

import importlib
import os
import sys

import torch

TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1.5e-2, 1e-2), torch.bfloat16: (3e-2, 2e-2)}
LORA_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (6e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}


def cases() -> list[tuple[str, torch.dtype]]:
    """CPU interpreter in fp32/fp16 without a GPU (it has no bf16); CUDA in fp32/fp16/bf16 with one."""
    if torch.cuda.is_available():
        return [("cuda", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    return [("cpu", torch.float32), ("cpu", torch.float16)]


def case_id(case) -> str:
    return f"{case[0]}-{str(case[1]).removeprefix('torch.')}"


def _interpret_triton_language() -> None:
    """Triton 3.x picks the interpreter when @triton.jit decorates. If triton was imported earlier without
    TRITON_INTERPRET (peft and torch._dynamo import it), triton.language's own jit helpers (tl.zeros, tl.topk,
    ...) are compiled-mode objects the interpreter cannot call; re-wrap them as interpreted functions. Only
    done without CUDA, where compiled kernels could never run in this process anyway."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                if id(value) not in swapped:
                    swapped[id(value)] = InterpretedFunction(value.fn, noinline=value.noinline)
                setattr(module, attr, swapped[id(value)])


def triton_module(kind: str):
    """kernels.triton_<kind>, built for the interpreter when there is no GPU (re-imported if needed)."""
    if torch.cuda.is_available():
        return importlib.import_module(f"kernels.triton_{kind}")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl

    if not isinstance(tl.zeros, InterpretedFunction):
        _interpret_triton_language()
    module = importlib.import_module(f"kernels.triton_{kind}")
    kernels = [v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel")]
    if not all(isinstance(k, InterpretedFunction) for k in kernels):
        module = importlib.reload(module)
    return module


def compile_for_gpu(kernel, types: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                    num_stages: int = 2) -> dict:
    """Compile a compiled-mode @triton.jit kernel (a process without TRITON_INTERPRET) for an NVIDIA GPU without one (the ptxas bundled with triton) and return its
    resource use {"registers", "stack"}; catches GPU-only compile errors and register spills on a CPU machine.
    types: pointer/float arguments ("*bf16", "*i32", "fp32"); other arguments default to i32."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel
    names = jit.arg_names
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    src = ASTSource(jit, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(part.split(":", 1) for line in out.splitlines() if "REG:" in line for part in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"])}


def gpu_compile_report(arch: int = 90) -> dict:
    """Resource use of every Triton kernel at its production settings (bf16, head_dim 64 and 128), compiled for
    sm_<arch>. Run it in a process without TRITON_INTERPRET (see tests/test_kernels_compile.py)."""
    from kernels import triton_attention as A, triton_lora as L, triton_topk as T

    report = {}
    attn = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    dec = dict(attn, bt_ptr="*i32", lens_ptr="*i32", po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", qk_scale="fp32")
    for d, bn in ((64, 64), (128, 32)):
        for split in (False, True):
            report[f"decode-d{d}-split{int(split)}"] = compile_for_gpu(A._decode_kernel, dec, dict(
                BLOCK_SIZE=16, GROUP=4, BLOCK_G=16, HEAD_DIM=d, BLOCK_D=d, BLOCK_N=bn, PARTITION=512, SPLIT=split,
                OFF64=False, DOT_PREC="tf32"), arch)
    report["decode-reduce"] = compile_for_gpu(A._decode_reduce_kernel, dict(
        po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", lens_ptr="*i32", out_ptr="*bf16"),
        dict(HEAD_DIM=128, BLOCK_D=128, PARTITION=512, BLOCK_S=8), arch)
    pre = dict(attn, cu_q_ptr="*i32", cu_k_ptr="*i32", lens_ptr="*i32", bt_ptr="*i32", qk_scale="fp32")
    for paged in (False, True):
        for d in (64, 128):
            report[f"prefill-paged{int(paged)}-d{d}"] = compile_for_gpu(A._prefill_kernel, pre, dict(
                PAGED=paged, CAUSAL=True, BLOCK_SIZE=16, GROUP=4, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, BLOCK_N=64,
                OFF64=False, DOT_PREC="tf32"), arch, num_warps=4 if d <= 64 else 8)
    seg = dict(order_ptr="*i32", starts_ptr="*i32", counts_ptr="*i32")
    report["lora-shrink"] = compile_for_gpu(L._shrink_kernel, dict(seg, x_ptr="*bf16", a_ptr="*bf16", t_ptr="*bf16",
                                            scale_ptr="*fp32"), dict(BLOCK_M=32, BLOCK_R=32, BLOCK_K=128,
                                                                     OFF64=False, DOT_PREC="tf32"), arch)
    report["lora-expand"] = compile_for_gpu(L._expand_kernel, dict(seg, t_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16"),
                                            dict(BLOCK_M=32, BLOCK_N=128, BLOCK_R=32, OFF64=False, DOT_PREC="tf32"), arch)
    for m, r in ((16, 16), (32, 16), (32, 64), (32, 128)):
        settings = L.group_settings(m, r, on_gpu=True)
        warps = settings.pop("num_warps")
        report[f"lora-group-m{m}-r{r}"] = compile_for_gpu(L._group_kernel, dict(
            seg, x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", chunk_ptr="*i64", stride_ws="i64"),
            dict(settings, OFF64=False, DOT_PREC="tf32"), arch, num_warps=warps)
    topk = dict(q_ptr="*bf16", k_ptr="*bf16", qinv_ptr="*fp32", kinv_ptr="*fp32", out_ptr="*fp32")
    for cfg in T._GPU_CONFIGS:
        bd, w, st = cfg.kwargs["BLOCK_D"], cfg.num_warps, cfg.num_stages
        report[f"topk-scores-d{bd}-w{w}-s{st}"] = compile_for_gpu(T._scores_kernel, topk, dict(
            COSINE=True, TILE_MAX=True, BLOCK_M=64, BLOCK_N=128, BLOCK_D=bd, OFF64=False, DOT_PREC="tf32"), arch,
            num_warps=w, num_stages=st)
    report["topk-rescore"] = compile_for_gpu(T._rescore_kernel, dict(q_ptr="*bf16", k_ptr="*bf16", qinv_ptr="*fp32",
                                             kinv_ptr="*fp32", tiles_ptr="*i32", out_s_ptr="*fp32",
                                             out_i_ptr="*i32"),
                                             dict(COSINE=True, BLOCK_N=128, BLOCK_D=32, OFF64=False), arch)
    return report
