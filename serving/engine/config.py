"""Engine configuration: one model, its KV-cache budget, batching limits and LoRA slots."""

from __future__ import annotations

import re
from dataclasses import dataclass

from serving.engine.errors import ModelLoadError

QUANTIZATIONS = ("int8", "int4")  # CPU weight-only formats (serving.engine.linear)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(value: int | str) -> int:
    """'512MiB', '2GiB', '1.5G' or a plain integer of bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB or 2GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].upper()])


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"  # our default name, an HF id or a local folder
    served_name: str | None = None  # name in the API; defaults to `model`
    hf_id: str | None = None  # the weights' Hugging Face repo id; None: found from the source (serving.identity)
    aliases: tuple[str, ...] = ()  # more names the model answers to (adapter base checks, the API's `model`)
    tokenizer: str | None = None  # defaults to the model's folder
    dtype: str = "auto"  # auto (llm_engine.auto_dtype: bf16 where fast, else fp32), float32, bfloat16, float16
    quantization: str | None = None  # CPU weight-only int8 or int4 (serving.engine.linear); None: dense weights
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    num_threads: int | None = None  # CPU threads for torch and our C kernels; None: torch's (OMP_NUM_THREADS)
    load_format: str = "auto"  # auto (safetensors/bin) or dummy (random weights at the config's shapes)
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | str = "1GiB"  # KV budget; the number of blocks follows from it
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set (tests force preemption with it)
    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 1024  # per-step token budget (chunked prefill)
    max_waiting: int = 1024  # queued requests beyond this get EngineOverloadedError (HTTP 429)
    enable_prefix_caching: bool = True
    seed: int = 0
    enable_lora: bool = True  # slot buffers are allocated on the first adapter, so this costs nothing unused
    max_loras: int = 8  # adapters resident in device slots at once
    max_lora_rank: int = 64
    max_cpu_loras: int = 64  # adapters kept in host memory (LRU)
    lora_dtype: str = "auto"  # adapter slots' dtype: auto (the model's), float32, bfloat16, float16 (vLLM's lora_dtype)
    kernels: str = "auto"  # auto (Triton on CUDA, C kernels on fp32 CPU, else torch), torch, triton
    decode_buckets: bool = False  # decode steps padded to batch-size buckets, persistent inputs (decode_buckets.py)
    cuda_graphs: bool = False  # capture each bucket's decode step as a CUDA graph (CUDA only; implies the buckets)
    max_grammar_bytes: int = 65536  # largest structured-output spec (its JSON) a request may send
    # After a step that gave a streamed request its first token, the loop thread sleeps this long (at most
    # once per FIRST_TOKEN_PAUSE_EVERY_S) so the serving path on the same cores sends it before the next step
    # takes them; None: 4 on the CPU, 0 on CUDA (serving.engine.async_engine)
    first_token_pause_ms: float | None = None
    grammar_cache_size: int = 256  # compiled grammars kept (LRU)

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ModelLoadError(f"block_size must be a power of two, got {self.block_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ModelLoadError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ModelLoadError(f"num_threads must be at least 1, got {self.num_threads}")
        if self.quantization in ("", "none"):
            self.quantization = None
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ModelLoadError(f"quantization must be int8, int4 or none, got {self.quantization!r}")
        for key in ("dtype", "lora_dtype"):
            if getattr(self, key) not in ("auto", "float32", "bfloat16", "float16"):
                raise ModelLoadError(f"{key} must be auto, float32, bfloat16 or float16, got {getattr(self, key)!r}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ModelLoadError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_grammar_bytes <= 0 or self.grammar_cache_size <= 0:
            raise ModelLoadError("max_grammar_bytes and grammar_cache_size must be positive")
        self.kv_cache_bytes = parse_bytes(self.kv_cache_memory)

    @property
    def name(self) -> str:
        return self.served_name or self.model
