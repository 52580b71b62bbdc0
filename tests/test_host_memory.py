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
