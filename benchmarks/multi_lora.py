"""Multi-LoRA throughput: the engine workload with 0, 1, 8 and 32 distinct adapters (rank 16, all projections).

Every request of a run names one of the N adapters round-robin (N = 0: the base model), all in one batch.
Prints output tokens/s per N and the ratio to base-only, then one JSON line. Shared machines drift by 20-30%
within minutes, so the counts run in --repeat interleaved rounds: tokens/s is each count's best round, and
the ratio to base-only is the median over rounds of the ratio within a round (paired, minutes apart).

  python benchmarks/multi_lora.py [--requests 32] [--max-tokens 128] [--adapters 0,1,8,32] [--rank 16]
  # GPU, Llama-3.2-1B shapes with random weights (no download), bf16, Triton LoRA kernels:
  python benchmarks/multi_lora.py --load-format dummy --model configs/models/llama-3.2-1b \
      --tokenizer smollm2-135m-instruct
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, Python puts benchmarks/ first on sys.path, where kernels.py would shadow the `kernels` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_workload_args, emit, machine, workload_engine, workload_prompts

console = Console()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(base_path: str, n: int, rank: int, folder: str, device: torch.device) -> list[str]:
    """n random PEFT adapters (non-zero A and B) for the base model, written as PEFT does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path)
    with torch.device(device):  # a 1B base's random init takes seconds on a GPU, a minute on a CPU
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL))
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        path = f"{folder}/adapter-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--adapters", default="0,1,8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="adapter slots' dtype (the engine's lora_dtype); auto: the model's")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds over the adapter counts; best kept")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.adapters.split(",")]

    from serving.engine import SamplingParams

    engine = workload_engine(args, max_num_batched_tokens=2048, max_loras=max(counts + [1]), max_lora_rank=args.rank,
                             lora_dtype=args.lora_dtype)
    prompt_ids = [engine.tokenizer(p)["input_ids"] for p in workload_prompts(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {"machine": machine(), "model": args.model, "load_format": args.load_format, "dtype": str(engine.dtype),
               "requests": args.requests, "max_tokens": args.max_tokens, "rank": args.rank, "repeat": args.repeat,
               "lora_dtype": args.lora_dtype}
    with tempfile.TemporaryDirectory() as tmp:
        with console.status("writing adapters"):
            paths = write_adapters(engine.model_path, max(counts), args.rank, tmp, engine.device)
        for i, path in enumerate(paths):
            engine.add_lora(f"adapter-{i}", path)
        engine.generate([prompt_ids[0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        # Untimed, one token per request: every adapter into its slot before the rounds (a server's steady state;
        # adapter load times are their own metric), so round 1 does not also time 32 slot fills.
        with console.status("filling adapter slots"):
            engine.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=1),
                            lora_names=[f"adapter-{i % max(counts)}" for i in range(args.requests)]
                            if max(counts) else None)
        rounds: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.repeat):
            for n in counts:
                names = [f"adapter-{i % n}" if n else None for i in range(args.requests)]
                with console.status(f"round {r + 1}/{args.repeat}: {n} adapters"):
                    start = time.perf_counter()
                    outs = engine.generate(prompt_ids, params, lora_names=names)
                    elapsed = time.perf_counter() - start
                rounds[n].append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
                console.print(f"round {r + 1}: {n:>3} adapters: {rounds[n][-1]:.1f} tok/s")
        for n, values in rounds.items():
            results[f"tok_s_{n}_adapters"] = max(values)
            results[f"rounds_{n}_adapters"] = values
    table = Table(title=f"multi-LoRA throughput - {results['machine']}")
    for col in ("adapters", "best tok/s", "vs base-only (median of rounds)", "per round"):
        table.add_column(col)
    for n in counts:
        row = [str(n), f"{results[f'tok_s_{n}_adapters']:.1f}", "-", ""]
        if 0 in rounds:
            paired = [v / b for v, b in zip(rounds[n], rounds[0])]
            results[f"ratio_{n}_adapters"] = statistics.median(paired)
            results[f"round_ratios_{n}_adapters"] = paired
            row[2:] = [f"{statistics.median(paired):.2f}x", " ".join(f"{r:.2f}" for r in paired)]
        table.add_row(*row)
    console.print(table)
    emit(results)


if __name__ == "__main__":
    main()
