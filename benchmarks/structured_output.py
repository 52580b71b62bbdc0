"""Structured-output cost: the engine workload with none, half and all requests under a JSON schema, plus grammar
compile time (cold and cached) for a realistic 30-field schema.

The constrained requests use benchmarks/schemas.py's records_list_schema (an array of at least 50 short records),
so every answer runs to max_tokens like the unconstrained ones (ignore_eos); generated tokens are counted per run.
Modes run in --repeat interleaved rounds in one process (this VM drifts 20-30% within minutes): tok/s is each
mode's best round, the ratio to unconstrained the median of within-round ratios. The time inside the grammar
(mask fill + apply, token accept) is measured per step too.

  python benchmarks/structured_output.py [--requests 32] [--max-tokens 128] [--repeat 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import statistics
import time

from rich.console import Console
from rich.table import Table

from benchmarks.common import add_workload_args, emit, machine, workload_engine, workload_prompts
from benchmarks.schemas import customer_record_schema, records_list_schema

console = Console()
MODES = ("none", "half", "all")  # half: every other request, so constrained and free rows share each step


class GrammarTimer:
    """Wraps the engine's Grammars to add up the time spent in mask fill/apply and token accept."""

    def __init__(self, grammars):
        self.g, self.seconds, self.steps = grammars, 0.0, 0
        self._apply, self._accept = grammars.apply_masks, grammars.accept
        grammars.apply_masks, grammars.accept = self.apply_masks, self.accept

    def apply_masks(self, logits, seqs):
        start = time.perf_counter()
        self._apply(logits, seqs)
        self.seconds += time.perf_counter() - start
        self.steps += any(s.matcher is not None for s in seqs)

    def accept(self, seq, token):
        start = time.perf_counter()
        ok = self._accept(seq, token)
        self.seconds += time.perf_counter() - start
        return ok


def compile_times(engine, repeat: int) -> tuple[float, float]:
    """(cold ms, cached ms) for the 30-field schema: cold = validation + xgrammar compile with nothing cached."""
    spec = {"type": "json_schema", "schema": customer_record_schema()}
    cold, cached = [], []
    for _ in range(repeat):
        engine.grammars._cache.clear()
        start = time.perf_counter()
        engine.grammars.compile(spec)
        cold.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        for _ in range(100):
            engine.grammars.compile(spec)
        cached.append((time.perf_counter() - start) * 1e3 / 100)
    return statistics.median(cold), statistics.median(cached)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds over the modes; best kept")
    args = ap.parse_args(argv)

    from serving.engine import SamplingParams

    engine = workload_engine(args, max_num_batched_tokens=2048)
    prompt_ids = [engine.tokenizer(p)["input_ids"] for p in workload_prompts(args.requests)]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured={"type": "json_schema", "schema": records_list_schema()})
    engine.check_request(prompt_ids[0], constrained)  # compiled before the rounds (compile has its own figures)
    engine.generate([prompt_ids[0]], [constrained])  # warm-up
    timer = GrammarTimer(engine.grammars)
    results = {"machine": machine(), "model": args.model, "dtype": str(engine.dtype), "requests": args.requests,
               "max_tokens": args.max_tokens, "repeat": args.repeat}
    rounds = {m: [] for m in MODES}
    tokens = {m: [] for m in MODES}
    grammar_ms = {m: [] for m in MODES}
    colds, cacheds = [], []
    for r in range(args.repeat):
        for mode in MODES:
            params = [constrained if mode == "all" or (mode == "half" and i % 2 == 0) else free
                      for i in range(args.requests)]
            timer.seconds, timer.steps = 0.0, 0
            with console.status(f"round {r + 1}/{args.repeat}: {mode} constrained"):
                start = time.perf_counter()
                outs = engine.generate(prompt_ids, params)
                elapsed = time.perf_counter() - start
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            for o, p in zip(outs, params):
                if p.structured is not None:
                    text = o.outputs[0].text
                    assert text.startswith('{"people": [{"name": "'), text[:60]
            rounds[mode].append(generated / elapsed)
            tokens[mode].append(generated)
            grammar_ms[mode].append(timer.seconds * 1e3 / max(timer.steps, 1))
            console.print(f"round {r + 1}: {mode:>4}: {rounds[mode][-1]:.1f} tok/s, {generated} tokens, "
                          f"grammar {grammar_ms[mode][-1]:.2f} ms/constrained step")
        cold, cached = compile_times(engine, 5)
        colds.append(cold)
        cacheds.append(cached)
        console.print(f"round {r + 1}: 30-field schema compile cold {cold:.1f} ms, cached {cached * 1e3:.1f} us")
    table = Table(title=f"structured output - {results['machine']}")
    for col in ("constrained", "best tok/s", "generated tokens", "vs none (median of rounds)", "per round",
                "grammar ms/step"):
        table.add_column(col)
    for mode in MODES:
        paired = [v / b for v, b in zip(rounds[mode], rounds["none"])]
        results.update({f"tok_s_{mode}": max(rounds[mode]), f"rounds_{mode}": rounds[mode],
                        f"tokens_{mode}": tokens[mode], f"ratio_{mode}": statistics.median(paired),
                        f"round_ratios_{mode}": paired, f"grammar_ms_per_step_{mode}": grammar_ms[mode]})
        table.add_row(mode, f"{max(rounds[mode]):.1f}", str(tokens[mode][0]), f"{statistics.median(paired):.2f}x",
                      " ".join(f"{p:.2f}" for p in paired),
                      f"{statistics.median(grammar_ms[mode]):.2f}" if mode != "none" else "-")
    console.print(table)
    results.update({"compile_cold_ms": statistics.median(colds), "compile_cached_ms": statistics.median(cacheds),
                    "rounds_compile_cold_ms": colds, "rounds_compile_cached_ms": cacheds,
                    "schema_fields": len(customer_record_schema()["properties"]),
                    "schema_bytes": len(json.dumps(customer_record_schema()))})
    console.print(f"30-field schema ({results['schema_bytes']} bytes): cold compile {results['compile_cold_ms']:.1f} ms, "
                  f"cached lookup {results['compile_cached_ms'] * 1e3:.1f} us (medians of rounds)")
    emit(results)


if __name__ == "__main__":
    main()
