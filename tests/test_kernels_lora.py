"""Multi-LoRA shrink/expand: the torch reference against a per-token loop and against PEFT's LoRA layer, and
the Triton kernels (CPU interpreter, or CUDA) against the reference."""

import pytest
import torch

from kernels import ref_lora as ref
from kernels.testing import LORA_TOLERANCES, case_id, cases, triton_module

CASES = cases()


@pytest.fixture(scope="module")
def tri():
    return triton_module("lora")


def _adapters(num_slots, r_max, h_in, h_out, ranks, dtype, gen):
    """Slot weights with ranks below r_max zero-padded, as the engine lays them out."""
    a = torch.randn(num_slots, r_max, h_in, generator=gen) / h_in ** 0.5
    b = torch.randn(num_slots, h_out, r_max, generator=gen) / r_max ** 0.5
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    return a.to(dtype), b.to(dtype)


def _loop(x, a, b, token_lora, scales, y):
    """Independent per-token reference in fp32."""
    t = torch.zeros(x.shape[0], a.shape[1])
    y = y.float().clone()
    for i, s in enumerate(token_lora.tolist()):
        if s >= 0:
            t[i] = scales[s] * (a[s].float() @ x[i].float())
            y[i] += b[s].float() @ t[i]
    return t, y


def test_reference_matches_per_token_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(29, 40, generator=gen)
    a, b = _adapters(4, 8, 40, 24, [8, 4, 2, 8], torch.float32, gen)
    token_lora = torch.randint(-1, 4, (29,), generator=gen, dtype=torch.int32)
    scales = torch.tensor([0.5, 2.0, 1.0, 0.25])
    y0 = torch.randn(29, 24, generator=gen)
    t = ref.lora_shrink(x, a, token_lora, scales)
    y = ref.lora_expand(t, b, token_lora, y0.clone())
    t_exp, y_exp = _loop(x, a, b, token_lora, scales, y0)
    torch.testing.assert_close(t, t_exp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_exp, atol=1e-5, rtol=1e-5)
    untouched = token_lora == -1
    assert untouched.any() and torch.equal(y[untouched], y0[untouched])


def test_reference_matches_peft_lora_delta():
    """Two PEFT adapters on one Linear: shrink/expand with scale alpha/r reproduces each adapter's delta."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 20))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
                           adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    a = torch.zeros(2, 4, 32)
    b = torch.zeros(2, 20, 4)
    for slot, name in enumerate(["first", "second"]):
        r = layer.r[name]
        a[slot, :r] = layer.lora_A[name].weight.detach()
        b[slot, :, :r] = layer.lora_B[name].weight.detach()
    scales = torch.tensor([layer.scaling["first"], layer.scaling["second"]])
    x = torch.randn(6, 32)
    token_lora = torch.tensor([0, 1, -1, 1, 0, 0], dtype=torch.int32)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        expected = base_out.clone()
        for slot, name in enumerate(["first", "second"]):
            model.set_adapter(name)
            rows = token_lora == slot
            expected[rows] = layer(x[rows])
        t = ref.lora_shrink(x, a, token_lora, scales)
        got = ref.lora_expand(t, b, token_lora, base_out.clone())
    assert not torch.allclose(expected[token_lora >= 0], base_out[token_lora >= 0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# (tokens, slots, r_max, ranks, H_in, H_out): a single token, ragged ranks, tiles past 16 tokens.
SHAPES = [
    (1, 2, 16, [16, 8], 64, 48),
    (37, 3, 8, [8, 4, 1], 40, 72),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-slots{s[1]}-r{s[2]}")
@pytest.mark.parametrize("per_slot_scale", [False, True], ids=["float-scale", "slot-scales"])
def test_shrink_expand_match_reference(tri, case, shape, per_slot_scale):
    device, dtype = case
    tokens, slots, r_max, ranks, h_in, h_out = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, h_in, generator=gen).to(dtype)
    a, b = _adapters(slots, r_max, h_in, h_out, ranks, dtype, gen)
    token_lora = torch.randint(-1, slots, (tokens,), generator=gen, dtype=torch.int32)
    if tokens > 1:
        token_lora[:2] = torch.tensor([-1, slots - 1])  # slot -1 and the last slot always present
    scale = torch.rand(slots, generator=gen) + 0.5 if per_slot_scale else 0.75
    y0 = torch.randn(tokens, h_out, generator=gen).to(dtype)
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    x, a, b, token_lora, scale, y0 = map(to, (x, a, b, token_lora, scale, y0))

    t_exp = ref.lora_shrink(x.float(), a.float(), token_lora, scale.float() if per_slot_scale else scale)
    y_exp = ref.lora_expand(t_exp, b.float(), token_lora, y0.float().clone())
    t = tri.lora_shrink(x, a, token_lora, scale)
    y = y0.clone()
    assert tri.lora_expand(t, b, token_lora, y) is y
    atol, rtol = LORA_TOLERANCES[dtype]
    assert t.dtype == dtype and y.dtype == dtype
    torch.testing.assert_close(t.float(), t_exp, atol=atol, rtol=rtol)
    torch.testing.assert_close(y.float(), y_exp, atol=atol, rtol=rtol)
    none = token_lora == -1
    assert torch.equal(t[none], torch.zeros_like(t[none])) and torch.equal(y[none], y0[none])


def test_all_tokens_without_adapter_leave_y_unchanged(tri):
    x = torch.randn(5, 32)
    a, b = _adapters(2, 16, 32, 16, [16, 16], torch.float32, torch.Generator().manual_seed(2))
    token_lora = torch.full((5,), -1, dtype=torch.int32)
    y0 = torch.randn(5, 16)
    t = tri.lora_shrink(x, a, token_lora, 1.0)
    y = tri.lora_expand(t, b, token_lora, y0.clone())
    assert torch.equal(t, torch.zeros(5, 16)) and torch.equal(y, y0)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_bad_shapes_are_named(tri, impl):
    mod = ref if impl == "ref" else tri
    x = torch.randn(4, 32)
    a = torch.randn(2, 8, 30)
    with pytest.raises(ValueError, match="H_in"):
        mod.lora_shrink(x, a, torch.zeros(4, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="token_lora"):
        mod.lora_shrink(x, torch.randn(2, 8, 32), torch.zeros(3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="scale"):
        mod.lora_shrink(x, torch.randn(2, 8, 32), torch.zeros(4, dtype=torch.int32), torch.ones(3))


@pytest.mark.parametrize("layout", ["one-token-per-slot", "one-slot-many-tokens", "mixed-with-base"])
def test_reference_dense_and_grouped_paths_match_per_token_loop(layout):
    from kernels import ref_lora

    torch.manual_seed(0)
    slots, r, h_in, h_out = 8, 4, 24, 40
    token_lora = {
        "one-token-per-slot": torch.randperm(slots).int(),  # decode-like: the dense padded bmm
        "one-slot-many-tokens": torch.tensor([3] * 40 + [5], dtype=torch.int32),  # prefill-like: grouped loop
        "mixed-with-base": torch.tensor([0, -1, 7, 7, -1, 2, 0, 5], dtype=torch.int32),
    }[layout]
    x = torch.randn(len(token_lora), h_in)
    a, b = torch.randn(slots, r, h_in), torch.randn(slots, h_out, r)
    scale = torch.rand(slots)
    y = torch.randn(len(token_lora), h_out)
    want = y.clone()
    for i, s in enumerate(token_lora.tolist()):
        if s >= 0:
            want[i] += b[s] @ (a[s] @ x[i] * scale[s])
    got = ref_lora.lora_expand(ref_lora.lora_shrink(x, a, token_lora, scale), b, token_lora, y.clone())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plan = ref_lora._plan(token_lora, slots)
    assert plan.dense == (layout != "one-slot-many-tokens")
