"""Triton multi-LoRA shrink/expand (segmented, after punica's SGMV).

Tokens are sorted by slot on the device (no host sync); the grid is (token tiles, output tiles, slots) and
each program handles one tile of one slot's tokens, so every program does a dense matmul against a single
adapter. Programs past the end of their slot's tokens exit at once. Layouts as in kernels/ref_lora.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import step_cache
from kernels.ref_lora import check_apply_args, check_lora_args, slot_scales
from kernels.triton_launch import dot_precision, needs_int64


def slot_segments(token_lora: torch.Tensor, num_slots: int):
    """(token ids sorted by slot, start of each slot in that order, count per slot), all on the device."""
    tl_ = token_lora.to(torch.int64)
    order = torch.argsort(tl_, stable=True).to(torch.int32)
    counts = torch.bincount(tl_ + 1, minlength=num_slots + 1)  # index 0 counts the -1 tokens
    starts = (torch.cumsum(counts, 0) - counts)[1:num_slots + 1].to(torch.int32)
    return order, starts, counts[1:num_slots + 1].to(torch.int32)


def step_segments(token_lora: torch.Tensor, num_slots: int):
    """slot_segments made once per step (kernels.step_cache) and shared by every module and layer."""
    return step_cache.cached("lora_segments", (token_lora,), lambda: slot_segments(token_lora, num_slots),
                             (num_slots,))


@triton.jit
def _slot_rows(order_ptr, starts_ptr, slot, pid_m, count, BLOCK_M: tl.constexpr, OFF64: tl.constexpr):
    """The token ids of this program's tile of its slot's tokens, and which of them are real."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < count
    rows = tl.load(order_ptr + tl.load(starts_ptr + slot) + offs_m, mask=mmask, other=0)
    if OFF64:
        rows = rows.to(tl.int64)
    return rows, mmask


@triton.jit
def _shrink_tile(x_ptr, a_rows, rows, mmask, rmask, hidden, stride_xt,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """[BLOCK_M, BLOCK_R] fp32: x[rows] @ A^T, a_rows pointing at the first element of each of A's rows."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kmask = (k0 + offs_k) < hidden
        x = tl.load(x_ptr + rows[:, None] * stride_xt + (k0 + offs_k)[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(a_rows[None, :] + (k0 + offs_k)[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        acc += tl.dot(x, a, input_precision=DOT_PREC)
    return acc


@triton.jit
def _add_into(y_ptr, rows, cols, mmask, nmask, stride_yt, acc):
    """y[rows, cols] += acc, in y's dtype."""
    y_ptrs = y_ptr + rows[:, None] * stride_yt + cols[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, t_ptr, order_ptr, starts_ptr, counts_ptr, scale_ptr, hidden, rank,
                   stride_xt, stride_as, stride_ar, stride_tt,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, OFF64: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M < count:
        rows, mmask = _slot_rows(order_ptr, starts_ptr, slot, pid_m, count, BLOCK_M, OFF64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = offs_r < rank
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r * stride_ar
        acc = _shrink_tile(x_ptr, a_rows, rows, mmask, rmask, hidden, stride_xt, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PREC)
        acc *= tl.load(scale_ptr + slot)
        tl.store(t_ptr + rows[:, None] * stride_tt + offs_r[None, :], acc.to(t_ptr.dtype.element_ty),
                 mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _expand_kernel(t_ptr, b_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr, out_features, rank,
                   stride_tt, stride_bs, stride_bo, stride_yt,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, OFF64: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M < count:
        rows, mmask = _slot_rows(order_ptr, starts_ptr, slot, pid_m, count, BLOCK_M, OFF64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < out_features
        offs_r = tl.arange(0, BLOCK_R)
        b_base = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bo
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rmask = (r0 + offs_r) < rank
            t = tl.load(t_ptr + rows[:, None] * stride_tt + (r0 + offs_r)[None, :],
                        mask=mmask[:, None] & rmask[None, :], other=0.0)
            b = tl.load(b_base + (r0 + offs_r)[:, None], mask=rmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(t.to(b.dtype), b, input_precision=DOT_PREC)
        _add_into(y_ptr, rows, offs_n, mmask, nmask, stride_yt, acc)


@triton.jit
def _group_kernel(x_ptr, w_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr, chunk_ptr, hidden, rank,
                  stride_xt, stride_ws, stride_ar, stride_bo, stride_yt,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  OFF64: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program: one tile of one slot's tokens, one chunk of one module's output columns. It shrinks its
    tokens through the module's A (t stays in registers), then adds t @ B^T into each BLOCK_N tile of the chunk.
    A chunk row of chunk_ptr: A's and B's offsets from w_ptr within a slot, the module's first column in y, and
    the chunk's columns [begin, end) of the module's output."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M < count:
        rows, mmask = _slot_rows(order_ptr, starts_ptr, slot, pid_m, count, BLOCK_M, OFF64)
        chunk = chunk_ptr + pid_c * 5
        a_off, b_off, y_col = tl.load(chunk), tl.load(chunk + 1), tl.load(chunk + 2)
        n_begin, n_end = tl.load(chunk + 3), tl.load(chunk + 4)
        w_slot = w_ptr + slot.to(tl.int64) * stride_ws
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < rank
        acc = _shrink_tile(x_ptr, w_slot + a_off + offs_r * stride_ar, rows, mmask, rmask, hidden, stride_xt,
                           BLOCK_M, BLOCK_R, BLOCK_K, DOT_PREC)
        t = acc.to(x_ptr.dtype.element_ty)  # rounded as the two-launch path stores it
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(n_begin, n_end, BLOCK_N):
            cols = n0 + offs_n
            nmask = cols < n_end
            b = tl.load(w_slot + b_off + cols[None, :] * stride_bo + offs_r[:, None],
                        mask=rmask[:, None] & nmask[None, :], other=0.0)
            d = tl.dot(t.to(b.dtype), b, input_precision=DOT_PREC)
            _add_into(y_ptr, rows, y_col + cols, mmask, nmask, stride_yt, d)


def _block_m(num_tokens: int, num_slots: int, on_gpu: bool) -> int:
    """Token tile from the mean tokens per slot: small tiles keep SMs busy when many adapters share a batch
    (64 would spill registers on sm_90)."""
    return 16 if not on_gpu or num_tokens / max(1, num_slots) <= 32 else 32


def _check_shrink_layout(x, lora_a):
    """What the shrink kernel needs beyond fitting shapes: one dtype, rows contiguous along H_in."""
    if lora_a.dtype != x.dtype:
        raise ValueError(f"lora_shrink: x is {x.dtype} but lora_a is {lora_a.dtype}")
    if x.stride(1) != 1 or lora_a.stride(2) != 1:
        raise ValueError("lora_shrink: x and lora_a must be contiguous along H_in")


def _check_expand_layout(t, lora_b, y):
    """What the expand kernel needs beyond fitting shapes: B in y's dtype, last axes contiguous."""
    if lora_b.dtype != y.dtype:
        raise ValueError(f"lora_expand: y is {y.dtype} but lora_b is {lora_b.dtype}")
    if t.stride(1) != 1 or lora_b.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError("lora_expand: t, lora_b and y must be contiguous along their last axis")


def _shrink_into(x, lora_a, t, scales, segments) -> None:
    """One launch: t's rows of the tokens with a slot (the others are not written)."""
    num_tokens, hidden = x.shape
    num_slots, rank = lora_a.shape[0], lora_a.shape[1]
    order, starts, counts = segments
    on_gpu = x.device.type == "cuda"
    block_m = _block_m(num_tokens, num_slots, on_gpu)
    block_r = min(32, max(16, triton.next_power_of_2(rank)))  # larger ranks take more rank tiles
    block_k = (128 if on_gpu else 32)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(rank, block_r), num_slots)
    _shrink_kernel[grid](x, lora_a, t, order, starts, counts, scales, hidden, rank,
                         x.stride(0), lora_a.stride(0), lora_a.stride(1), t.stride(0),
                         BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, OFF64=needs_int64(x, t),
                         DOT_PREC=dot_precision(x.dtype),
                         num_warps=4)


def _expand_into(t, lora_b, y, segments) -> None:
    """One launch: y's rows of the tokens with a slot += their slot's B @ t (only those rows of t are read)."""
    num_tokens, rank = t.shape
    num_slots, out_features = lora_b.shape[0], lora_b.shape[1]
    order, starts, counts = segments
    on_gpu = t.device.type == "cuda"
    block_m = _block_m(num_tokens, num_slots, on_gpu)
    block_n = 128 if on_gpu else 32
    block_r = min(32, max(16, triton.next_power_of_2(rank)))  # larger ranks loop over rank chunks
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n), num_slots)
    _expand_kernel[grid](t, lora_b, y, order, starts, counts, out_features, rank,
                         t.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, OFF64=needs_int64(t, y),
                         DOT_PREC=dot_precision(lora_b.dtype),
                         num_warps=4)


def lora_shrink(x, lora_a, token_lora, scale=1.0, segments=None):
    """segments: slot_segments(token_lora, num_slots), to share the sort between shrink and expand."""
    check_lora_args(x, lora_a, token_lora, "lora_shrink")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink: lora_a is [.., .., {lora_a.shape[2]}] but x has H_in={x.shape[1]}")
    _check_shrink_layout(x, lora_a)
    num_slots = lora_a.shape[0]
    t = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or num_slots == 0:
        return t
    segments = segments if segments is not None else slot_segments(token_lora, num_slots)
    _shrink_into(x, lora_a, t, slot_scales(scale, num_slots, x.device), segments)
    return t


def lora_expand(t, lora_b, token_lora, y, segments=None):
    check_lora_args(t, lora_b, token_lora, "lora_expand")
    if lora_b.shape[2] != t.shape[1] or y.shape != (t.shape[0], lora_b.shape[1]):
        raise ValueError(f"lora_expand: t {tuple(t.shape)}, lora_b {tuple(lora_b.shape)} and y {tuple(y.shape)} "
                         "do not fit t [T, r], lora_b [slots, H_out, r], y [T, H_out]")
    _check_expand_layout(t, lora_b, y)
    num_slots = lora_b.shape[0]
    if t.shape[0] == 0 or num_slots == 0:
        return y
    _expand_into(t, lora_b, y, segments if segments is not None else slot_segments(token_lora, num_slots))
    return y


def lora_apply(x, lora_as, lora_bs, token_lora, ys, scale=1.0):
    """Shrink then expand per module: two launches a module. The slot sort and a float scale's per-slot tensor
    are made once per step (kernels.step_cache), and the rank-r intermediate is left uninitialised, since expand
    reads only the rows shrink writes (made per call, each was one more small launch per module)."""
    check_apply_args(x, lora_as, lora_bs, token_lora, ys)  # shapes; per module below only dtypes and strides
    if not lora_as or x.shape[0] == 0 or lora_as[0].shape[0] == 0:
        return ys
    num_slots = lora_as[0].shape[0]
    segments = step_segments(token_lora, num_slots)
    if isinstance(scale, torch.Tensor):
        scales = slot_scales(scale, num_slots, x.device)
    else:
        scales = step_cache.cached("lora_scales", (token_lora,), lambda: slot_scales(scale, num_slots, x.device),
                                   (num_slots, float(scale)))
    for a, b, y in zip(lora_as, lora_bs, ys):
        t = torch.empty(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
        _check_shrink_layout(x, a)
        _check_expand_layout(t, b, y)
        _shrink_into(x, a, t, scales, segments)
        _expand_into(t, b, y, segments)
    return ys


GROUP_MAX_RANK = 128  # the group kernel keeps a token tile's whole rank-r intermediate in registers
_CHUNK_COLUMNS = (512, 4096)  # output columns per program: decode-sized steps, larger steps (see Group)


class Group:
    """kernels.LoRAGroup's Triton form: one launch for all of a group's modules (q/k/v: one instead of six).
    Each program shrinks one token tile through one module's A and expands into one chunk of that module's
    columns, so the rank-r intermediate never leaves registers; a module split over several chunks repeats its
    shrink once per chunk. Small steps (decode) use 512-column chunks for enough programs; steps of more than
    256 tokens use 4096 columns, since their token tiles already fill the GPU and a shrink costs them
    hidden/columns of the expand's work.

    Built once per layer and module group: the weights must be views of one buffer with one slot stride (as
    the engine's slot buffers are), B out-major. Per call, only x and y are checked; anything else goes to the
    general group (two launches a module through lora_apply), as does a step when the backend asked for is no
    longer Triton."""

    def __init__(self, lora_as, lora_bs, general, base, offsets):
        self.general, self.base = general, base
        a, b = lora_as[0], lora_bs[0]
        self.slots, self.rank, self.in_features, self.dtype = a.shape[0], a.shape[1], a.shape[2], a.dtype
        self.stride_ws, self.stride_ar, self.stride_bo = a.stride(0), a.stride(1), b.stride(1)
        self.width = max(c.stop for c in general.columns)
        self.rows = []  # per module: (a offset, b offset, first column in y, out features)
        for (a_off, b_off), c in zip(offsets, general.columns):
            self.rows.append((a_off, b_off, c.start, c.stop - c.start))
        self._chunks: dict[int, torch.Tensor] = {}
        self._tl = self._segments = None
        self._triton = False

    def chunks(self, columns: int) -> torch.Tensor:
        """[chunks, 5] int64 on the device: a_off, b_off, y_col, begin, end per chunk of `columns` columns."""
        table = self._chunks.get(columns)
        if table is None:
            rows = [(a_off, b_off, y_col, n, min(n + columns, out))
                    for a_off, b_off, y_col, out in self.rows for n in range(0, out, columns)]
            table = self._chunks[columns] = torch.tensor(rows, dtype=torch.int64, device=self.base.device)
        return table

    def __call__(self, x, token_lora, y):
        if token_lora is not self._tl:  # a new step (the engine builds a fresh slot vector each step)
            from kernels.dispatch import backend_for

            self._tl = token_lora
            self._triton = token_lora.dim() == 1 and backend_for(token_lora.device) == "triton"
            self._segments = step_segments(token_lora, self.slots) if self._triton else None
        if not (self._triton and x.dtype is self.dtype and y.dtype is self.dtype and x.device == self.base.device
                and y.device == x.device and x.dim() == 2 and y.dim() == 2 and x.stride(1) == 1 and y.stride(1) == 1
                and x.shape[1] == self.in_features and x.shape[0] == y.shape[0] == token_lora.shape[0]
                and y.shape[1] >= self.width):
            return self.general(x, token_lora, y)
        num_tokens = x.shape[0]
        if num_tokens == 0:
            return y
        order, starts, counts = self._segments
        on_gpu = x.device.type == "cuda"
        table = self.chunks(_CHUNK_COLUMNS[num_tokens > 256])
        block_m = _block_m(num_tokens, self.slots, on_gpu)
        grid = (triton.cdiv(num_tokens, block_m), table.shape[0], self.slots)
        _group_kernel[grid](x, self.base, y, order, starts, counts, table, self.in_features, self.rank,
                            x.stride(0), self.stride_ws, self.stride_ar, self.stride_bo, y.stride(0),
                            OFF64=needs_int64(x, y), DOT_PREC=dot_precision(self.dtype),
                            **group_settings(block_m, self.rank, on_gpu))
        return y


def group_settings(block_m: int, rank: int, on_gpu: bool) -> dict:
    """Tiles and warps of the group kernel: the rank-r intermediate and the shrink's x and A tiles share the
    registers, so larger ranks take narrower K tiles and 8 warps (no spills on sm_90 up to rank 128, see
    kernels.testing.gpu_compile_report)."""
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = (128 if block_r <= 32 else 64 if block_r <= 64 else 32) if on_gpu else 32
    return dict(BLOCK_M=block_m, BLOCK_N=128 if on_gpu else 32, BLOCK_R=block_r, BLOCK_K=block_k,
                num_warps=4 if block_m <= 16 and block_r <= 32 else 8)


def group(lora_as, lora_bs, general):
    """The Triton form of a LoRAGroup (columns already checked by kernels.lora_group) when its weights are views
    of one buffer with a shared slot stride and B out-major (the engine's slot buffers on CUDA), else None (the
    general group)."""
    if len(lora_bs) != len(lora_as):
        return None
    a0, b0 = lora_as[0], lora_bs[0]
    if a0.dim() != 3 or not 0 < a0.shape[1] <= GROUP_MAX_RANK or a0.shape[0] == 0:
        return None
    storage = a0.untyped_storage().data_ptr()
    for a, b in zip(lora_as, lora_bs):
        if (a.shape != a0.shape or b.dim() != 3 or b.shape[0] != a0.shape[0] or b.shape[2] != a0.shape[1]
                or any(w.dtype is not a0.dtype or w.device != a0.device
                       or w.untyped_storage().data_ptr() != storage for w in (a, b))
                or a.stride()[:2] != a0.stride()[:2] or a.stride(2) != 1
                or b.stride(0) != a0.stride(0) or b.stride(1) != b0.stride(1) or b.stride(2) != 1):
            return None
    base = min((*lora_as, *lora_bs), key=lambda w: w.data_ptr())
    size = a0.element_size()
    offsets = [((a.data_ptr() - base.data_ptr()) // size, (b.data_ptr() - base.data_ptr()) // size)
               for a, b in zip(lora_as, lora_bs)]
    return Group(lora_as, lora_bs, general, base, offsets)
