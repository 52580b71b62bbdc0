"""Huge-page host buffers (serving/engine/host_memory.py), which hold the multi-LoRA slot buffers on the CPU."""

import sys
from pathlib import Path

import pytest
import torch

from serving.engine import host_memory


def _thp_mode() -> str | None:
    f = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not f.exists():
        return None
    return f.read_text().split("[")[1].split("]")[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_buffers_are_zeroed_and_aligned_to_huge_pages(dtype):
    n = 3 * host_memory.HUGE_PAGE  # elements, so 6-12 MB
    buf = host_memory.zeros(n, dtype)
    assert buf.shape == (n,) and buf.dtype == dtype and not buf.any()
    if sys.platform.startswith("linux"):
        assert buf.data_ptr() % host_memory.HUGE_PAGE == 0
    buf[-1] = 1  # the whole range is ours
    assert buf.sum() == 1


def test_small_buffers_are_plain_zeros():
    buf = host_memory.zeros(1000, torch.float32)
    assert buf.shape == (1000,) and not buf.any()


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_the_advice_is_accepted_where_the_kernel_offers_huge_pages():
    raw = torch.empty(2 * host_memory.HUGE_PAGE)
    start = (-raw.data_ptr() % host_memory.HUGE_PAGE) // 4
    assert host_memory._madvise_hugepage(raw[start:].data_ptr(), host_memory.HUGE_PAGE)


_MALLINFO_PROBE = r"""
import ctypes, sys
import torch
from serving.engine import host_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory() and host_memory.keep_freed_memory()  # once, then a no-op
before = libc.mallinfo2().hblkhd
t = torch.empty(5 << 20)  # 20 MB, the process's first large block
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["default", "keep"])
def test_keep_freed_memory_serves_activation_sized_blocks_from_the_heap(mode):
    """By default glibc maps a fresh 20 MB block for a tensor of that size (and unmaps it when freed, so the next
    step faults its pages in again); after keep_freed_memory() it comes from the reusable heap."""
    import ctypes
    import subprocess

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2 to read the mapping from")
    out = subprocess.run([sys.executable, "-c", _MALLINFO_PROBE, mode], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent, check=True).stdout
    mapped = int(out.split()[-1])
    assert (mapped >= 20 << 20) if mode == "default" else mapped == 0


def test_the_cpu_engine_keeps_freed_memory(tiny_model_factory):
    from serving.engine import EngineConfig
    from serving.engine.llm_engine import LLMEngine

    LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=16, block_size=8))
    assert host_memory._kept == sys.platform.startswith("linux")
