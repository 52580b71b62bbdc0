"""Large host buffers on 2 MB pages where Linux allows it (madvise MADV_HUGEPAGE before the first touch).

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
