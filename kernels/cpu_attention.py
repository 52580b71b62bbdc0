"""Paged decode attention in C for float32 on the CPU (kernels/csrc/paged_decode.c), reading KV blocks in place.

The torch path (kernels.ref_attention) gathers each sequence's blocks into a padded copy before SDPA; on a
2-core CPU that copy was most of attention's time. The C file is compiled once per machine with the system C
compiler (`$CC`, default `cc`; -O3 -march=native -ffast-math -fopenmp) into $LORAPLEX_HOME/kernels/, keyed by the source,
the flags and the CPU, and called through ctypes. No compiler, a failed build, or a non-float32 batch: the
torch path runs instead (`available()` says which; LORAPLEX_KERNELS=torch forces the torch path).
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
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK = ["-shared", "-fopenmp"]  # no -ffast-math here: it would link code that sets flush-to-zero process-wide
_lib: ctypes.CDLL | None = None
_path: Path | None = None
_failed: str | None = None
_lock = threading.Lock()
_limits: tuple[int, int, int] = (0, 0, 0)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL:
    from loraplex.paths import subdir

    cc = os.environ.get("CC", "cc")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join([cc, *COMPILE, *LINK]).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = subdir("kernels") / f"paged_decode-{key}.so"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            obj, lib = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
            for cmd in ([cc, *COMPILE, str(SOURCE), "-o", obj], [cc, *LINK, obj, "-o", lib, "-lm"]):
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(lib, out)  # atomic: a concurrent build never loads a half-written file
    global _path
    lib, _path = ctypes.CDLL(str(out)), out
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lp_paged_decode_f32.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i32, i32, i32, i32, i32,
                                        ctypes.c_float, i32]
    lib.lp_paged_decode_f32.restype = None
    lib.lp_limits.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernel loads here (built on first call; a failure is logged once, then remembered)."""
    global _lib, _failed, _limits
    if _lib is not None or _failed is not None:
        return _lib is not None
    with _lock:
        if _lib is None and _failed is None:
            try:
                lib = _build()
                vals = [ctypes.c_int() for _ in range(3)]
                lib.lp_limits(*[ctypes.byref(v) for v in vals])
                _limits = tuple(v.value for v in vals)
                _lib = lib
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                _failed = f"{exc} {detail.decode(errors='replace')[-500:]}".strip()
                log.warning("C decode-attention kernel unavailable, using the torch path: %s", _failed)
    return _lib is not None


def status() -> str:
    """One line for logs and `loraplex prepare`: where the compiled kernel is, or why the torch path runs."""
    if available():
        return f"C decode attention ({_path})"
    return f"torch decode attention (C kernel unavailable: {_failed.splitlines()[0][:200]})"


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """float32 CPU tensors in the shared layouts, within the kernel's fixed buffer sizes."""
    if not (q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32):
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1 and q.stride(1) == q.shape[2]):
        return False
    if not available():
        return False
    max_heads, max_dim, max_block = _limits
    hq, hkv, d, bs = q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1]
    return hq % hkv == 0 and hq <= max_heads and d <= max_dim and bs <= max_block


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """As kernels.ref_attention.paged_decode_attention; callers check supports() first."""
    s, hq, d = q.shape
    out = torch.empty((s, hq, d), dtype=q.dtype)
    if s == 0:
        return out
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    _lib.lp_paged_decode_f32(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                             tables.stride(0), lens.data_ptr(), out.data_ptr(), s, hq, k_cache.shape[2], d,
                             k_cache.shape[1], float(scale), torch.get_num_threads())
    return out
