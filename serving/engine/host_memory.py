"""Host memory: large buffers on 2 MB pages where Linux allows it (madvise MADV_HUGEPAGE before the first touch),
and glibc told to keep the memory a step frees (keep_freed_memory).

The multi-LoRA slot buffers are read in scattered tens-of-KB pieces every decode step; with 4 KB pages each
piece costs TLB misses and restarts the hardware prefetcher at every page. Huge pages made the CPU LoRA kernel
~10% faster in benchmarks/multi_lora.py. Elsewhere (CUDA, macOS, THP "never", small buffers) it is torch.zeros.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_kept = False


def keep_freed_memory() -> bool:
    """Have glibc reuse the memory a step frees instead of returning it to the OS: blocks up to 32 MB come from the
    heap (not a fresh mmap each), the heap's free top is never trimmed, and every thread allocates from that one
    heap (a thread's own arena gives freed pages back to the OS as it shrinks; the engine steps on its own
    thread). A step allocates and frees the same activation tensors every time (a 1024-token prefill's gate_up
    output is 12 MB); by default each came back as new pages, and first-touch page faults are dear in a VM:
    converting that bf16 output to float32 took 3-24 ms instead of 0.2-0.6, a third of a prefill step's time. The cost is that RSS stays at its peak.
    Once per process; False where the C library is not glibc."""
    global _kept
    if _kept or not sys.platform.startswith("linux"):
        return _kept
    try:
        libc = ctypes.CDLL(None)
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _kept = ok
    return ok


def _madvise_hugepage(ptr: int, nbytes: int) -> bool:
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes - nbytes % HUGE_PAGE), advice) == 0
    except (OSError, AttributeError):
        return False


def zeros(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed 1-D tensor of numel elements; on Linux CPUs 2 MB-aligned and advised onto huge pages."""
    device = torch.device(device)
    item = dtype.itemsize
    if device.type != "cpu" or not sys.platform.startswith("linux") or numel * item < HUGE_PAGE:
        return torch.zeros(numel, dtype=dtype, device=device)
    raw = torch.empty(numel + HUGE_PAGE // item, dtype=dtype)  # not touched yet: the advice applies to its pages
    start = (-raw.data_ptr() % HUGE_PAGE) // item
    buf = raw[start:start + numel]
    _madvise_hugepage(buf.data_ptr(), numel * item)  # best effort: without it the pages are 4 KB
    return buf.zero_()
