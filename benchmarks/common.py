"""Shared helpers for benchmark scripts: the machine description, the standard workload, result records."""

from __future__ import annotations

import json
import os
import platform
import random

import torch

WORDS = ("the model serves many requests at once while the cache keeps every key and value in blocks "
         "so that memory is shared fairly and nothing is wasted on padding or copies between steps").split()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def workload_prompts(n: int, min_words: int = 8, max_words: int = 200, seed: int = 0) -> list[str]:
    """n prompts of min_words..max_words words, the same for every system under test."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object of its figures."""
    print(json.dumps(result, sort_keys=True))


def add_workload_args(ap) -> None:
    """The engine workload's options, shared by engine_throughput.py and multi_lora.py."""
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tokenizer", default=None, help="tokenizer source when the model folder has none")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="dummy: random weights from the model's config (benchmarks at real shapes, no download)")
    ap.add_argument("--kv-cache", default="2GiB")


def workload_engine(args, **config):
    """An engine for the workload options (prefix caching off: a repeated round must not hit the last one's)."""
    from serving.engine import EngineConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.models import resolve_model

    return LLMEngine(EngineConfig(model=args.model, tokenizer=resolve_model(args.tokenizer) if args.tokenizer else None,
                                  dtype=args.dtype, load_format=args.load_format, kv_cache_memory=args.kv_cache,
                                  max_num_seqs=max(64, args.requests), enable_prefix_caching=False, **config))
