"""Eval loss / perplexity, greedy sample generations, and merging an adapter into its base.

Used by the trainer (periodic eval, samples) and by `loraplex eval` / `loraplex merge`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from training.data import IGNORE, collate


def token_loss_sum(model, batch) -> tuple["torch.Tensor", int]:  # noqa: F821
    """Sum of next-token cross-entropy over labelled positions, and how many there were."""
    import torch.nn.functional as F

    shift_labels = batch["labels"][:, 1:]
    # the LM head runs only where some row has a label (answers are a fraction of the tokens)
    keep = (shift_labels != IGNORE).any(0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # use_cache=False: a cache would disable transformers' packed-sequence (block-diagonal) mask
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
    targets = shift_labels[:, keep]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


def evaluate(model, examples, *, batch_size: int, pad_id: int, device) -> dict:
    """Token-weighted eval loss and perplexity over examples (model put in eval mode, then restored)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
            loss, n = token_loss_sum(model, batch)
            total += float(loss)
            count += n
    if was_training:
        model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, device) -> list[str]:
    """Greedy completions of already-templated prompts, one at a time (no padding effects)."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return out


def sample_generations(model, tokenizer, prompts: list[str], *, max_new_tokens: int, device,
                       with_base: bool = True) -> list[dict]:
    """Adapter output for each prompt, and the base model's (adapter disabled) beside it."""
    rows = [{"prompt": p, "adapter": a} for p, a in
            zip(prompts, generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device))]
    if with_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device)
        for row, b in zip(rows, base):
            row["base"] = b
    return rows


def load_for_inference(source: str, base_model: str | None = None, *, device: str = "cpu"):
    """(model, tokenizer, info) for a base model name/folder/HF id or an adapter source (folder, models:/, runs:/)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.models import local_name, resolve_model
    from training.registry import adapter_base_model, is_adapter_uri, resolve_adapter_uri

    adapter_dir = None
    if is_adapter_uri(source):
        adapter_dir = resolve_adapter_uri(source)
        base_model = base_model or adapter_base_model(adapter_dir)
        if not base_model:
            raise ValueError(f"adapter {source!r} names no base model: pass --base-model")
    else:
        base_model = source
    base_path = resolve_model(local_name(base_model))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer, {"base_model": base_model, "base_path": base_path,
                              "adapter": str(adapter_dir) if adapter_dir else None}


def merge_adapter(source: str, output: str | Path, base_model: str | None = None) -> Path:
    """Merge a LoRA adapter into its base weights and save a plain HF model folder (with tokenizer)."""
    from training.registry import is_adapter_uri

    if not is_adapter_uri(source):
        raise ValueError(f"{source!r} is not an adapter (a folder with adapter_config.json, models:/ or runs:/)")
    model, tokenizer, info = load_for_inference(source, base_model)
    merged = model.merge_and_unload()
    output = Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    base = _repo_name(info)
    (output / "loraplex.json").write_text(json.dumps({"merged_from": info["adapter"], "base_model": info["base_model"],
                                                      "base_model_id": base}))
    # The Hub's model-card metadata for a merge: tools that read lineage (the Hub, vLLM's docs) look here.
    (output / "README.md").write_text(f"---\nbase_model: {base}\nbase_model_relation: merge\nlibrary_name: "
                                      f"transformers\n---\n\nMerged from a LoRA adapter onto {base} with "
                                      "`loraplex merge`.\n")
    return output


def _repo_name(info: dict) -> str:
    """The merged model's base as the adapter names it (a repo id), else the base folder's repo id, else as given."""
    from serving.identity import folder_hf_id, is_repo_id
    from training.registry import adapter_base_model

    declared = adapter_base_model(info["adapter"])
    if declared and is_repo_id(declared):
        return declared
    return folder_hf_id(info["base_path"]) or info["base_model"]
