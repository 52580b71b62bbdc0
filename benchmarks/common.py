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
