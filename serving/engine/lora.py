"""Multi-LoRA: PEFT adapters served on their base model without merging, many in one batch.

Adapters live in three places: known (registered name -> source), a host-memory LRU cache of loaded weights
(max_cpu_loras), and device slots (max_loras) seen per module as A [layers, slots, r_max, in] and
B [layers, slots, out, r_max] (rank-major [layers, slots, r_max, out] off Triton, see b_rank_major), in
lora_dtype. These are strided views of one buffer per module group (q/k/v, o, gate/up, down) in which each
(layer, slot) keeps the group's A and B side by side, in the order the kernels read them: a decode step then
reads each token's adapter as one sequential stream (CPU LoRA ~15% faster than separate buffers per module),
on huge pages on the CPU (host_memory). A sequence takes a slot when the scheduler admits it and gives it back
when it finishes or is preempted; a slot whose adapter has no running sequence is reused least-recently-used first.
Per step, every token carries its slot (-1 for the base), and the delta  y += scale * B[slot] @ A[slot] @ x
is added per target module through a kernels.LoRAGroup (C or torch on the CPU, Triton on CUDA), one call
for the modules sharing an input (q/k/v, gate/up). The scale is folded into B when a slot is filled.
Ranks below r_max are zero-padded; a step only computes up to the largest rank among its active slots, and
only over slots up to the highest active one (slots are filled lowest first).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels
from serving.engine import host_memory
from serving.engine.errors import AdapterError

log = logging.getLogger("loraplex.lora")

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KIND_MODULES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}


@dataclass
class LoRAWeights:
    name: str
    source: str
    rank: int
    scale: float
    base_model: str | None
    target_modules: list[str]
    a: dict[str, torch.Tensor]  # module -> [layers, r, in] (zeros for layers the adapter does not touch)
    b: dict[str, torch.Tensor]  # module -> [layers, out, r]
    warnings: list[str] = field(default_factory=list)  # e.g. a base the server could not place
    forced: bool = False  # loaded with force although its declared base names another model

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())


@dataclass
class AdapterInfo:
    name: str
    source: str
    state: str = "loading"  # loading, cpu, gpu (resident in a device slot), error
    rank: int | None = None
    base: str | None = None
    target_modules: list[str] = field(default_factory=list)
    load_time_s: float | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    forced: bool = False


def module_shapes(model) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA-targetable projection of our model."""
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    hidden = model.config.hidden_size
    return {"q_proj": (hidden, attn.q_size), "k_proj": (hidden, attn.kv_size), "v_proj": (hidden, attn.kv_size),
            "o_proj": (attn.q_size, hidden), "gate_proj": (hidden, mlp.intermediate),
            "up_proj": (hidden, mlp.intermediate), "down_proj": (mlp.intermediate, hidden)}


def load_peft_adapter(name: str, folder: str | Path, model, max_rank: int, identity,
                      force: bool = False) -> LoRAWeights:
    """Read and check a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) against our model.

    `identity` (serving.identity.ModelIdentity) judges the declared base; `force` loads an adapter whose base
    names another model. Shapes are always checked, whatever the name and `force`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: folder {folder} does not exist", param="source")
    for f in (cfg_file, weights_file):
        if not f.exists():
            raise AdapterError(f"adapter {name!r}: {f.name} missing in {folder}", param="source")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {exc}", param="source")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: only LoRA adapters are supported, got {cfg.get('peft_type')}")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(f"adapter {name!r}: {key} is not supported", param="source")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: LoRA bias {cfg['bias']!r} is not supported", param="source")
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    if not 0 < rank <= max_rank:
        raise AdapterError(f"adapter {name!r}: rank {rank} exceeds max_lora_rank {max_rank}", param="source")
    base = cfg.get("base_model_name_or_path")
    verdict = identity.check_base(base)
    warnings = [verdict.warning] if verdict.warning else []
    if not verdict.ok:
        if not force:
            raise AdapterError(f"adapter {name!r} was {verdict.mismatch}; if the weights are the same, load it "
                               'with "force": true', param="source", code="adapter_base_mismatch")
        warnings.append(f"loaded with force: {verdict.mismatch}")
    shapes = module_shapes(model)
    layers = len(model.layers)
    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # corrupt file
        raise AdapterError(f"adapter {name!r}: cannot read adapter_model.safetensors: {exc}", param="source")
    a = {m: torch.zeros(layers, rank, shapes[m][0]) for m in MODULES}
    b = {m: torch.zeros(layers, shapes[m][1], rank) for m in MODULES}
    seen: set[str] = set()
    for key, tensor in state.items():
        parts = key.split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            raise AdapterError(f"adapter {name!r}: unsupported weight {key!r}", param="source")
        try:
            layer = int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            raise AdapterError(f"adapter {name!r}: unsupported target {key!r} (only decoder-layer projections)",
                               param="source") from None
        module = next((p for p in parts if p in MODULES), None)
        if module is None or layer >= layers:
            raise AdapterError(f"adapter {name!r}: unsupported target module in {key!r}; supported are "
                               f"{', '.join(MODULES)}", param="source")
        which = "A" if "lora_A" in parts else "B"
        want = (rank, shapes[module][0]) if which == "A" else (shapes[module][1], rank)
        if tuple(tensor.shape) != want:
            raise AdapterError(f"adapter {name!r}: {key} has shape {tuple(tensor.shape)}, expected {want} "
                               "for this base model", param="source")
        (a if which == "A" else b)[module][layer] = tensor.float()
        seen.add(module)
    if not seen:
        raise AdapterError(f"adapter {name!r}: no LoRA weights found", param="source")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoRAWeights(name, str(folder), rank, scale, base, sorted(seen),
                       {m: a[m] for m in seen}, {m: b[m] for m in seen}, warnings, force and not verdict.ok)


class LoRAStep:
    """One step's LoRA: called by the model after each projection (layer, kind, input, output), and read by the
    fused decode step (c_table) where every group of the step runs in C."""

    def __init__(self, groups: list[dict], token_lora: torch.Tensor):
        self.groups, self.token_lora = groups, token_lora
        self._table: torch.Tensor | None | bool = False

    def __call__(self, layer: int, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        group = self.groups[layer].get(kind)
        if group is not None:
            group(x, self.token_lora, y)

    def c_table(self) -> torch.Tensor | None:
        """[layers, 4] int64: each layer's qkv, o, gate_up and down group rows for lp_decode_layers (0: none), or
        None where some group would not run in C this step (the per-op path runs then)."""
        if self._table is False:
            rows = [[self._c_row(layer.get(kind)) for kind in KIND_MODULES] for layer in self.groups]
            self._table = None if None in sum(rows, []) else torch.tensor(rows, dtype=torch.int64)
        return self._table

    def _c_row(self, group) -> int | None:
        if group is None:
            return 0
        row = group.c_group(self.token_lora) if hasattr(group, "c_group") else 0
        return row or None

    @property
    def slots(self) -> torch.Tensor:
        """The step's per-token slots as int32, as the C kernels read them."""
        return self.token_lora.to(torch.int32).contiguous()


class LoRAManager:
    def __init__(self, model, max_loras: int, max_rank: int, max_cpu_loras: int, identity,
                 dtype: torch.dtype | None = None):
        self.model = model
        self.max_loras, self.max_rank, self.max_cpu = max_loras, max_rank, max_cpu_loras
        self.identity = identity  # serving.identity.ModelIdentity: judges adapters' declared bases
        self.shapes = module_shapes(model)
        self.out_columns: dict[str, slice] = {}  # each module's columns in its fused projection (q|k|v, gate|up)
        for names in KIND_MODULES.values():
            offset = 0
            for m in names:
                self.out_columns[m] = slice(offset, offset + self.shapes[m][1])
                offset += self.shapes[m][1]
        self.layers = len(model.layers)
        p = next(model.parameters())
        self.dtype, self.device = dtype or p.dtype, p.device  # the slots' dtype (lora_dtype), else the model's
        self.info: dict[str, AdapterInfo] = {}
        self.cpu: OrderedDict[str, LoRAWeights] = OrderedDict()
        self.slot_name: list[str | None] = [None] * max_loras
        self.slot_refs = [0] * max_loras
        self.slot_rank = [0] * max_loras
        self.slot_used: list[float] = [0.0] * max_loras
        self.slot_modules: list[set[str]] = [set() for _ in range(max_loras)]
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        # Off the Triton kernels (which read B out-major), B is stored rank-major [layers, slots, r_max, out] and
        # passed as a transposed view: the CPU C kernel's expand then streams whole rows (y += t[k] * B^T[k]).
        self.b_rank_major = kernels.backend_for(self.device) == "torch"
        self._groups: dict[tuple, kernels.LoRAGroup] = {}
        self.lock = threading.Lock()  # guards info/cpu for readers outside the engine thread
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    # ---- registry ----------------------------------------------------------------------------------
    def load(self, name: str, folder: str | Path, force: bool = False) -> LoRAWeights:
        """Read an adapter from disk (any thread; no engine state touched)."""
        weights = load_peft_adapter(name, folder, self.model, self.max_rank, self.identity, force)
        for w in weights.warnings:
            log.warning("adapter %s: %s", name, w)
        return weights

    def reserve(self, name: str, source: str, force: bool = False) -> None:
        """Claim `name` (state "loading") before reading files; a name in use is refused. Pair with register
        on success, unregister on failure."""
        with self.lock:
            if name in self.info:
                raise AdapterError(f"an adapter named {name!r} already exists", param="name", code="adapter_exists")
            self.info[name] = AdapterInfo(name, str(source), forced=force)

    def register(self, weights: LoRAWeights, load_time_s: float | None = None) -> AdapterInfo:
        with self.lock:
            self.cpu[weights.name] = weights
            self.cpu.move_to_end(weights.name)
            while len(self.cpu) > self.max_cpu:
                old, _ = self.cpu.popitem(last=False)
                if old in self.info and old not in self.slot_name:
                    self.info[old].state = "disk"
            info = self.info.setdefault(weights.name, AdapterInfo(weights.name, weights.source))
            info.state, info.rank, info.base = "cpu", weights.rank, weights.base_model
            info.target_modules, info.load_time_s, info.source = weights.target_modules, load_time_s, weights.source
            info.warnings, info.forced = list(weights.warnings), weights.forced
            return info

    def unregister(self, name: str) -> None:
        with self.lock:
            self.info.pop(name, None)
            self.cpu.pop(name, None)
        for slot, n in enumerate(self.slot_name):
            if n == name and self.slot_refs[slot] == 0:
                self._clear_slot(slot)

    def known(self, name: str) -> bool:
        return name in self.info and self.info[name].state != "loading"

    def list(self) -> list[AdapterInfo]:
        with self.lock:
            return [AdapterInfo(**vars(i)) for i in self.info.values()]

    # ---- device slots ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _ensure_buffers(self) -> None:
        if self.a:
            return
        layers, slots, r = self.layers, self.max_loras, self.max_rank
        for names in KIND_MODULES.values():
            width = sum(r * sum(self.shapes[m]) for m in names)  # one (layer, slot): A_m, B_m for each module m
            buf = host_memory.zeros(layers * slots * width, self.dtype, self.device)
            offset = 0
            for m in names:
                fin, fout = self.shapes[m]
                self.a[m] = buf.as_strided((layers, slots, r, fin), (slots * width, width, fin, 1), offset)
                offset += r * fin
                b_shape, b_strides = ((r, fout), (fout, 1)) if self.b_rank_major else ((fout, r), (r, 1))
                self.b[m] = buf.as_strided((layers, slots, *b_shape), (slots * width, width, *b_strides), offset)
                offset += r * fout

    @torch.inference_mode()
    def _clear_slot(self, slot: int) -> None:
        r = self.slot_rank[slot]
        for m in self.slot_modules[slot]:
            self.a[m][:, slot, :r].zero_()
            self._b_ranks(self.b[m][:, slot], r).zero_()
        name = self.slot_name[slot]
        if name in self.info:
            self.info[name].state = "cpu" if name in self.cpu else "disk"
        self.slot_name[slot], self.slot_rank[slot], self.slot_modules[slot] = None, 0, set()

    def _weights(self, name: str) -> LoRAWeights:
        weights = self.cpu.get(name)
        if weights is None:  # evicted from host memory: read it again from its source
            weights = self.load(name, self.info[name].source, force=self.info[name].forced)
            self.register(weights, self.info[name].load_time_s)
        self.cpu.move_to_end(name)
        return weights

    @torch.inference_mode()
    def acquire(self, name: str) -> int | None:
        """A device slot holding `name` (loaded now if needed), or None when every slot is busy."""
        if name in self.slot_name:
            slot = self.slot_name.index(name)
        else:
            free = [s for s in range(self.max_loras) if self.slot_refs[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: (self.slot_name[s] is not None, self.slot_used[s]))
            self._ensure_buffers()
            if self.slot_name[slot] is not None:
                self._clear_slot(slot)
            w = self._weights(name)
            for m in w.target_modules:
                self.a[m][:, slot, :w.rank].copy_(w.a[m])
                self._b_ranks(self.b[m][:, slot], w.rank).copy_(w.b[m] * w.scale)  # the scale folded into B once
            self.slot_name[slot], self.slot_rank[slot], self.slot_modules[slot] = name, w.rank, set(w.target_modules)
            self.info[name].state = "gpu"
        self.slot_refs[slot] += 1
        self.slot_used[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        self.slot_refs[slot] -= 1
        name = self.slot_name[slot]
        if self.slot_refs[slot] == 0 and name is not None and name not in self.info:
            self._clear_slot(slot)  # unregistered while in use

    # ---- per step ----------------------------------------------------------------------------------
    def prepare_batch(self, out):
        """The per-token slot vector for this step and the function the model calls after each projection."""
        token_slots: list[int] = []
        for s in out.prefills:
            token_slots += [s.seq.lora_slot] * s.num_tokens
        token_slots += [s.seq.lora_slot for s in out.decodes]
        active = {s for s in token_slots if s >= 0}
        if not active:
            return None
        for s in out.prefills + out.decodes:
            if s.seq.lora_name:
                self.tokens[s.seq.lora_name] = self.tokens.get(s.seq.lora_name, 0) + s.num_tokens
        token_lora = torch.tensor(token_slots, dtype=torch.int32, device=self.device)
        r = max(self.slot_rank[s] for s in active)
        n = max(active) + 1  # slots past the highest active one hold nothing this step needs
        modules = set().union(*(self.slot_modules[s] for s in active))
        present = {kind: tuple(m for m in names if m in modules) for kind, names in KIND_MODULES.items()}
        groups = [{kind: self._group(layer, names, n, r) for kind, names in present.items() if names}
                  for layer in range(self.layers)]
        return LoRAStep(groups, token_lora)

    def _b_ranks(self, b: torch.Tensor, r: int) -> torch.Tensor:
        """The first r ranks of (part of) a B buffer as [..., out, r], whichever layout it is stored in."""
        return b[..., :r, :].transpose(-1, -2) if self.b_rank_major else b[..., :r]

    def _group(self, layer: int, modules: tuple[str, ...], n: int, r: int) -> kernels.LoRAGroup:
        """The kernels' LoRA group for a layer's modules over slots :n and ranks :r, kept across steps (views of
        the slot buffers stay valid when slots are refilled in place; binding them anew each step cost ~3% of a
        decode step, and the C group's per-call path is what keeps 120 calls a step cheap)."""
        key = (layer, modules, n, r)
        group = self._groups.get(key)
        if group is None:
            group = kernels.lora_group([self.a[m][layer, :n, :r] for m in modules],
                                       [self._b_ranks(self.b[m][layer, :n], r) for m in modules],
                                       [self.out_columns[m] for m in modules])
            if len(self._groups) > 4096:  # (n, r) rarely change; bound it anyway
                self._groups.clear()
            self._groups[key] = group
        return group
