"""The Llama-family forward (Llama, Mistral, Qwen2, Qwen3) over a packed batch of tokens with a paged KV cache.

Tokens of all scheduled sequences are packed into one [T, hidden] tensor, prefill chunks first, decodes after,
so every projection is one matmul for the whole batch; only attention is split (paged prefill / paged decode).
q/k/v and gate/up are fused into single matmuls; LoRA deltas (if any) are added per target slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

import kernels
from serving.engine.linear import BF16Linear, PackedLinear, cpu_linear


@dataclass
class ArchSpec:
    """What differs between the supported architectures."""

    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE


@dataclass
class ForwardBatch:
    """Per-step inputs. Packed order: all prefill tokens (sequence by sequence), then one token per decode."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: block * block_size + offset where each token's KV goes
    num_prefill_tokens: int
    prefill_cu_seqlens: torch.Tensor  # [Sp+1] int32
    prefill_block_tables: torch.Tensor  # [Sp, MB] int32
    prefill_seq_lens: torch.Tensor  # [Sp] int32 (context incl. this chunk)
    decode_block_tables: torch.Tensor  # [Sd, MB] int32
    decode_seq_lens: torch.Tensor  # [Sd] int32
    logits_indices: torch.Tensor  # [S_sample] long: rows of the packed batch to compute logits for
    lora: object | None = None  # serving.engine.lora.LoRABatch, per-token adapter slots
    prefill_from_start: bool = False  # every prefill chunk starts at position 0: attend to the fresh K/V directly
    max_decode_seq_len: int | None = None  # a bound on decode_seq_lens: saves a device sync (CUDA graphs need it)
    extra: dict = field(default_factory=dict)


class RMSNorm(nn.Module):
    """RMSNorm; given the residual stream too, it first adds x into it in place (one fused pass on the CPU)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x) without a residual; (norm(residual + x), residual + x) with one."""
        out, h = kernels.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, h)


class Attention(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        bias = spec.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=bool(getattr(cfg, "attention_bias", False)))
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if spec.qk_norm else None

    def forward(self, x, cos, sin, batch: ForwardBatch, k_cache, v_cache, lora_apply):
        qkv = self.qkv_proj(x)
        if lora_apply is not None:
            lora_apply(self.layer_idx, "qkv", x, qkv)
        t, hq = x.shape[0], self.num_heads
        # q and k heads side by side, so RoPE is one set of element-wise ops for both
        qk = qkv[:, :self.q_size + self.kv_size].reshape(t, hq + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :hq]), self.k_norm(qk[:, hq:])], dim=1)
        qk = kernels.rotary(qk, cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]
        # Write this step's KV into the paged cache, then attend over the cache.
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty((t, hq, self.head_dim), dtype=q.dtype, device=q.device)
        n_pre = batch.num_prefill_tokens
        if n_pre and batch.prefill_from_start:  # no earlier context: no cache gather needed
            out[:n_pre] = kernels.prefill_attention(q[:n_pre], k[:n_pre], v[:n_pre], batch.prefill_cu_seqlens,
                                                    batch.prefill_cu_seqlens, self.scale)
        elif n_pre:
            out[:n_pre] = kernels.paged_prefill_attention(
                q[:n_pre], k_cache, v_cache, batch.prefill_block_tables, batch.prefill_cu_seqlens,
                batch.prefill_seq_lens, self.scale)
        if n_pre < t:
            out[n_pre:] = kernels.paged_decode_attention(
                q[n_pre:], k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, self.scale,
                batch.max_decode_seq_len)
        out = out.reshape(t, self.q_size)
        y = self.o_proj(out)
        if lora_apply is not None:
            lora_apply(self.layer_idx, "o", out, y)
        return y


class MLP(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.intermediate = cfg.intermediate_size
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x, lora_apply):
        gu = self.gate_up_proj(x)
        if lora_apply is not None:
            lora_apply(self.layer_idx, "gate_up", x, gu)
        h = kernels.silu_and_mul(gu)
        y = self.down_proj(h)
        if lora_apply is not None:
            lora_apply(self.layer_idx, "down", h, y)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx)

    def forward(self, x, residual, cos, sin, batch, k_cache, v_cache, lora_apply):
        """(sublayer output, residual stream): the residual add is fused into the next norm (as vLLM does);
        the first layer starts the stream (residual None)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, cos, sin, batch, k_cache, v_cache, lora_apply)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h, lora_apply), residual


class CausalLM(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, inv_freq: torch.Tensor, attention_scaling: float, max_len: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_dtype: torch.dtype | None = None  # float32 once pack_linears ran; else the weights' dtype
        self.fused = None  # serving.engine.fused_decode.FusedDecode once bf16/int8 projections are packed; None: per op
        self.prefill_as_decode = False  # short prefills as decode rows (set with the fused path; forward)
        self.set_rope(inv_freq, attention_scaling, max_len)

    def set_rope(self, inv_freq: torch.Tensor, attention_scaling: float, max_len: int) -> None:
        """cos/sin for every position, computed as HF does (float32 positions * inv_freq), kept in float32."""
        freqs = torch.arange(max_len, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("rope_sin", emb.sin() * attention_scaling, persistent=False)

    def pack_linears(self, dtype: torch.dtype = torch.float32, quantization: str | None = None) -> bool:
        """Swap every projection and the LM head for its CPU form (serving.engine.linear) after loading:
        float32 or bfloat16 packed for oneDNN, or int8/int4 weight-only. The embedding table is kept in `dtype`
        (it is only indexed); activations stay float32."""
        if not PackedLinear.supported(self.embed_tokens.weight):
            return False
        try:
            for layer in self.layers:
                for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                     (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                    lin = getattr(parent, name)
                    setattr(parent, name, cpu_linear(lin.weight, lin.bias, dtype, quantization))
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            self.lm_head = cpu_linear(weight, None, dtype, quantization)  # a copy when the weights are tied
        except RuntimeError:  # a torch build whose oneDNN cannot pack: layers not yet swapped stay plain
            if dtype != torch.float32 or quantization:
                raise
            return False
        self.embed_tokens.to(dtype)
        self.activation_dtype = torch.float32
        from serving.engine.fused_decode import FusedDecode

        self.fused = FusedDecode.build(self)  # None unless every projection is C-backed bf16 or int8
        self.prefill_as_decode = self.fused is not None
        return True

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], lora_apply=None):
        """Returns logits [len(logits_indices), vocab] in float32. On a model with a fused step, a short prefill
        runs as decode rows (serving.engine.fused_decode.as_decode_rows), on the fused step or per op alike."""
        if self.prefill_as_decode and batch.num_prefill_tokens and batch.input_ids.shape[0] <= BF16Linear.GEMV_ROWS:
            from serving.engine.fused_decode import as_decode_rows

            batch = as_decode_rows(batch)
        x = self.embed_tokens(batch.input_ids).to(self.activation_dtype or self.embed_tokens.weight.dtype)
        cos = self.rope_cos[batch.positions].to(x.dtype)
        sin = self.rope_sin[batch.positions].to(x.dtype)
        if self.fused is not None and self.fused.usable(batch, kv_caches, lora_apply):
            x, residual = self.fused.run(x, cos, sin, batch, kv_caches, lora_apply)
        else:
            residual = None
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, cos, sin, batch, k_cache, v_cache, lora_apply)
        idx = batch.logits_indices
        h, _ = self.norm(x[idx], residual[idx])
        return self.logits(h).float()
