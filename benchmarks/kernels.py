"""Kernels against their torch references: paged decode / prefill attention, multi-LoRA, top-k scoring.

    python benchmarks/kernels.py [--only decode,prefill,paged_prefill,lora,topk] [--quick] [--repeats 10]
                                 [--device auto|cpu|cuda] [--interpret] [--peak-gbps 3350]

Prints time, achieved GB/s (bytes each kernel must move, over its time) and, on a GPU, the fraction of its
peak memory bandwidth; scoring is also timed against torch.topk(q @ k.T) and FAISS IndexFlatIP, LoRA against
a per-adapter torch loop. On the CPU only the torch references are timed; with --interpret the Triton kernels
run once on small shapes under TRITON_INTERPRET=1 as a correctness check (the interpreter is not timed).
Ends with one JSON line. H100 targets: decode >= 60% of peak at 4k contexts x batch 64, LoRA shrink+expand
>= 3x the per-adapter loop with 32 adapters, topk_scores (n=1M, d=384, k=10) >= 2x torch.topk(q @ k.T).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder would shadow the `kernels` package with this very module.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import emit, machine  # noqa: E402
from kernels import cpu_attention, cpu_native, ref_attention, ref_lora, ref_topk  # noqa: E402

console = Console(stderr=True)

# GB/s of HBM / DRAM, matched in order against torch.cuda.get_device_name().
PEAK_GBPS = [("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0),
             ("A100 80GB", 2000.0), ("A100-SXM4-80GB", 2000.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0)]
KERNELS = ("decode", "prefill", "paged_prefill", "lora", "topk")


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- workloads: (inputs, bytes moved, flops)

def paged_kv(num_seqs, ctx, hkv, d, block_size, dtype, device, gen_seed=0):
    torch.manual_seed(gen_seed)
    nblocks = (ctx + block_size - 1) // block_size
    total = num_seqs * nblocks
    k = torch.randn(total, block_size, hkv, d, dtype=dtype, device=device)
    v = torch.randn(total, block_size, hkv, d, dtype=dtype, device=device)
    tables = torch.randperm(total, device=device).view(num_seqs, nblocks).to(torch.int32)
    return k, v, tables


def decode_case(a, device, dtype):
    s, ctx, hq, hkv, d = a.batch, a.context, 32, 8, 128
    k, v, bt = paged_kv(s, ctx, hkv, d, 16, dtype, device)
    q = torch.randn(s, hq, d, dtype=dtype, device=device)
    lens = torch.full((s,), ctx, dtype=torch.int32, device=device)
    size = dtype.itemsize
    moved = 2 * s * ctx * hkv * d * size + 2 * q.numel() * size + bt.numel() * 4
    return (q, k, v, bt, lens, d ** -0.5), moved, 4 * s * hq * ctx * d


def prefill_case(a, device, dtype):
    seqs, lq, hq, hkv, d = a.prefill_seqs, a.prefill_len, 32, 8, 128
    q = torch.randn(seqs * lq, hq, d, dtype=dtype, device=device)
    k = torch.randn(seqs * lq, hkv, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    cu = torch.arange(0, seqs * lq + 1, lq, dtype=torch.int32, device=device)
    moved = (2 * q.numel() + 2 * k.numel()) * dtype.itemsize
    return (q, k, v, cu, cu, d ** -0.5, True), moved, 2 * seqs * lq * lq * hq * d  # causal: half of 4*lq^2


def paged_prefill_case(a, device, dtype):
    seqs, lq, ctx, hq, hkv, d = a.prefill_seqs, a.prefill_len // 2, a.prefill_len * 2, 32, 8, 128
    k, v, bt = paged_kv(seqs, ctx, hkv, d, 16, dtype, device)
    q = torch.randn(seqs * lq, hq, d, dtype=dtype, device=device)
    cu = torch.arange(0, seqs * lq + 1, lq, dtype=torch.int32, device=device)
    lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
    moved = (2 * q.numel() + 2 * seqs * ctx * hkv * d) * dtype.itemsize
    flops = 4 * seqs * lq * (ctx - lq / 2) * hq * d
    return (q, k, v, bt, cu, lens, d ** -0.5), moved, flops


def lora_case(a, device, dtype):
    t, h, slots, r = a.lora_tokens, a.lora_hidden, a.lora_slots, 16
    torch.manual_seed(0)
    x = torch.randn(t, h, dtype=dtype, device=device)
    la = torch.randn(slots, r, h, dtype=dtype, device=device) / h ** 0.5
    lb = torch.randn(slots, h, r, dtype=dtype, device=device) / r ** 0.5
    token_lora = torch.randint(-1, slots, (t,), dtype=torch.int32, device=device)
    y = torch.zeros(t, h, dtype=dtype, device=device)
    size = dtype.itemsize
    moved = (x.numel() + la.numel() + lb.numel() + 2 * y.numel() + 2 * t * r) * size
    return (x, la, lb, token_lora, y), moved, 4 * t * h * r


def per_adapter_loop(x, la, lb, token_lora, y, scale=0.5):
    """The baseline the LoRA target is set against: one masked matmul pair per adapter."""
    for s in range(la.shape[0]):
        rows = token_lora == s
        y[rows] += ((x[rows] @ la[s].t()) * scale) @ lb[s].t()
    return y


def topk_case(a, device, dtype):
    torch.manual_seed(0)
    keys = torch.randn(a.topk_n, a.topk_dim, dtype=dtype, device=device)
    queries = torch.randn(a.topk_queries, a.topk_dim, dtype=dtype, device=device)
    moved = (keys.numel() + queries.numel()) * dtype.itemsize
    return (queries, keys), moved, 2 * a.topk_n * a.topk_dim * a.topk_queries


# ---------------------------------------------------------------- runners

def impls(kind, triton_mod, device, dtype):
    """name -> callable(inputs) for each implementation of `kind` (triton only where it may be timed; the CPU's
    C decode kernel for float32 CPU tensors where it builds)."""
    out = {}
    if kind == "decode":
        out["torch-ref"] = lambda i: ref_attention.paged_decode_attention(*i)
        if device.type == "cpu" and dtype == torch.float32 and cpu_native.available():
            out["c-cpu"] = lambda i: cpu_attention.paged_decode_attention(*i)
        if triton_mod:
            out["triton"] = lambda i: triton_mod.paged_decode_attention(*i)
    elif kind == "prefill":
        out["torch-ref"] = lambda i: ref_attention.prefill_attention(*i)
        if triton_mod:
            out["triton"] = lambda i: triton_mod.prefill_attention(*i)
    elif kind == "paged_prefill":
        out["torch-ref"] = lambda i: ref_attention.paged_prefill_attention(*i)
        if triton_mod:
            out["triton"] = lambda i: triton_mod.paged_prefill_attention(*i)
    elif kind == "lora":
        out["per-adapter-loop"] = lambda i: per_adapter_loop(*i)
        out["torch-ref"] = lambda i: ref_lora.lora_expand(ref_lora.lora_shrink(i[0], i[1], i[3], 0.5), i[2], i[3], i[4])
        if triton_mod:
            def fused(i):
                seg = triton_mod.slot_segments(i[3], i[1].shape[0])
                t = triton_mod.lora_shrink(i[0], i[1], i[3], 0.5, segments=seg)
                return triton_mod.lora_expand(t, i[2], i[3], i[4], segments=seg)
            out["triton"] = fused
    elif kind == "topk":
        k = ARGS.topk_k
        out["torch.topk(q@k.T)"] = lambda i: torch.topk(i[0].float() @ i[1].float().t(), k, dim=1) \
            if i[0].device.type == "cpu" else torch.topk(i[0] @ i[1].t(), k, dim=1)
        out["torch-ref"] = lambda i: ref_topk.topk_scores(i[0], i[1], k)
        out["faiss-IndexFlatIP"] = "faiss"
        if triton_mod:
            out["triton"] = lambda i: triton_mod.topk_scores(i[0], i[1], k)
    return out


def faiss_runner(inputs, k):
    import faiss

    index = faiss.IndexFlatIP(inputs[1].shape[1])
    index.add(inputs[1].float().cpu().numpy())
    queries = inputs[0].float().cpu().numpy()
    return lambda _: index.search(queries, k)


def interpret_check(kind, triton_mod) -> float:
    """Max abs difference between the interpreted Triton kernel and the reference on a small case."""
    torch.manual_seed(1)
    if kind in ("decode", "paged_prefill"):
        k, v, bt = paged_kv(3, 40, 2, 64, 16, torch.float32, "cpu")
        lens = torch.tensor([40, 1, 17], dtype=torch.int32)
        if kind == "decode":
            q = torch.randn(3, 4, 64)
            args = (q, k, v, bt, lens, 0.125)
            return (triton_mod.paged_decode_attention(*args, partition_size=16)
                    - ref_attention.paged_decode_attention(*args)).abs().max().item()
        q = torch.randn(13, 4, 64)
        args = (q, k, v, bt, torch.tensor([0, 8, 9, 13], dtype=torch.int32), lens, 0.125)
        return (triton_mod.paged_prefill_attention(*args) - ref_attention.paged_prefill_attention(*args)).abs().max().item()
    if kind == "prefill":
        q, k, v = torch.randn(20, 4, 64), torch.randn(30, 2, 64), torch.randn(30, 2, 64)
        args = (q, k, v, torch.tensor([0, 1, 20], dtype=torch.int32), torch.tensor([0, 5, 30], dtype=torch.int32), 0.125)
        return (triton_mod.prefill_attention(*args) - ref_attention.prefill_attention(*args)).abs().max().item()
    if kind == "lora":
        x, la, lb = torch.randn(20, 32), torch.randn(4, 16, 32), torch.randn(4, 48, 16)
        tl_ = torch.randint(-1, 4, (20,), dtype=torch.int32)
        got = triton_mod.lora_expand(triton_mod.lora_shrink(x, la, tl_, 0.5), lb, tl_, torch.zeros(20, 48))
        exp = ref_lora.lora_expand(ref_lora.lora_shrink(x, la, tl_, 0.5), lb, tl_, torch.zeros(20, 48))
        return (got - exp).abs().max().item()
    q, keys = torch.randn(4, 48), torch.randn(300, 48)
    return (triton_mod.topk_scores(q, keys, 10)[0] - ref_topk.topk_scores(q, keys, 10)[0]).abs().max().item()


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--interpret", action="store_true",
                   help="on the CPU, check the Triton kernels under TRITON_INTERPRET=1 (not timed)")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth when not in the table")
    for name, gpu, cpu in [("batch", 64, 8), ("context", 4096, 1024), ("prefill-seqs", 8, 2),
                           ("prefill-len", 1024, 256), ("lora-tokens", 4096, 512), ("lora-hidden", 4096, 1024),
                           ("lora-slots", 32, 32), ("topk-n", 1_000_000, 200_000), ("topk-dim", 384, 384),
                           ("topk-queries", 64, 16), ("topk-k", 10, 10)]:
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {gpu} on CUDA, {cpu} on CPU")
        DEFAULTS[name.replace("-", "_")] = (gpu, cpu)
    a = ARGS = p.parse_args(argv)
    only = [k.strip() for k in a.only.split(",") if k.strip()]
    bad = [k for k in only if k not in KERNELS]
    if bad:
        p.error(f"--only: unknown kernel(s) {', '.join(bad)}; choose from {', '.join(KERNELS)}")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    on_gpu = device.type == "cuda"
    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(a, key) is None:
            value = gpu if on_gpu else cpu
            if a.quick and key in ("context", "topk_n", "lora_tokens", "prefill_len"):
                value = max(value // 8, 64)
            setattr(a, key, value)
    repeats = a.repeats or (3 if a.quick else (20 if on_gpu else 5))
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if on_gpu else torch.float32)
    peak = peak_gbps(device, a.peak_gbps)
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else None

    if a.interpret and not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    triton_mods = {}
    if on_gpu or a.interpret:
        from kernels.testing import triton_module

        mod_kind = {"decode": "attention", "prefill": "attention", "paged_prefill": "attention", "lora": "lora",
                    "topk": "topk"}
        triton_mods = {k: triton_module(mod_kind[k]) for k in only}

    rows, figures = [], {}
    for kind in only:
        console.log(f"[bold]{kind}[/]: building inputs")
        inputs, moved, flops = globals()[f"{kind}_case"](a, device, dtype)
        runners = impls(kind, triton_mods.get(kind) if on_gpu else None, device, dtype)
        figures[kind] = {"bytes": moved}
        for name, fn in runners.items():
            if fn == "faiss":
                try:
                    fn = faiss_runner(inputs, a.topk_k)
                except ImportError:
                    rows.append((kind, name, {"note": "faiss not installed (pip install faiss-cpu)"}))
                    continue
            console.log(f"  {kind} / {name}: timing {repeats} runs")
            fresh = inputs
            if kind == "lora":  # expand adds into y in place; time it on its own buffer
                fresh = (*inputs[:4], inputs[4].clone())
            sec = timed(lambda: fn(fresh), device, repeats, warmup=1 if name == "per-adapter-loop" else 2)
            gbps = moved / sec / 1e9
            entry = {"ms": round(sec * 1e3, 4), "gbps": round(gbps, 2), "tflops": round(flops / sec / 1e12, 3)}
            if peak:
                entry["frac_peak"] = round(gbps / peak, 4)
            figures[kind][name] = entry
            rows.append((kind, name, entry))
        if kind in triton_mods and not on_gpu:
            err = interpret_check(kind, triton_mods[kind])
            figures[kind]["triton-interpreter"] = {"max_abs_err_vs_ref": err, "timed": False}
            rows.append((kind, "triton (interpreter)", {"note": f"checked, not timed: max|err| {err:.1e}"}))
        elif not on_gpu:
            rows.append((kind, "triton", {"note": "not run on CPU (--interpret checks it)"}))
        base = "per-adapter-loop" if kind == "lora" else ("torch.topk(q@k.T)" if kind == "topk" else "torch-ref")
        for name, entry in figures[kind].items():
            if isinstance(entry, dict) and "ms" in entry and name != base:
                entry[f"speedup_vs_{base}"] = round(figures[kind][base]["ms"] / entry["ms"], 3)

    table = Table(title=f"kernels on {gpu_name or 'CPU'} ({dtype}, peak {peak or 'unknown'} GB/s)")
    for col in ("kernel", "impl", "ms", "GB/s", "% peak", "TFLOP/s", "speedup", "note"):
        table.add_column(col)
    for kind, name, e in rows:
        speed = next((f"{v:.2f}x" for k, v in e.items() if k.startswith("speedup")), "")
        table.add_row(kind, name, str(e.get("ms", "")), str(e.get("gbps", "")),
                      f"{100 * e['frac_peak']:.1f}" if "frac_peak" in e else "", str(e.get("tflops", "")), speed,
                      e.get("note", ""))
    Console(width=150).print(table)

    result = {"benchmark": "kernels", "machine": machine(), "device": gpu_name or "cpu", "dtype": str(dtype),
              "peak_gbps": peak, "shapes": {k: getattr(a, k) for k in DEFAULTS}, "repeats": repeats,
              "kernels": figures}
    if on_gpu:
        tri = lambda k: figures.get(k, {}).get("triton", {})
        result["targets"] = {
            "decode_frac_peak>=0.6": tri("decode").get("frac_peak", 0) >= 0.6 if "decode" in figures else None,
            "lora_vs_loop>=3x": tri("lora").get("speedup_vs_per-adapter-loop", 0) >= 3 if "lora" in figures else None,
            "topk_vs_torch>=2x": tri("topk").get("speedup_vs_torch.topk(q@k.T)", 0) >= 2 if "topk" in figures else None,
        }
    emit(result)
    return 0


DEFAULTS: dict[str, tuple[int, int]] = {}
ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())
