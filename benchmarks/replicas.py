"""Prefix-aware replica choice against power-of-two choices, side by side, on 2 replicas each.

    python benchmarks/replicas.py [--rounds 3] [--requests 64] [--concurrency 8] [--out benchmarks/replicas.png]

One `loraplex serve` hosts the default model twice: `smol-prefix` (replica_choice: prefix) and `smol-pow2`
(replica_choice: pow2), 2 replicas each, one CPU thread per replica (the 2 cores a policy's replicas share), and
a KV cache per replica that holds about half of the workload's shared prefixes (so where a prefix goes decides
whether it is still cached). The workload is a support desk: 8 distinct long system prompts (~600 tokens), each
request one of them plus a short user question, 16 tokens out, streamed, `--concurrency` in flight. Rounds
alternate which policy runs first (this VM's speed drifts), each policy's replicas idle while the other runs.
Per policy: prefix-cache hit rate (cached / prompt tokens, from each response's usage), TTFT p50/p99 and tok/s.
Prints a table, writes a plot and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import _start_server, _stop_server, _wait_ready  # noqa: E402
from benchmarks.common import emit, machine  # noqa: E402

POLICIES = {"prefix": "smol-prefix", "pow2": "smol-pow2"}
NUM_PREFIXES, PREFIX_WORDS, MAX_TOKENS = 8, 420, 16
KV_CACHE = "112MiB"  # ~2.5k tokens of fp32 KV here: 4 of the 8 prefixes (~500 tokens each) and the working set
TOPICS = ("billing invoices refunds", "shipping parcels couriers", "passwords accounts logins", "printers ink paper",
          "mobile apps updates", "insurance claims forms", "travel bookings flights", "hardware laptops warranty")


def serve_config() -> str:
    models = "".join(f"""
  - name: {name}
    replica_choice: {policy}
    num_replicas: 2
    num_threads: 1
    max_model_len: 2048
    kv_cache_memory: {KV_CACHE}
    max_num_seqs: 16
    ray_actor_options: {{num_cpus: 0}}""" for policy, name in POLICIES.items())
    return f"""
models:{models}
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
governance: {{enabled: false}}
routes: {{}}
"""


def system_prompts() -> list[str]:
    """8 long system prompts that share nothing but their shape."""
    out = []
    for k, topic in enumerate(TOPICS):
        rng = random.Random(k)
        words = topic.split() + "customer policy answer ticket escalate polite brief check order account".split()
        body = " ".join(rng.choice(words) for _ in range(PREFIX_WORDS))
        out.append(f"Desk {k}: you are the {topic} assistant. Rules: {body}.")
    return out


def workload(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    systems = system_prompts()
    asks = "where is my when can I why does my how do I change cancel".split()
    return [[{"role": "system", "content": rng.choice(systems)},
             {"role": "user", "content": " ".join(rng.choice(asks) for _ in range(rng.randint(6, 14))) + "?"}]
            for _ in range(n)]


async def run_policy(base: str, model: str, requests: list[list[dict]], concurrency: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    ttfts, cached, prompt, tokens = [], 0, 0, 0

    async def one(client, messages):
        nonlocal cached, prompt, tokens
        async with sem:
            t0, first = time.perf_counter(), None
            body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if first is None and any(c["delta"].get("content") for c in event.get("choices", ())):
                        first = time.perf_counter() - t0
                    if event.get("usage"):
                        u = event["usage"]
                        prompt += u["prompt_tokens"]
                        tokens += u["completion_tokens"]
                        cached += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            ttfts.append(1000 * (first if first is not None else time.perf_counter() - t0))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, m) for m in requests))
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {"hit_rate": cached / max(1, prompt), "ttft_p50_ms": statistics.median(ttfts),
            "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], "tok_s": tokens / wall,
            "requests": len(requests)}


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("hit_rate", "prefix-cache hit rate"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
            ("tok_s", "tok/s"))
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.4))
    for ax, (key, title) in zip(axes, keys):
        vals = [results[p][key] for p in POLICIES]
        bars = ax.bar(list(POLICIES), vals, color=["tab:green", "tab:gray"])
        ax.bar_label(bars, fmt="%.2f" if key == "hit_rate" else "%.0f")
        ax.set_title(title)
    fig.suptitle(f"replica choice, 2 replicas, 8 shared prefixes; {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64, help="requests per policy per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).with_name("replicas.png")))
    args = ap.parse_args(argv)
    from rich.progress import Progress

    work = Path(tempfile.mkdtemp(prefix="replicas-bench-"))
    (work / "serve.yaml").write_text(serve_config())
    proc, base = _start_server(str(work / "serve.yaml"), work / "serve.log")
    rows: dict[str, list[dict]] = {p: [] for p in POLICIES}
    try:
        _wait_ready(base, proc, 900)
        with Progress() as progress:
            task = progress.add_task("rounds", total=args.rounds * len(POLICIES))
            for r in range(args.rounds):
                order = list(POLICIES) if r % 2 == 0 else list(reversed(POLICIES))
                requests = workload(args.requests, seed=r)
                for policy in order:
                    rows[policy].append(asyncio.run(run_policy(base, POLICIES[policy], requests, args.concurrency)))
                    progress.advance(task)
    finally:
        _stop_server(proc)
    results = {p: {k: statistics.median(row[k] for row in rs) for k in rs[0]} for p, rs in rows.items()}
    a, b = results["prefix"], results["pow2"]
    ratios = {"hit_rate": a["hit_rate"] / max(1e-9, b["hit_rate"]), "ttft_p50": a["ttft_p50_ms"] / b["ttft_p50_ms"],
              "ttft_p99": a["ttft_p99_ms"] / b["ttft_p99_ms"], "tok_s": a["tok_s"] / b["tok_s"]}
    print(f"{'policy':8} {'hit rate':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'tok/s':>8}")
    for p, v in results.items():
        print(f"{p:8} {v['hit_rate']:9.2f} {v['ttft_p50_ms']:8.0f}ms {v['ttft_p99_ms']:8.0f}ms {v['tok_s']:8.1f}")
    print("prefix/pow2: hit rate %.2fx, TTFT p50 %.2fx, p99 %.2fx, tok/s %.2fx" % tuple(ratios.values()))
    print(f"plot: {plot(results, Path(args.out))}")
    emit({"benchmark": "replicas", "machine": machine(), "rounds": args.rounds, "requests": args.requests,
          "concurrency": args.concurrency, "results": results, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
