"""Who a served base model is, and whether an adapter's declared base names it.

A model is known by its API name, its Hugging Face repo id (what PEFT, TRL, Axolotl and Unsloth write into an
adapter's `base_model_name_or_path`) and its `aliases` (vLLM's `served_model_name`). Every one of these is
accepted in a request's `model`. The adapter check (`check_base`) accepts an adapter whose base names any
identity (repo ids compared case-insensitively), or a local folder that holds this model; it refuses a repo id
that is none of them; a base it cannot place (a path that is not on this machine, a bare name) passes with a
warning, because the shapes are checked anyway and they are what decides whether the weights fit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_repo_id(text: str) -> bool:
    """'org/name' as the Hub spells repo ids (a relative path like ./x or a/b/c is not one)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text


def folder_hf_id(folder: str | Path) -> str | None:
    """The repo id a model folder says it holds: loraplex.json's `hf_id` (our converted default model) or
    config.json's `_name_or_path` where that is a repo id (what `save_pretrained` of a Hub model keeps)."""
    folder = Path(folder).expanduser()
    for name, key in (("loraplex.json", "hf_id"), ("config.json", "_name_or_path")):
        try:
            value = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and is_repo_id(value):
            return value
    return None


_SIGNATURE = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


def _signature(folder: str | Path) -> dict | None:
    """The architecture and sizes a model folder's config.json gives (None: no readable config)."""
    try:
        cfg = json.loads((Path(folder).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: cfg.get(k) for k in _SIGNATURE} if isinstance(cfg, dict) else None


@dataclass(frozen=True)
class BaseCheck:
    """The verdict on an adapter's declared base: ok, a warning (cannot place it), or a mismatch message."""

    ok: bool
    warning: str | None = None
    mismatch: str | None = None


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the API name
    hf_id: str | None = None  # the Hugging Face repo id, where known
    aliases: tuple[str, ...] = ()
    path: str | None = None  # the folder the weights were loaded from (replica side)
    extra: tuple[str, ...] = field(default=(), compare=False)  # other names it answered to before (source, folder)

    def names(self) -> list[str]:
        """API name, repo id, aliases: the names a request's `model` may use."""
        out: list[str] = []
        for n in (self.name, self.hf_id, *self.aliases):
            if n and n not in out:
                out.append(n)
        return out

    def matches(self, text: str) -> bool:
        low = text.lower()
        return any(n.lower() == low for n in (*self.names(), *self.extra))

    def _last_part_matches(self, text: str) -> bool:
        last = Path(text.rstrip("/\\")).name.lower()
        parts = {n.rsplit("/", 1)[-1].lower() for n in (*self.names(), *self.extra)}
        return bool(last) and last in parts

    def describe(self) -> str:
        return f"{self.name!r}" + (f" ({self.hf_id})" if self.hf_id and self.hf_id != self.name else "")

    def check_base(self, base: str | None) -> BaseCheck:
        """Does an adapter's `base_model_name_or_path` name this model? (Shapes are checked separately.)"""
        if not base:
            return BaseCheck(True, warning="the adapter names no base model; only its shapes were checked")
        if self.matches(base):
            return BaseCheck(True)
        folder = Path(base).expanduser()
        if _is_local_path(base) or folder.is_dir():
            if folder.is_dir():
                if self.path and folder.resolve() == Path(self.path).expanduser().resolve():
                    return BaseCheck(True)
                held = folder_hf_id(folder)
                if held is not None and self.matches(held):
                    return BaseCheck(True)
                if self._last_part_matches(base):
                    return BaseCheck(True)
                if held is not None:
                    return BaseCheck(False, mismatch=f"trained on {base!r}, a folder holding {held!r}, not on "
                                                     f"this model {self.describe()}")
                theirs, ours = _signature(folder), _signature(self.path) if self.path else None
                if theirs is not None and ours is not None and theirs != ours:
                    diff = next(k for k in _SIGNATURE if theirs[k] != ours[k])
                    return BaseCheck(False, mismatch=f"trained on {base!r}, a folder holding another model "
                                                     f"({diff} {theirs[diff]} where this model has {ours[diff]}), not on this "
                                                     f"model {self.describe()}")
                return BaseCheck(True, warning=f"base {base!r} is a folder that does not say which model it "
                                               "holds; only the adapter's shapes were checked")
            if self._last_part_matches(base):
                return BaseCheck(True)
            return BaseCheck(True, warning=f"base {base!r} is a path that is not on this server; only the "
                                           "adapter's shapes were checked")
        if is_repo_id(base):
            return BaseCheck(False, mismatch=f"trained on {base!r}, not on this model {self.describe()}")
        if self._last_part_matches(base):
            return BaseCheck(True)
        return BaseCheck(True, warning=f"base {base!r} names no model this server knows; only the adapter's "
                                       "shapes were checked")


def model_identity(name: str, source: str, hf_id: str | None = None, aliases=(),
                   path: str | None = None) -> ModelIdentity:
    """The identity of a served model from its config (and, on a replica, the folder it loaded)."""
    from serving.models import DEFAULT_MODEL

    if hf_id is None:
        if source == DEFAULT_MODEL:
            hf_id = DEFAULT_MODEL_HF_ID
        elif path is not None:
            hf_id = folder_hf_id(path) or (source if is_repo_id(source) and not Path(source).is_dir() else None)
        elif is_repo_id(source) and not Path(source).expanduser().is_dir():
            hf_id = source
        elif Path(source).expanduser().is_dir():
            hf_id = folder_hf_id(source)
    extra = tuple(n for n in (source if not _is_local_path(source) else None,
                              Path(path).name if path else None) if n)
    return ModelIdentity(name, hf_id, tuple(aliases), path, extra)


def system_fingerprint(identity: ModelIdentity, settings: dict) -> str:
    """OpenAI's `system_fingerprint`: a short hash of what decides outputs (model identity and weights' source,
    dtype, kernels, default seed, version), the same across restarts with the same config."""
    import hashlib

    from loraplex import __version__

    data = {"model": identity.name, "hf_id": identity.hf_id, "version": __version__, **settings}
    return "fp_" + hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
