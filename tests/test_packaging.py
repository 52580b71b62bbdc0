"""Packaging contracts that are easy to break by accident."""

import importlib.util
import subprocess
import sys


def test_top_level_kernels_package_is_not_mistaken_for_hf_kernels():
    # Our top-level `kernels` package is ours; transformers must not treat it as Hugging Face's `kernels` hub
    # package (it would try to fetch hub kernels through it).
    assert importlib.util.find_spec("kernels") is not None
    code = "from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "loraplex.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: loraplex" in out.stdout
