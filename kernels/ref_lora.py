"""Torch reference multi-LoRA shrink/expand (also the CPU production path).

Layouts (shared with the Triton kernels):
  x [T, H_in]; lora_a [num_slots, r_max, H_in]; lora_b [num_slots, H_out, r_max]; t [T, r_max]
  token_lora [T] int: the slot of each token, -1 for none; ranks below r_max are zero-padded.
Tokens are grouped by slot (one stable sort) and each active slot does one matmul, so no per-token copy of
an adapter matrix is ever made.
"""

from __future__ import annotations

import torch

from kernels import step_cache


def check_lora_args(x: torch.Tensor, weights: torch.Tensor, token_lora: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or weights.dim() != 3:
        raise ValueError(f"{name}: expected x 2-D and weights 3-D, got {tuple(x.shape)} and {tuple(weights.shape)}")
    if token_lora.dim() != 1 or token_lora.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: token_lora must be [T={x.shape[0]}], got {tuple(token_lora.shape)}")


def check_apply_args(x, lora_as, lora_bs, token_lora, ys) -> None:
    if len(lora_as) != len(lora_bs) or len(lora_as) != len(ys):
        raise ValueError("lora_apply: lora_as, lora_bs and ys must have one entry per module")
    for a, b, y in zip(lora_as, lora_bs, ys):
        check_lora_args(x, a, token_lora, "lora_apply")
        if a.shape[2] != x.shape[1] or b.shape[:1] != a.shape[:1] or b.shape[2] != a.shape[1] \
                or y.shape != (x.shape[0], b.shape[1]):
            raise ValueError(f"lora_apply: x {tuple(x.shape)}, lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)} "
                             f"and y {tuple(y.shape)} do not fit x [T, H_in], a [slots, r, H_in], "
                             "b [slots, H_out, r], y [T, H_out]")


def slot_scales(scale, num_slots: int, device) -> torch.Tensor:
    """A float or a [num_slots] tensor -> [num_slots] fp32 tensor."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != num_slots:
            raise ValueError(f"lora_shrink: scale must be a float or [num_slots={num_slots}], got {tuple(scale.shape)}")
        return scale.reshape(num_slots).to(device=device, dtype=torch.float32)
    return torch.full((num_slots,), float(scale), device=device, dtype=torch.float32)


def group_by_slot(token_lora: torch.Tensor):
    """[(slot, token indices)] for each slot that has tokens, -1 excluded."""
    order = torch.argsort(token_lora, stable=True)
    slots, counts = torch.unique_consecutive(token_lora[order], return_counts=True)
    groups, start = [], 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        if slot >= 0:
            groups.append((slot, order[start:start + count]))
        start += count
    return groups


class _Plan:
    """Token order for one token_lora tensor, reused by every shrink/expand of an engine step (same tensor).

    Dense: tokens sorted by slot and padded to [num_slots, max_tokens_per_slot]; one bmm against all slot
    weights in place, no per-token weight copy and no per-slot Python loop. Chosen when the padding costs at
    most 2x the real rows (decode-heavy batches, many adapters); otherwise one matmul per active slot.
    """

    def __init__(self, token_lora: torch.Tensor, num_slots: int):
        tl = token_lora.long()
        idx = (tl >= 0).nonzero().squeeze(1)
        slots = tl[idx]
        order = torch.argsort(slots, stable=True)
        self.idx, slots = idx[order], slots[order]
        counts = torch.bincount(slots, minlength=num_slots)
        self.max_n = int(counts.max()) if len(slots) else 0
        self.max_slot = int(slots[-1]) if len(slots) else -1  # slots are sorted: the C path checks it is in range
        self.dense = 0 < num_slots * self.max_n <= 2 * len(slots) + num_slots
        self.unpadded = num_slots * self.max_n == len(slots)  # every slot has max_n tokens: flat is 0..n-1
        # ... and the tokens already come in slot order (the scheduler sorts decodes by slot): no reorder at all
        self.in_order = self.unpadded and len(slots) == tl.shape[0] and bool((self.idx == torch.arange(
            len(slots), device=tl.device)).all())
        if self.dense:
            starts = torch.cumsum(counts, 0) - counts
            self.flat = slots * self.max_n + (torch.arange(len(slots), device=tl.device) - starts[slots])
        self.groups = None if self.dense else group_by_slot(token_lora)
        # Runs of consecutive tokens on one slot (prefill: a sequence's tokens are contiguous). When there are few,
        # lora_apply works on slices of x and y in place: no gather of rows, no scatter back.
        # A single run (one adapter for the whole batch) also beats the batched matmuls: two plain GEMMs per module.
        self.runs, self.tokens, self.segments = None, len(slots), 0
        if len(slots):
            edges = [0] + ((tl[1:] != tl[:-1]).nonzero().squeeze(1) + 1).tolist() + [tl.shape[0]]
            run_slots = tl[edges[:-1]].tolist()
            runs = [(s, a, b) for s, a, b in zip(run_slots, edges, edges[1:]) if s >= 0]
            self.segments = len(runs)  # same-slot runs among the tokens with a slot (the C path's choice)
            if len(runs) == 1 or (not self.dense and len(runs) <= 2 * len(self.groups)):
                self.runs = runs


def _shrink_rows(rows: torch.Tensor, lora_a: torch.Tensor, slot: int, scales: torch.Tensor | None) -> torch.Tensor:
    """rows @ A[slot]^T, times the slot's scale (scales None: the scale is already folded into B)."""
    t = rows @ lora_a[slot].t()
    return t if scales is None else t * scales[slot]


def step_plan(token_lora: torch.Tensor, num_slots: int) -> _Plan:
    """The step's token order for token_lora (built once per step, shared by every layer and module)."""
    return step_cache.cached("lora", (token_lora,), lambda: _Plan(token_lora, num_slots), (num_slots,))


def lora_shrink(x, lora_a, token_lora, scale=1.0):
    check_lora_args(x, lora_a, token_lora, "lora_shrink")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink: lora_a is [.., .., {lora_a.shape[2]}] but x has H_in={x.shape[1]}")
    num_slots, r = lora_a.shape[0], lora_a.shape[1]
    scales = slot_scales(scale, num_slots, x.device).to(x.dtype)
    t = torch.zeros(x.shape[0], r, dtype=x.dtype, device=x.device)
    plan = step_plan(token_lora, num_slots)
    if plan.dense:
        xp = torch.zeros(num_slots * plan.max_n, x.shape[1], dtype=x.dtype, device=x.device)
        xp[plan.flat] = x[plan.idx]
        tp = torch.bmm(xp.view(num_slots, plan.max_n, -1), lora_a.transpose(1, 2)) * scales[:, None, None]
        t[plan.idx] = tp.view(-1, r)[plan.flat]
        return t
    for slot, idx in plan.groups:
        t.index_copy_(0, idx, _shrink_rows(x.index_select(0, idx), lora_a, slot, scales))
    return t


def lora_expand(t, lora_b, token_lora, y):
    check_lora_args(t, lora_b, token_lora, "lora_expand")
    if lora_b.shape[2] != t.shape[1] or y.shape != (t.shape[0], lora_b.shape[1]):
        raise ValueError(f"lora_expand: t {tuple(t.shape)}, lora_b {tuple(lora_b.shape)} and y {tuple(y.shape)} "
                         "do not fit t [T, r], lora_b [slots, H_out, r], y [T, H_out]")
    num_slots = lora_b.shape[0]
    plan = step_plan(token_lora, num_slots)
    if plan.dense:
        tp = torch.zeros(num_slots * plan.max_n, t.shape[1], dtype=t.dtype, device=t.device)
        tp[plan.flat] = t[plan.idx]
        yp = torch.bmm(tp.view(num_slots, plan.max_n, -1), lora_b.transpose(1, 2))
        y.index_add_(0, plan.idx, yp.view(-1, lora_b.shape[1])[plan.flat].to(y.dtype))
        return y
    for slot, idx in plan.groups:
        y.index_add_(0, idx, (t.index_select(0, idx) @ lora_b[slot].t()).to(y.dtype))
    return y


def lora_apply(x, lora_as, lora_bs, token_lora, ys, scale=1.0):
    """ys[i] += scale[slot] * lora_bs[i][slot] @ lora_as[i][slot] @ x per token, for modules sharing input x.

    Shrink and expand fused for all modules of one input (q/k/v, gate/up): tokens are put in slot order once,
    the rank-r intermediate never leaves that order, and each module ends in one index_add into its output.
    """
    check_apply_args(x, lora_as, lora_bs, token_lora, ys)
    if not lora_as:
        return ys
    if lora_as[0].dtype != x.dtype:  # adapters stored in a lower precision (lora_dtype): compute in x's dtype
        lora_as, lora_bs = [a.to(x.dtype) for a in lora_as], [b.to(x.dtype) for b in lora_bs]
    num_slots = lora_as[0].shape[0]
    plan = step_plan(token_lora, num_slots)
    if plan.max_n == 0:
        return ys
    if plan.max_slot >= num_slots:
        raise IndexError(f"lora_apply: token slot {plan.max_slot} out of range for {num_slots} slots")
    scales = None  # a float scale of 1: the engine folds adapter scales into B
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        scales = slot_scales(scale, num_slots, x.device).to(x.dtype)
    if plan.runs is not None:
        for slot, start, end in plan.runs:
            for a, b, y in zip(lora_as, lora_bs, ys):
                y[start:end].addmm_(_shrink_rows(x[start:end], a, slot, scales), b[slot].t())
        return ys
    if plan.dense:
        if plan.in_order:
            xp = x
        elif plan.unpadded:
            xp = x.index_select(0, plan.idx)
        else:
            xp = x.new_zeros(num_slots * plan.max_n, x.shape[1]).index_copy_(0, plan.flat, x.index_select(0, plan.idx))
        xt = xp.reshape(num_slots, plan.max_n, x.shape[1]).transpose(1, 2)  # [slots, H_in, max_n]
        for a, b, y in zip(lora_as, lora_bs, ys):
            t = torch.bmm(a, xt)  # [slots, r, max_n]: A on the left was 1.5x faster than x @ A^T for decode
            if scales is not None:
                t = t * scales[:, None, None]
            yp = torch.bmm(t.transpose(1, 2), b.transpose(1, 2)).view(-1, b.shape[1]).to(y.dtype)
            if plan.in_order:
                y.add_(yp)
            else:
                y.index_add_(0, plan.idx, yp if plan.unpadded else yp.index_select(0, plan.flat))
        return ys
    for slot, idx in plan.groups:
        rows = x.index_select(0, idx)
        for a, b, y in zip(lora_as, lora_bs, ys):
            y.index_add_(0, idx, (_shrink_rows(rows, a, slot, scales) @ b[slot].t()).to(y.dtype))
    return ys
