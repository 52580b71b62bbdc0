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
