"""What the HTTP path costs: TTFT and tok/s through `loraplex serve` (chat, completions, responses) against the
same engine in process, on the same prompts, rounds interleaved (this VM's speed drifts 20-30% in minutes).

    python benchmarks/gateway_overhead.py [--requests 16] [--max-tokens 64] [--rounds 3]

The server and the in-process engine never run at the same time: each round runs the in-process engine, then
each endpoint over HTTP, with the server idle in between. A second figure isolates the gateway's own code (the
request pipeline, output paths and SSE framing) with no model and no Ray: the real FastAPI app over a fake
deployment (serving.api.testing) that streams instantly, timed per request and per streamed token. Prints
tables, the HTTP/in-process ratios, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import _start_server, _stop_server, _wait_ready  # noqa: E402
from benchmarks.common import emit, machine, workload_prompts  # noqa: E402

MODEL = "smollm2-135m-instruct"
CONFIG = f"""
models:
  - name: {MODEL}
    max_model_len: 2048
    kv_cache_memory: 1GiB
    max_num_seqs: 64
    enable_prefix_caching: false
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
governance: {{enabled: false}}
routes: {{}}
"""


async def in_process(engine, tokenizer, prompts: list[str], max_tokens: int) -> dict:
    """Chat-templated prompts straight into the AsyncEngine: TTFT of each request and total tok/s."""
    from serving.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(p: str):
        ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=False), add_special_tokens=False)["input_ids"]
        t0, first, n = time.perf_counter(), None, 0
        async for out in engine.generate(ids, params):
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
            n = len(out.outputs[0].token_ids) if out.finished else n
        return first, max_tokens

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(p) for p in prompts))
    return _figures(res, time.perf_counter() - t0)


def _body(endpoint: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    common = {"model": MODEL, "temperature": 0, "stream": True}
    usage = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        return "/v1/chat/completions", {**common, **usage, "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": max_tokens}
    if endpoint == "completions":
        return "/v1/completions", {**common, **usage, "prompt": prompt, "max_tokens": max_tokens}
    # the Responses API has no ignore_eos: an answer may end early, so tokens are counted from its usage
    return "/v1/responses", {**common, "input": prompt, "max_output_tokens": max_tokens, "store": False}


async def over_http(base: str, endpoint: str, prompts: list[str], max_tokens: int) -> dict:
    import httpx

    async def one(client, p: str):
        path, body = _body(endpoint, p, max_tokens)
        t0, first, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", base + path, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and _has_text(event):
                    first = time.perf_counter() - t0
                u = event.get("usage") or (event.get("response") or {}).get("usage") or {}
                tokens = u.get("completion_tokens") or u.get("output_tokens") or tokens
        return first, tokens

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, p) for p in prompts))
        return _figures(res, time.perf_counter() - t0)


async def pipeline_alone(endpoint: str, requests: int, tokens: int) -> dict:
    """The gateway's own cost: `requests` concurrent streams of `tokens` one-token deltas through the real app
    over a fake deployment (no model, no Ray, no sockets)."""
    import httpx

    from serving.api.gateway import GatewayCore
    from serving.api.openai_routes import create_app
    from serving.api.testing import MODEL as FAKE, FakeDeployment
    from serving.config import parse_config

    cfg = parse_config({"models": [{"name": FAKE, "source": "acme/fake"}], "embeddings": {"enabled": False},
                        "rag": {"enabled": False}, "governance": {"enabled": False}})
    core = GatewayCore(cfg, {FAKE: FakeDeployment(lambda req: ["x"] * tokens)})
    core.deployments.ready.add(FAKE)
    transport = httpx.ASGITransport(app=create_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=600) as client:
        async def one(p):
            path, body = _body(endpoint, p, tokens)
            body["model"] = FAKE
            async with client.stream("POST", path, json=body) as r:
                async for _ in r.aiter_lines():
                    pass
        await one("warm")
        t0 = time.perf_counter()
        await asyncio.gather(*(one(f"p{i}") for i in range(requests)))
        wall = time.perf_counter() - t0
    return {"ms_per_request": 1000 * wall / requests, "us_per_token": 1e6 * wall / (requests * tokens)}


def _has_text(event: dict) -> bool:
    """Whether an SSE event carries generated text (chat, completions or Responses form)."""
    if event.get("type") == "response.output_text.delta":
        return bool(event.get("delta"))
    return any(c.get("text") or (c.get("delta") or {}).get("content") for c in event.get("choices") or [])


def _figures(res, wall: float) -> dict:
    ttfts = [r[0] for r in res if r[0] is not None]
    return {"tok_s": sum(r[1] for r in res) / wall, "ttft_ms": 1000 * statistics.median(ttfts), "wall_s": wall}


async def main_async(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    from serving.engine import EngineConfig
    from serving.engine.async_engine import AsyncEngine

    console = Console(stderr=True)
    prompts = workload_prompts(args.requests, seed=3)
    single = workload_prompts(1, 8, 12, seed=4)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-gw-"))
    (tmp / "serve.yaml").write_text(CONFIG)
    proc, base = _start_server(str(tmp / "serve.yaml"), tmp / "serve.log")
    endpoints = ["chat", "completions", "responses"]
    rows: dict[str, list[dict]] = {k: [] for k in ["in-process", *endpoints]}
    single_rows: dict[str, list[dict]] = {k: [] for k in rows}
    try:
        _wait_ready(base, proc, 600)
        engine = AsyncEngine(EngineConfig(model=MODEL, max_model_len=2048, kv_cache_memory="1GiB", max_num_seqs=64,
                                          enable_prefix_caching=False))
        tok = engine.tokenizer
        await in_process(engine, tok, single, 4)  # warm-up (kernels, first allocations)
        for e in endpoints:
            await over_http(base, e, single, 4)
        for rnd in range(args.rounds):
            console.print(f"round {rnd + 1}/{args.rounds}")
            rows["in-process"].append(await in_process(engine, tok, prompts, args.max_tokens))
            single_rows["in-process"].append(await in_process(engine, tok, single, 16))
            for e in endpoints:
                rows[e].append(await over_http(base, e, prompts, args.max_tokens))
                single_rows[e].append(await over_http(base, e, single, 16))
        engine.shutdown()
    finally:
        _stop_server(proc)

    def med(series, key):
        return statistics.median(r[key] for r in series)

    table = Table(title=f"HTTP vs in process, {args.requests} concurrent x {args.max_tokens} tokens "
                        f"({args.rounds} rounds, medians)")
    for col in ("path", "tok/s", "ratio", "TTFT 1 req (ms)", "+TTFT (ms)", "TTFT loaded (ms)"):
        table.add_column(col)
    ref_tok, ref_ttft = med(rows["in-process"], "tok_s"), med(single_rows["in-process"], "ttft_ms")
    result = {"benchmark": "gateway_overhead", "machine": machine(), "requests": args.requests,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "in_process_tok_s": round(ref_tok, 1),
              "in_process_ttft_ms": round(ref_ttft, 1)}
    for k in rows:
        tok_s, ttft1 = med(rows[k], "tok_s"), med(single_rows[k], "ttft_ms")
        ratios = [h["tok_s"] / i["tok_s"] for h, i in zip(rows[k], rows["in-process"])]
        table.add_row(k, f"{tok_s:.0f}", f"{statistics.median(ratios):.2f}x", f"{ttft1:.1f}",
                      f"{ttft1 - ref_ttft:+.1f}", f"{med(rows[k], 'ttft_ms'):.0f}")
        if k != "in-process":
            result[f"{k}_tok_s"] = round(tok_s, 1)
            result[f"{k}_ratio"] = round(statistics.median(ratios), 3)
            result[f"{k}_added_ttft_ms"] = round(ttft1 - ref_ttft, 1)
    result["rounds_detail"] = {k: [round(r["tok_s"], 1) for r in v] for k, v in rows.items()}
    console.print(table)
    alone = Table(title=f"the gateway's own code, no model and no Ray ({args.requests} concurrent x "
                        f"{args.max_tokens} one-token deltas)")
    for col in ("endpoint", "ms per request", "us per streamed token"):
        alone.add_column(col)
    for e in endpoints:
        fig = await pipeline_alone(e, args.requests, args.max_tokens)
        alone.add_row(e, f"{fig['ms_per_request']:.2f}", f"{fig['us_per_token']:.1f}")
        result[f"{e}_gateway_us_per_token"] = round(fig["us_per_token"], 1)
    console.print(alone)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    emit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
