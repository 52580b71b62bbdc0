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
    dev = CASES[0][0]  # where the Triton kernels run
    x = torch.randn(5, 32, device=dev)
    a, b = (w.to(dev) for w in _adapters(2, 16, 32, 16, [16, 16], torch.float32, torch.Generator().manual_seed(2)))
    token_lora = torch.full((5,), -1, dtype=torch.int32, device=dev)
    y0 = torch.randn(5, 16, device=dev)
    t = tri.lora_shrink(x, a, token_lora, 1.0)
    y = tri.lora_expand(t, b, token_lora, y0.clone())
    assert torch.equal(t, torch.zeros(5, 16, device=dev)) and torch.equal(y, y0)


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
    plan = ref_lora.step_plan(token_lora, slots)
    assert plan.dense == (layout != "one-slot-many-tokens")


LAYOUTS = {
    "one-token-per-slot": lambda slots: torch.randperm(slots).int(),  # decode: dense, no padding
    "slot-sorted-decode": lambda slots: torch.arange(slots, dtype=torch.int32),  # as the scheduler orders them
    "one-adapter-batch": lambda slots: torch.full((6,), 4, dtype=torch.int32),  # dense but a single run
    "two-tokens-some-slots": lambda slots: torch.tensor([1, 4, 1, -1, 6, 4], dtype=torch.int32),  # dense, padded
    "one-slot-many-tokens": lambda slots: torch.tensor([3] * 40 + [5, -1], dtype=torch.int32),  # runs
    "interleaved-prefill": lambda slots: torch.tensor([2, 5] * 12 + [-1] * 3, dtype=torch.int32),  # grouped
    "base-only": lambda slots: torch.full((5,), -1, dtype=torch.int32),
}


def _fused_case(layout, dtype=torch.float32):
    """Three modules reading one input and writing column slices of one fused output, as q/k/v do."""
    gen = torch.Generator().manual_seed(3)
    slots, r, h_in, outs = 8, 4, 24, (40, 8, 8)
    token_lora = LAYOUTS[layout](slots)
    x = torch.randn(len(token_lora), h_in, generator=gen)
    mods = [_adapters(slots, r, h_in, o, [r, 2, 1, r, r, 3, r, r], torch.float32, gen) for o in outs]
    scale = torch.rand(slots, generator=gen) + 0.5
    fused = torch.randn(len(token_lora), sum(outs), generator=gen)
    want = fused.clone()
    for i, s in enumerate(token_lora.tolist()):
        if s >= 0:
            col = 0
            for (a, b), o in zip(mods, outs):
                want[i, col:col + o] += b[s] @ (a[s] @ x[i] * scale[s])
                col += o
    return x.to(dtype), [(a.to(dtype), b.to(dtype)) for a, b in mods], token_lora, scale, fused.to(dtype), want, outs


def _column_views(fused, outs):
    cols, col = [], 0
    for o in outs:
        cols.append(fused[:, col:col + o])
        col += o
    return cols


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_lora_apply_matches_per_token_loop(layout):
    x, mods, token_lora, scale, fused, want, outs = _fused_case(layout)
    ys = _column_views(fused, outs)
    assert ref.lora_apply(x, [a for a, _ in mods], [b for _, b in mods], token_lora, ys, scale) is ys
    plan = ref.step_plan(token_lora, 8)
    assert plan.in_order == (layout == "slot-sorted-decode")
    assert bool(plan.runs) == (layout in ("one-slot-many-tokens", "one-adapter-batch"))
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)
    # a float scale of 1 (the engine folds scales into B) takes the no-multiply path
    x, mods, token_lora, _, fused, _, outs = _fused_case(layout)
    want = fused.clone()
    for (a, b), y in zip(mods, _column_views(want, outs)):
        ref.lora_expand(ref.lora_shrink(x, a, token_lora, 1.0), b, token_lora, y)
    ref.lora_apply(x, [a for a, _ in mods], [b for _, b in mods], token_lora, _column_views(fused, outs))
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["one-token-per-slot", "one-slot-many-tokens"])
@pytest.mark.parametrize("per_slot_scale", [True, False], ids=["slot-scales", "scale-1-as-the-engine"])
def test_triton_lora_apply_matches_reference(tri, case, layout, per_slot_scale):
    device, dtype = case
    x, mods, token_lora, scale, fused, _, outs = _fused_case(layout, dtype)
    if not per_slot_scale:
        scale = torch.ones_like(scale)  # the engine folds scales into B and passes 1.0
    expected = fused.float().clone()
    ref.lora_apply(x.float(), [a.float() for a, _ in mods], [b.float() for _, b in mods], token_lora,
                   _column_views(expected, outs), scale)
    fused = fused.to(device)
    tri.lora_apply(x.to(device), [a.to(device) for a, _ in mods], [b.to(device) for _, b in mods],
                   token_lora.to(device), _column_views(fused, outs), scale.to(device) if per_slot_scale else 1.0)
    atol, rtol = LORA_TOLERANCES[dtype]
    torch.testing.assert_close(fused.float().cpu(), expected, atol=atol, rtol=rtol)


def test_lora_apply_refuses_mismatched_module_lists():
    x = torch.randn(3, 8)
    a, b = _adapters(2, 4, 8, 6, [4, 4], torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one entry per module"):
        ref.lora_apply(x, [a, a], [b], torch.zeros(3, dtype=torch.int32), [torch.zeros(3, 6)])
    with pytest.raises(ValueError, match="do not fit"):
        ref.lora_apply(x, [a], [b], torch.zeros(3, dtype=torch.int32), [torch.zeros(3, 7)])


def _slot_buffer_views(slots, r_max, h_in, outs, dtype, gen, device="cpu"):
    """A, B views of one buffer in which each slot keeps every module's A and B side by side, B out-major: the
    engine's slot layout on CUDA (serving/engine/lora.py); ranks 1..r_max per slot, zero-padded."""
    width = sum(r_max * (h_in + o) for o in outs)
    buf = torch.zeros(slots * width, dtype=dtype, device=device)
    lora_as, lora_bs, offset = [], [], 0
    for o in outs:
        lora_as.append(buf.as_strided((slots, r_max, h_in), (width, h_in, 1), offset))
        offset += r_max * h_in
        lora_bs.append(buf.as_strided((slots, o, r_max), (width, r_max, 1), offset))
        offset += r_max * o
    for s in range(slots):
        r = 1 + s % r_max
        for a, b in zip(lora_as, lora_bs):
            a[s, :r] = torch.randn(r, h_in, generator=gen) / h_in ** 0.5
            b[s, :, :r] = torch.randn(b.shape[1], r, generator=gen) / r ** 0.5
    return lora_as, lora_bs


GROUP_STEPS = {
    "decode-one-token-per-slot": [2, 0, 5, 1, 4, 3],
    "decode-with-base-tokens": [1, -1, 4, 1, -1, 0],
    "one-adapter-batch": [3] * 7,
    "prefill-chunk-and-decodes": [2] * 37 + [0, 5, -1],  # a slot's tokens span several token tiles
    "base-only": [-1] * 4,
}


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("step", list(GROUP_STEPS))
def test_triton_group_one_launch_matches_reference(tri, monkeypatch, case, step):
    """The engine's CUDA path: a bound group adds q/k/v's deltas into their columns of the fused output in one
    launch, over the active slots and ranks only (as the engine binds them), with modules split into several
    column chunks (chunk sizes shrunk to the interpreter's 32-wide tiles)."""
    import kernels

    device, dtype = case
    monkeypatch.setattr(tri, "_CHUNK_COLUMNS", (32, 64))
    gen = torch.Generator().manual_seed(31)
    slots, r_max, h_in, outs = 6, 16, 40, (72, 24, 24)
    lora_as, lora_bs = _slot_buffer_views(slots, r_max, h_in, outs, dtype, gen, device)
    token_lora = torch.tensor(GROUP_STEPS[step], dtype=torch.int32)
    n = max(GROUP_STEPS[step]) + 1 or 1
    r = 8 if step == "one-adapter-batch" else r_max  # slot 3 has rank 4: the engine binds ranks :8 then
    a, b = [w[:n, :r] for w in lora_as], [w[:n, :, :r] for w in lora_bs]
    columns, col = [], 0
    for o in outs:
        columns.append(slice(col, col + o))
        col += o
    x = torch.randn(len(token_lora), h_in, generator=gen).to(dtype)
    fused = torch.randn(len(token_lora), col, generator=gen).to(dtype)
    expected = fused.float().clone()
    ref.lora_apply(x.float(), [w.float().cpu() for w in a], [w.float().cpu() for w in b], token_lora,
                   [expected[:, c] for c in columns])
    kernels.set_backend("triton")
    try:
        group = kernels.lora_group(a, b, columns)
        assert isinstance(group, tri.Group)
        if step != "base-only":
            assert group.chunks(32).shape[0] == 3 + 1 + 1  # q's 72 columns in three chunks, k and v in one
        out = fused.to(device)
        assert group(x.to(device), token_lora.to(device), out) is out
    finally:
        kernels.set_backend("auto")
    atol, rtol = LORA_TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=rtol)


def test_triton_group_leaves_other_layouts_and_backends_to_the_general_path(tri, monkeypatch):
    """Weights that are not views of one slot buffer bind the general group; a bound group whose backend is
    switched to torch afterwards runs the reference from the next step (a new slot vector) on."""
    import kernels

    device, dtype = CASES[0]
    gen = torch.Generator().manual_seed(32)
    lora_as, lora_bs = _slot_buffer_views(4, 16, 40, (48, 16), dtype, gen, device)
    columns = [slice(0, 48), slice(48, 64)]
    x = torch.randn(5, 40, generator=gen).to(device, dtype)
    token_lora = torch.tensor([3, -1, 0, 2, 3], dtype=torch.int32, device=device)
    launches = []
    monkeypatch.setattr(tri.Group, "chunks", lambda self, c, f=tri.Group.chunks: launches.append(c) or f(self, c))
    kernels.set_backend("triton")
    try:
        assert not isinstance(kernels.lora_group([a.clone() for a in lora_as], [b.clone() for b in lora_bs],
                                                 columns), tri.Group)  # separate tensors
        group = kernels.lora_group(lora_as, lora_bs, columns)
        y = torch.zeros(5, 64, dtype=dtype, device=device)
        group(x, token_lora, y)
        assert len(launches) == 1
        kernels.set_backend("torch")
        y2 = torch.zeros(5, 64, dtype=dtype, device=device)
        group(x, token_lora.clone(), y2)
        assert len(launches) == 1  # the general path ran
        atol, rtol = LORA_TOLERANCES[dtype]
        torch.testing.assert_close(y2.float(), y.float(), atol=atol, rtol=rtol)
    finally:
        kernels.set_backend("auto")
