"""Per-step memo for the torch (CPU) paths: plans that depend only on a step's index tensors (block tables,
sequence lengths, per-token LoRA slots) are built once per forward pass and reused by every layer.

A plan is keyed by the identity, storage and version counter of its input tensors, and the inputs are held
so their ids cannot be reused while the entry lives. Inference-mode tensors have no version counter: inputs
must not be changed in place between calls (the engine builds fresh index tensors every step).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")
_entries: dict[str, tuple] = {}


def _key(tensors: tuple[torch.Tensor, ...], extra: tuple) -> tuple:
    return tuple((id(t), t.data_ptr(), None if t.is_inference() else t._version) for t in tensors) + extra


def cached(kind: str, tensors: tuple[torch.Tensor, ...], build: Callable[[], T], extra: tuple = ()) -> T:
    """build() once per distinct (tensors, extra); the last plan of each kind is kept."""
    key = _key(tensors, extra)
    entry = _entries.get(kind)
    if entry is None or entry[0] != key:
        entry = (key, build(), tensors)
        _entries[kind] = entry
    return entry[1]
