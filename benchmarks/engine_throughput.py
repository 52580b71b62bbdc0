"""Engine throughput vs Hugging Face transformers on one workload.

32 requests, prompts of 8-200 words, 128 output tokens each, EOS ignored, greedy, through
(a) HF generate one request at a time, (b) HF generate in one padded static batch, (c) HF's own continuous
batching (generate_batch, attn_implementation="paged|sdpa"), (d) our engine. Prints output tokens/s for each
and the engine's ratios, then one JSON line.

Shared machines drift by 20-30% within minutes, so (b), (c) and (d) run --repeat rounds, interleaved: tokens/s
is each system's best round, and ratio_vs_best_hf the median over rounds of the engine against the best HF
figure of the same round (paired); (a) runs once (it is ~10x slower than the others, never the best HF figure).

  python benchmarks/engine_throughput.py [--requests 32] [--max-tokens 128] [--model smollm2-135m-instruct]
  # GPU, Llama-3.2-1B shapes with random weights (config only, no download; HF gets random weights of the same
  # config, which costs it the same per token), bf16 (the engine's default on CUDA):
  python benchmarks/engine_throughput.py --load-format dummy --model configs/models/llama-3.2-1b \
      --tokenizer smollm2-135m-instruct --dtype bfloat16 --kv-cache 8GiB
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
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_workload_args, emit, machine, workload_engine, workload_prompts

console = Console()


def make_engine(args):
    from serving.engine import SamplingParams

    engine = workload_engine(args, max_num_batched_tokens=args.batched_tokens)
    engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    return engine


def run_engine(engine, prompt_ids, max_tokens):
    from serving.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompt_ids, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def hf_model(path, dtype, device, dummy=False, attn=None):
    """HF's model for `path` on `device`; with dummy weights, random ones from the same config (same cost)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    if dummy:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_hf_sequential(model, prompt_ids, max_tokens):
    dev = model.device
    model.generate(torch.tensor([prompt_ids[0]], device=dev), max_new_tokens=2, do_sample=False, pad_token_id=0)
    sync(dev)
    tokens, start = 0, time.perf_counter()
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - len(ids)
    sync(dev)
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def run_hf_static(model, prompt_ids, max_tokens):
    dev = model.device
    width = max(len(i) for i in prompt_ids)
    ids = torch.tensor([[0] * (width - len(i)) + i for i in prompt_ids], device=dev)  # left padding
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in prompt_ids], device=dev)
    model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    sync(dev)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    sync(dev)
    return (out.shape[1] - width) * len(prompt_ids) / (time.perf_counter() - start)


def run_hf_continuous(model, prompt_ids, max_tokens):
    """No inference_mode here: generate_batch's worker thread updates tensors made on this one (5.17 fails)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=prompt_ids[:1], generation_config=GenerationConfig(
        max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0), progress_bar=False)  # warm-up
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompt_ids, generation_config=cfg, progress_bar=False)
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    sync(model.device)
    if tokens < len(prompt_ids) * max_tokens:
        raise RuntimeError(f"generate_batch returned {tokens} of {len(prompt_ids) * max_tokens} tokens")
    return tokens / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--batched-tokens", type=int, default=2048)
    ap.add_argument("--skip-hf", action="store_true", help="only measure the engine")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of the batched systems; best kept")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    engine = make_engine(args)
    prompt_ids = [engine.tokenizer(p)["input_ids"] for p in workload_prompts(args.requests)]
    results = {"machine": machine(), "requests": args.requests, "max_tokens": args.max_tokens, "model": args.model,
               "load_format": args.load_format, "repeat": args.repeat}
    run_hf = not args.skip_hf
    batched = [("engine_tok_s", lambda: run_engine(engine, prompt_ids, args.max_tokens))]
    if run_hf:  # HF in the engine's dtype on its device; with dummy weights, random ones of the same shapes
        dummy = args.load_format == "dummy"
        with console.status("loading the HF models"):
            plain = hf_model(engine.model_path, engine.dtype, engine.device, dummy)
            paged = hf_model(engine.model_path, engine.dtype, engine.device, dummy, attn="paged|sdpa")
        batched += [("hf_static_batch_tok_s", lambda: run_hf_static(plain, prompt_ids, args.max_tokens)),
                    ("hf_continuous_tok_s", lambda: run_hf_continuous(paged, prompt_ids, args.max_tokens))]
    rounds: dict[str, list[float]] = {key: [] for key, _ in batched}
    for r in range(args.repeat):
        for key, fn in batched:
            with console.status(f"round {r + 1}/{args.repeat}: {key}"):
                try:
                    rounds[key].append(fn())
                except Exception as exc:  # report, don't hide: the figure is missing, not zero
                    console.print(f"[red]{key} failed: {exc!r}")
            console.print(f"round {r + 1}: {key} {rounds[key][-1] if rounds[key] else None}")
    for key, values in rounds.items():
        results[key] = max(values) if values else None
        results[key.replace("_tok_s", "_rounds")] = values
    if run_hf:
        with console.status("hf_sequential_tok_s"):
            try:
                results["hf_sequential_tok_s"] = run_hf_sequential(plain, prompt_ids, args.max_tokens)
            except Exception as exc:
                console.print(f"[red]hf_sequential_tok_s failed: {exc!r}")
                results["hf_sequential_tok_s"] = None
        console.print(f"hf_sequential_tok_s: {results['hf_sequential_tok_s']}")
    console.print(f"engine: {results['engine_tok_s']:.1f} tok/s")
    if run_hf:
        hf = [v for k, v in results.items() if k.startswith("hf_") and k.endswith("_tok_s") and v]
        results["ratio_of_bests"] = results["engine_tok_s"] / max(hf) if hf else None
        # paired: each round's engine figure against that round's best HF figure, minutes apart
        paired = [e / max(h) for e, *h in zip(rounds["engine_tok_s"], *(rounds[k] for k in rounds if k != "engine_tok_s"))
                  if h and max(h)]
        results["round_ratios_vs_best_hf"] = paired
        results["ratio_vs_best_hf"] = statistics.median(paired) if paired else results["ratio_of_bests"]
        table = Table(title=f"output tokens/s - {results['machine']}")
        for col in ("system", "tok/s", "engine ratio"):
            table.add_column(col)
        for key in ("hf_sequential_tok_s", "hf_static_batch_tok_s", "hf_continuous_tok_s", "engine_tok_s"):
            v = results.get(key)
            table.add_row(key, f"{v:.1f}" if v else "-", f"{results['engine_tok_s'] / v:.2f}x" if v else "-")
        console.print(table)
        console.print(f"engine vs best HF, round by round: {' '.join(f'{r:.2f}x' for r in paired)}; "
                      f"median {results['ratio_vs_best_hf']:.2f}x")
    emit(results)


if __name__ == "__main__":
    main()
