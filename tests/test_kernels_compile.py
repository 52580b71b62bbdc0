"""The Triton kernels compile for an H100 (sm_90) with the ptxas bundled in triton, without a GPU, and stay
free of register spills at their production settings (a spill costs the decode kernel its bandwidth)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")  # triton for Linux x86_64 ships ptxas in this backend


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled mode, in a fresh process
    code = "import json; from kernels.testing import gpu_compile_report; print(json.dumps(gpu_compile_report(90)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report) == 4 + 1 + 4 + 2 + 4 + 6 + 1
    spilled = {name: r for name, r in report.items() if r["stack"] > 0}
    assert not spilled, f"register spills: {spilled}"
    # Decode is bandwidth-bound: at most 168 registers leaves room for 3 programs (12 warps) per SM (triton 3.9
    # gives 128, so 4; the device's triton 3.6 gave 155).
    assert report["decode-d128-split0"]["registers"] <= 168
