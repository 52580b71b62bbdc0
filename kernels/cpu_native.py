"""Build and load loraplex's C kernels for the CPU (kernels/csrc/cpu_kernels.c), called through ctypes.

Compiled once per machine with the system C compiler (`$CC`, default `cc`; -O3 -march=native -ffast-math
-fopenmp) into $LORAPLEX_HOME/kernels/, keyed by the source, the flags and the CPU, so a data dir shared by
different CPUs never loads code built for another. No compiler or a failed build: `available()` is False, one
warning is logged, and every caller runs its torch reference instead (LORAPLEX_KERNELS=torch forces that too).
Why C and not torch ops: on a 2-core CPU the engine's decode step was dominated by copies (the KV gather) and
per-op overhead of small element-wise ops; the C versions read their inputs once, in one call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK = ["-shared", "-fopenmp"]  # no -ffast-math here: it would link code that sets flush-to-zero process-wide
_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "lp_paged_decode_f32": [_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _I32, _I32, _I32, _I32, _F, _I32],
    "lp_paged_decode_bf16kv": [_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _I32, _I32, _I32, _I32, _F, _I32],
    "lp_add_rms_norm_f32": [_P, _I64, _P, _I64, _P, _P, _I64, _I64, _F, _I32],
    "lp_silu_mul_f32": [_P, _P, _I64, _I64, _I32],
    "lp_rope_f32": [_P, _I64, _P, _P, _I64, _I64, _I64, _I32],
    "lp_lora_apply_f32": [_P, _I64, _I64, _I64, _P, _I32, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I32, _I32],
    "lp_lora_apply_bf16w": [_P, _I64, _I64, _I64, _P, _I32, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I32, _I32],
    "lp_lora_runs_f32": [_P, _I64, _I64, _I64, _P, _I32, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I32, _I32],
    "lp_lora_runs_bf16w": [_P, _I64, _I64, _I64, _P, _I32, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I32, _I32],
    "lp_limits": [_P, _P, _P, _P],
    "lp_linear_bf16": [_P, _I64, _I32, _I64, _P, _I64, _P, _P, _I32],
    "lp_pack_bf16": [_P, _I64, _I64, _P],
    "lp_packed_bf16_len": [_I64, _I64],
    "lp_linear_i8": [_P, _I64, _I32, _I64, _P, _P, _I64, _P, _P, _I32],
    "lp_linear_q4": [_P, _I64, _I32, _I64, _P, _P, _I64, _P, _P, _I32],
    "lp_isa": [],
    "lp_decode_layers": [_P, _I32, _P, _P, _I32, _I64, _I64, _I32, _I32, _I32, _P, _P, _P, _P, _I64, _P, _I32,
                              _I32, _F, _F, _P, _P, _I32],
}
RETURNS = {"lp_isa": ctypes.c_int, "lp_decode_layers": ctypes.c_int, "lp_packed_bf16_len": ctypes.c_int64}
# lp_isa(): the instruction set the library was compiled for (-march=native), as `loraplex prepare` names it
ISA = {2: "AVX512-BF16", 1: "AVX2 FMAs on widened bf16; this CPU lacks AVX512-BF16",
       0: "scalar loops; this CPU lacks AVX2 and AVX512-BF16"}
_lib: ctypes.CDLL | None = None
_path: Path | None = None
_failed: str | None = None
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> tuple[ctypes.CDLL, Path]:
    from loraplex.paths import subdir

    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([cc, *COMPILE, *LINK]).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    cache = os.environ.get("LORAPLEX_KERNEL_CACHE")  # a folder shared by several data dirs (the tests use one)
    out_dir = Path(cache).expanduser() if cache else subdir("kernels")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"cpu_kernels-{key}.so"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            obj, lib = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
            for cmd in ([cc, *COMPILE, str(SOURCE), "-o", obj], [cc, *LINK, obj, "-o", lib, "-lm"]):
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(lib, out)  # atomic: a concurrent build never loads a half-written file
    lib = ctypes.CDLL(str(out))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, RETURNS.get(name)
    return lib, out


def lib() -> ctypes.CDLL | None:
    """The loaded library, built on first call; None where it cannot be built (logged once, then remembered)."""
    global _lib, _path, _failed
    if _lib is None and _failed is None:
        with _lock:
            if _lib is None and _failed is None:
                try:
                    _lib, _path = _build()
                except (OSError, subprocess.SubprocessError, AttributeError) as exc:
                    detail = getattr(exc, "stderr", b"") or b""
                    _failed = f"{exc} {detail.decode(errors='replace')[-500:]}".strip()
                    log.warning("C CPU kernels unavailable, using the torch paths: %s", _failed)
    return _lib


def available() -> bool:
    return lib() is not None


def status() -> str:
    """One line for logs and `loraplex prepare`: where the compiled kernels are, or why torch runs instead."""
    if available():
        return f"C kernels ({_path})"
    return f"torch (C kernels unavailable: {_failed.splitlines()[0][:200]})"


def usable(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors, auto dispatch (not forced to torch), and the library builds here."""
    from kernels.dispatch import requested_backend

    f32 = torch.float32
    return all(t.dtype is f32 and t.is_cpu for t in tensors) and requested_backend() == "auto" and available()


_limits: dict[str, int] | None = None


def limits() -> dict[str, int]:
    """The C kernels' fixed buffer sizes: max_heads, max_dim, max_block (decode attention), max_rank (LoRA)."""
    global _limits
    if _limits is None:
        vals = [ctypes.c_int() for _ in range(4)]
        lib().lp_limits(*[ctypes.byref(v) for v in vals])
        _limits = dict(zip(("max_heads", "max_dim", "max_block", "max_rank"), (v.value for v in vals)))
    return _limits


def threads(rows: int | None = None) -> int:
    """OpenMP threads for a call over `rows` independent rows: one below SERIAL_ROWS (a decode step of one or two
    streams: forking a team costs more than the work, ~10 us a call, 150 calls a step), else torch's count."""
    if rows is not None and rows < SERIAL_ROWS:
        return 1
    return torch.get_num_threads()


SERIAL_ROWS = 4
