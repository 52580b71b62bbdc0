"""Kernel dispatch: backend choice from config and LORAPLEX_KERNELS, clear errors, and that each public function
reaches the implementation it should."""

import subprocess
import sys

import pytest
import torch

import kernels
from kernels import dispatch, ref_attention, ref_lora
from kernels.testing import cases, triton_module


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    monkeypatch.delenv("LORAPLEX_KERNELS", raising=False)
    yield
    dispatch.set_backend("auto")


def test_import_is_cheap_and_works_without_triton():
    code = ("import sys, torch, kernels\n"
            "assert 'triton' not in sys.modules\n"
            "q = torch.randn(2, 8)\n"
            "s, i = kernels.topk_scores(q, torch.randn(5, 8), 2)\n"
            "assert 'triton' not in sys.modules and i.shape == (2, 2)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_auto_picks_torch_on_cpu():
    assert kernels.requested_backend() == "auto"
    assert kernels.backend_for(torch.device("cpu")) == "torch"


def test_config_wins_over_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    assert kernels.requested_backend() == "triton"
    kernels.set_backend("torch")
    assert kernels.requested_backend() == "torch"
    kernels.set_backend("auto")  # "auto" in the config defers to the environment
    assert kernels.requested_backend() == "triton"


def test_bad_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="kernels backend"):
        kernels.set_backend("cuda")
    monkeypatch.setenv("LORAPLEX_KERNELS", "fast")
    with pytest.raises(ValueError, match="LORAPLEX_KERNELS"):
        kernels.requested_backend()


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kernels.KernelBackendError, match="TRITON_INTERPRET=1"):
        kernels.lora_shrink(torch.randn(2, 4), torch.randn(1, 2, 4), torch.zeros(2, dtype=torch.int32))


def test_forced_torch_routes_to_the_reference(monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch._impl("attention", torch.device("cpu")) is ref_attention
    assert dispatch._impl("lora", torch.device("cpu")) is ref_lora


def test_forced_triton_runs_the_triton_kernels_through_the_public_api(monkeypatch):
    tri = triton_module("lora")  # without a GPU: sets TRITON_INTERPRET=1 and builds for the interpreter
    device = torch.device(cases()[0][0])
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    assert dispatch._impl("lora", device) is tri
    x, a, b = torch.randn(6, 32), torch.randn(2, 16, 32), torch.randn(2, 24, 16)
    token_lora = torch.tensor([0, -1, 1, 1, 0, -1], dtype=torch.int32)
    args = [t.to(device) for t in (x, a, token_lora, b)]
    t = kernels.lora_shrink(args[0], args[1], args[2], 0.5)
    y = kernels.lora_expand(t, args[3], args[2], torch.zeros(6, 24, device=device)).cpu()
    y_ref = ref_lora.lora_expand(ref_lora.lora_shrink(x, a, token_lora, 0.5), b, token_lora, torch.zeros(6, 24))
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_size_hints_are_accepted_on_every_backend(monkeypatch):
    """The engine may pass host-known maxima; the torch path ignores them, Triton uses them."""
    q, cache = torch.randn(2, 4, 64), torch.randn(4, 16, 2, 64)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    expected = ref_attention.paged_decode_attention(q, cache, cache, bt, lens, 0.125)
    triton_module("attention")
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LORAPLEX_KERNELS", backend)
        device = torch.device(cases()[0][0])
        got = kernels.paged_decode_attention(q.to(device), cache.to(device), cache.to(device), bt.to(device),
                                             lens.to(device), 0.125, max_seq_len=20)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
