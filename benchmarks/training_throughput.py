"""Training throughput: loraplex's LoRA recipe against a plain HF Trainer + PEFT loop, same model, same data.

Both train the same LoRA (same rank, targets, batch size, learning rate) on the same tokenised examples
(the shipped acme dataset by default). Each runs in its own child process so its peak memory is its own
(peak RSS on CPU, peak CUDA allocation on a GPU). Tokens/s counts the non-padding tokens of the steps after
the warm-up steps. Prints a table, then one JSON line.

  python benchmarks/training_throughput.py [--steps 12] [--warmup 2] [--batch-size 4] [--tiny]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACME = REPO / "configs" / "train" / "data" / "acme_support.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _config(args, model: str, out: str):
    from training.config import validate_config

    return validate_config({
        "base_model": model, "datasets": [{"path": args.data, "type": "chat"}], "max_steps": args.steps,
        "micro_batch_size": args.batch_size, "learning_rate": 1e-3, "lr_scheduler": "constant",
        "lora_r": args.rank, "lora_alpha": 2 * args.rank, "lora_target_modules": TARGETS,
        "sequence_len": args.seq_len, "seed": 0, "output_dir": out, "num_sample_generations": 0,
        "mlflow_experiment": "bench-training", "bf16": "auto",
    })


def run_ours(args, model: str, queue) -> None:
    from training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        steps = []

        def on_event(level, message, data):
            if "step_tokens" in data:
                steps.append((data["step"], data["step_tokens"], data["step_time_s"]))

        train(_config(args, model, f"{tmp}/out"), on_event=on_event, progress=True)
    timed = [s for s in steps if s[0] > args.warmup]
    queue.put({"tokens_per_s": sum(s[1] for s in timed) / sum(s[2] for s in timed), "peak_mib": _peak_mib(),
               "steps": len(steps)})


def run_hf(args, model: str, queue) -> None:
    """The reference: transformers.Trainer + peft.get_peft_model over the same examples."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from serving.models import resolve_model
    from training.trainer import prepare_data

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    rows, *_ = prepare_data(_config(args, model, "/tmp/unused"), tok)
    ds = Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels, "attention_mask": [1] * len(r.input_ids)}
                            for r in rows])
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, lora)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    batch_tokens: list[int] = []

    def counting_collator(features):
        batch = collate(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                  learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1000,
                                  save_strategy="no", report_to=[], seed=0, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                                  dataloader_num_workers=0, remove_unused_columns=False)
        Trainer(model=peft_model, args=targs, train_dataset=ds, data_collator=counting_collator,
                callbacks=[Timer()]).train()
    # the dataloader may prefetch one batch ahead: step k used batch k
    timed = [(batch_tokens[i], times[i]) for i in range(len(times)) if i + 1 > args.warmup]
    queue.put({"tokens_per_s": sum(t for t, _ in timed) / sum(d for _, d in timed), "peak_mib": _peak_mib(),
               "steps": len(times)})


def _child(fn, args, model):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(args, model, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from benchmarks.common import emit, machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (a quick smoke run)")
    p.add_argument("--data", default=str(ACME))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    console = Console(stderr=True)
    model = args.model
    tmp = None
    if args.tiny:
        from training.testing import make_tiny_llama

        tmp = tempfile.TemporaryDirectory()
        model = make_tiny_llama(Path(tmp.name) / "tiny")
    console.print(f"[bold]loraplex trainer[/] ({args.steps} steps)")
    ours = _child(run_ours, args, model)
    console.print(f"[bold]HF Trainer + PEFT[/] ({args.steps} steps)")
    hf = _child(run_hf, args, model)
    table = Table(title=f"LoRA training on {'tiny random Llama' if args.tiny else args.model}")
    for col in ("", "tokens/s", "peak memory MiB"):
        table.add_column(col)
    table.add_row("loraplex", f"{ours['tokens_per_s']:.1f}", f"{ours['peak_mib']:.0f}")
    table.add_row("HF Trainer + PEFT", f"{hf['tokens_per_s']:.1f}", f"{hf['peak_mib']:.0f}")
    console.print(table)
    emit({"benchmark": "training_throughput", "machine": machine(), "model": "tiny" if args.tiny else args.model,
          "steps": args.steps, "warmup_steps": args.warmup, "batch_size": args.batch_size, "rank": args.rank,
          "ours_tokens_per_s": round(ours["tokens_per_s"], 2), "hf_tokens_per_s": round(hf["tokens_per_s"], 2),
          "speedup_vs_hf": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
          "ours_peak_mib": round(ours["peak_mib"], 1), "hf_peak_mib": round(hf["peak_mib"], 1),
          "peak_memory": "cuda max_memory_allocated" if _cuda() else "process peak RSS"})
    if tmp:
        tmp.cleanup()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
