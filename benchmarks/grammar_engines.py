"""xgrammar vs llguidance on this machine: the measurement behind the engine's choice of grammar library.

For a realistic 30-field JSON schema (benchmarks/schemas.py) over SmolLM2's tokenizer (vocab 49152):
cold compile (a fresh compiler, nothing cached), a cached lookup (the library's own cache), and the per-step
mask fill for a batch of 16 constrained rows, each walking a valid instance at a different offset (serial and
with the library's thread pool). Rounds alternate between the libraries; each figure is the median of rounds.

  python benchmarks/grammar_engines.py [--rounds 5] [--rows 16] [--threads 2]
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

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import emit, machine
from benchmarks.schemas import customer_record_example, customer_record_schema

console = Console()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab, threads):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.cached = xgr.GrammarCompiler(self.info, max_threads=threads)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self.vocab = vocab

    def compile_cold(self, schema: str):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.batch_threads, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False)

    def compile_cached(self, schema: str):
        return self.cached.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def bitmask(self, rows):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill_serial(self, matchers, mask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)

    def fill_parallel(self, matchers, mask):
        self.batch.batch_fill_next_token_bitmask(matchers, mask)

    def accept(self, m, token):
        assert m.accept_token(token), token


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab, threads):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.cache: dict[str, str] = {}
        self.vocab = vocab

    def compile_cold(self, schema: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        matcher = self.llg.LLMatcher(self.tok, grammar)  # building the matcher is llguidance's compile step
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def compile_cached(self, schema: str):
        # llguidance has no compiled-grammar object to cache: a lookup still builds a matcher (its lexer is lazy)
        grammar = self.cache.get(schema)
        if grammar is None:
            grammar = self.cache[schema] = self.compile_cold(schema)
        return self.llg.LLMatcher(self.tok, grammar)

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tok, grammar)

    def bitmask(self, rows):
        return torch.full((rows, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill_serial(self, matchers, mask):
        for i, m in enumerate(matchers):
            self.llg.torch.fill_next_token_bitmask(m, mask, i)

    def fill_parallel(self, matchers, mask):
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)

    def accept(self, m, token):
        assert m.consume_token(token), m.get_error()


def time_ms(fn, repeat: int) -> float:
    best = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best.append((time.perf_counter() - start) * 1e3)
    return statistics.median(best)


def mask_fill_round(lib, grammar, tokens: list[int], rows: int, parallel: bool) -> float:
    """Mean ms per step to fill `rows` masks, rows offset along the instance so their states differ."""
    matchers = [lib.matcher(grammar) for _ in range(rows)]
    offsets = [i * len(tokens) // (2 * rows) for i in range(rows)]
    for m, off in zip(matchers, offsets):
        for t in tokens[:off]:
            lib.accept(m, t)
    steps = len(tokens) // 2
    mask = lib.bitmask(rows)
    fill = lib.fill_parallel if parallel else lib.fill_serial
    elapsed = 0.0
    for s in range(steps):
        start = time.perf_counter()
        fill(matchers, mask)
        elapsed += time.perf_counter() - start
        for m, off in zip(matchers, offsets):
            lib.accept(m, tokens[off + s])
    return elapsed / steps * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from serving.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    vocab = len(tokenizer)
    schema = json.dumps(customer_record_schema())
    tokens = tokenizer(json.dumps(customer_record_example()), add_special_tokens=False)["input_ids"]
    libs = []
    for cls in (XGrammar, LLGuidance):
        start = time.perf_counter()
        lib = cls(tokenizer, vocab, args.threads)
        lib.batch_threads = args.threads
        lib.tokenizer_s = time.perf_counter() - start
        libs.append(lib)
    figures = {lib.name: {"cold_ms": [], "cached_ms": [], "fill_serial_ms": [], "fill_parallel_ms": []}
               for lib in libs}
    for r in range(args.rounds):
        for lib in libs:
            f = figures[lib.name]
            f["cold_ms"].append(time_ms(lambda: lib.compile_cold(schema), 1))
            grammar = lib.compile_cached(schema)
            if lib.name == "llguidance":
                grammar = lib.cache[schema]
            f["cached_ms"].append(time_ms(lambda: lib.compile_cached(schema), 20))
            f["fill_serial_ms"].append(mask_fill_round(lib, grammar, tokens, args.rows, parallel=False))
            f["fill_parallel_ms"].append(mask_fill_round(lib, grammar, tokens, args.rows, parallel=True))
            console.print(f"round {r + 1} {lib.name}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in f.items()))
    results = {"machine": machine(), "model": args.model, "vocab": vocab, "rows": args.rows,
               "threads": args.threads, "rounds": args.rounds, "instance_tokens": len(tokens)}
    table = Table(title=f"grammar libraries, 30-field schema, {args.rows} rows - {results['machine']}")
    for col in ("library", "tokenizer setup s", "cold compile ms", "cached lookup ms", "fill serial ms/step",
                "fill threaded ms/step"):
        table.add_column(col)
    for lib in libs:
        f = figures[lib.name]
        med = {k: statistics.median(v) for k, v in f.items()}
        table.add_row(lib.name, f"{lib.tokenizer_s:.2f}", *(f"{med[k]:.3f}" for k in f))
        results[lib.name] = {"tokenizer_setup_s": lib.tokenizer_s, **{k: med[k] for k in med},
                             **{f"rounds_{k}": v for k, v in f.items()}}
    console.print(table)
    emit(results)


if __name__ == "__main__":
    main()
