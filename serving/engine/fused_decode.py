"""One C call for every decoder layer of a decode step on bfloat16, int8 or int4 weights (lp_decode_layers).

A decode step of a few streams on the CPU reads 269 MB of bf16 weights (~15 ms at this VM's bandwidth; int8 half);
the per-op path adds ~15 Python-level calls per layer on top (~8 ms over 30 layers). The fused call runs the same C
kernels in the same order with the same thread counts, so its tokens are bitwise the per-op path's
(tests/test_fused_decode.py compares them). It runs when every projection is a C-backed BF16Linear, Int8Linear or
Int4Linear, the batch is decode-only (a short prefill comes as decode rows, as_decode_rows) with at most
BF16Linear.GEMV_ROWS tokens, its LoRA groups (if any) run in C, and the C attention takes the caches; otherwise the
per-op path runs. LoRA runs inside the call, after each projection, with the kernels the per-op path would call (a
32-adapter step's Python went with it). The layers' addresses are gathered once per KV cache allocation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kernels import cpu_attention, cpu_native
from serving.engine.linear import BF16Linear, Int4Linear, Int8Linear


def as_decode_rows(batch):
    """The same step with every prefill token as a decode row: its sequence's block table and its position + 1
    as the context. Each layer writes the step's K/V before it attends, so a row attends to the chunk up to
    itself and whatever the cache held before it: causal prefill attention. A short prompt (up to GEMV_ROWS
    tokens with the decodes beside it) then takes the fused step; the per-op path gets the same batch, so the
    two stay bitwise equal (int8, a 5-token prompt: 28 -> 16 ms, its first token in process 32 -> 18 ms)."""
    n_pre = batch.num_prefill_tokens
    n_dec = batch.input_ids.shape[0] - n_pre
    counts = (batch.prefill_cu_seqlens[1:] - batch.prefill_cu_seqlens[:-1]).long()
    pre = batch.prefill_block_tables.repeat_interleave(counts, dim=0)
    dec = batch.decode_block_tables[:n_dec]
    width = max(pre.shape[1], dec.shape[1])
    tables = torch.cat([F.pad(pre, (0, width - pre.shape[1])), F.pad(dec, (0, width - dec.shape[1]))])
    lens = torch.cat([(batch.positions[:n_pre] + 1).to(torch.int32), batch.decode_seq_lens[:n_dec]])
    empty = batch.prefill_cu_seqlens[:1]
    return dataclasses.replace(batch, num_prefill_tokens=0, prefill_cu_seqlens=empty,
                               prefill_block_tables=batch.prefill_block_tables[:0],
                               prefill_seq_lens=batch.prefill_seq_lens[:0], decode_block_tables=tables.contiguous(),
                               decode_seq_lens=lens.contiguous(), prefill_from_start=False, max_decode_seq_len=None)


def _projections(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


class FusedDecode:
    def __init__(self, model):
        self.model = model
        attn = model.layers[0].self_attn
        self.hq, self.hkv, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.scale
        self.hidden = model.config.hidden_size
        self.intermediate = model.layers[0].mlp.intermediate
        self.eps = float(model.layers[0].input_layernorm.eps)
        self._table: torch.Tensor | None = None
        self._table_key: tuple | None = None

    @classmethod
    def build(cls, model) -> "FusedDecode | None":
        """The fused path for this model, or None where some layer cannot take it (Qwen3's q/k norms, a
        projection that is not a C-backed BF16Linear, Int8Linear or Int4Linear, norms with different eps)."""
        if cpu_native.lib() is None:
            return None
        eps = model.layers[0].input_layernorm.eps
        for layer in model.layers:
            c_backed = (isinstance(m, (BF16Linear, Int8Linear, Int4Linear)) and m._lib is not None
                        for m in _projections(layer))
            if layer.self_attn.q_norm is not None or not all(c_backed):
                return None
            if {layer.input_layernorm.eps, layer.post_attention_layernorm.eps} != {eps}:
                return None
        return cls(model)

    def _layers(self, kv_caches) -> torch.Tensor:
        key = tuple((k.data_ptr(), v.data_ptr()) for k, v in kv_caches)
        if key != self._table_key:
            ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
            rows = []
            for layer, (k, v) in zip(self.model.layers, kv_caches):
                lins = _projections(layer)  # 20 entries a layer: lp_decode_layers's LP_LAYER_PTRS
                rows.append([ptr(m.c_weight) for m in lins] + [ptr(m.bias) for m in lins]
                            + [ptr(layer.input_layernorm.weight), ptr(layer.post_attention_layernorm.weight),
                               ptr(k), ptr(v)] + [ptr(m.c_scales) for m in lins] + [m.C_KIND for m in lins])
            self._table, self._table_key = torch.tensor(rows, dtype=torch.int64), key
        return self._table

    def usable(self, batch, kv_caches, lora_apply) -> bool:
        t = batch.input_ids.shape[0]
        if batch.num_prefill_tokens or not 0 < t <= BF16Linear.GEMV_ROWS:
            return False
        if lora_apply is not None and getattr(lora_apply, "c_table", lambda: None)() is None:
            return False
        k, v = kv_caches[0]
        return cpu_attention.caches_supported(self.hq, self.head_dim, k, v, batch.decode_block_tables,
                                              batch.decode_seq_lens)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch, kv_caches, lora_apply=None):
        """(last MLP output, residual stream) after every layer, as the per-op loop returns them. lora_apply: the
        step's serving.engine.lora.LoRAStep, whose groups run inside the call (usable() checked they can)."""
        t = x.shape[0]
        residual = x.contiguous()  # the embeddings (a fresh tensor): the residual stream, updated in place
        out = torch.empty_like(residual)
        cos, sin = cos.contiguous(), sin.contiguous()
        slots = batch.slot_mapping.to(torch.int64).contiguous()
        tables, lens = cpu_attention.c_tables(batch.decode_block_tables, batch.decode_seq_lens)
        k = kv_caches[0][0]
        layers = self._layers(kv_caches)
        lora = lora_slots = None
        if lora_apply is not None:
            lora, lora_slots = lora_apply.c_table(), lora_apply.slots
        rc = cpu_native.lib().lp_decode_layers(
            layers.data_ptr(), len(self.model.layers), residual.data_ptr(), out.data_ptr(), t, self.hidden,
            self.intermediate, self.hq, self.hkv, self.head_dim, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
            tables.data_ptr(), tables.stride(0), lens.data_ptr(), k.shape[1], int(k.dtype == torch.bfloat16),
            self.eps, self.scale, None if lora is None else lora.data_ptr(),
            None if lora_slots is None else lora_slots.data_ptr(), cpu_native.threads())
        if rc != 0:
            raise MemoryError("the fused decode step could not allocate its scratch buffers")
        return out, residual
