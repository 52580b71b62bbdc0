"""Routing policies vs always-the-largest and round-robin on a mixed workload over three simulated deployments.

In-process discrete-event simulation: each deployment has a concurrency limit (slots), a waiting queue (429
beyond it), a fixed TTFT overhead, a prefill speed and a time per output token; one deployment has an outage
window (500s). The real Router (decide + run_with_fallback + SignalTracker fed by stats polls and finished
requests) picks for the routing strategies; every strategy sees the same seeded request stream.

    python benchmarks/routing.py [--rate 6] [--duration 120] [--slo-ms 5000] [--ttft-slo-ms 1500] [--out DIR]

Prints one JSON line: per strategy cost per 1k requests, SLO attainment, p50/p95 latency, errors, mix.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from serving.router import (
    SLO,
    CandidateServerError,
    NoCandidateAvailable,
    RouteContextOverflow,
    Router,
    SignalTracker,
    parse_routes,
)
from serving.router.errors import CandidateOverloaded

# Three deployments: a small model on a cheap old GPU (cheapest, slow per token), a mid model on a fast GPU
# (quick, dearer), a large model bought per token from a vendor (best quality, dearest).
DEPLOYMENTS = {
    "small-1b": dict(ttft_base_s=0.1, prefill_tok_s=2000, tpot_s=0.03, slots=16, max_waiting=64,
                     price=dict(gpu_hour_usd=0.4, input_tok_s=8000, output_tok_s=800), quality=0.55,
                     context_length=8192),
    "mid-8b": dict(ttft_base_s=0.03, prefill_tok_s=10000, tpot_s=0.01, slots=16, max_waiting=64,
                   price=dict(gpu_hour_usd=4.0, input_tok_s=40000, output_tok_s=2000), quality=0.72,
                   context_length=32768),
    "large-70b": dict(ttft_base_s=0.2, prefill_tok_s=3000, tpot_s=0.025, slots=12, max_waiting=64,
                      price=dict(input_per_1m=0.6, output_per_1m=2.4), quality=0.9, context_length=32768),
}
LARGEST = "large-70b"
ROUTER_POLICIES = ("cheapest", "fastest", "balanced", "slo")
BASELINES = ("always-largest", "round-robin")


@dataclass
class Req:
    id: int
    arrival: float
    prompt: int
    max_tokens: int
    out: int  # tokens it will actually generate (<= max_tokens)
    floor: float | None  # quality floor of premium requests


def workload(rate: float, duration: float, seed: int) -> list[Req]:
    """Poisson arrivals; 60% chat, 25% long-context (RAG), 15% premium chat with a quality floor of 0.7."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        kind = rng.random()
        if kind < 0.60:
            prompt, mx, floor = rng.randint(50, 400), 128, None
        elif kind < 0.85:
            prompt, mx, floor = rng.randint(1500, 6000), 256, None
        else:
            prompt, mx, floor = rng.randint(100, 800), 192, 0.7
        out.append(Req(len(out), t, prompt, mx, max(1, int(mx * rng.uniform(0.3, 1.0))), floor))


@dataclass
class Dep:
    name: str
    spec: dict
    outage: tuple[float, float] | None = None
    running: int = 0
    queue: deque = field(default_factory=deque)

    def stats(self) -> dict:
        return {"num_running": self.running, "num_waiting": len(self.queue),
                "kv_usage": self.running / self.spec["slots"], "max_num_seqs": self.spec["slots"]}


class Simulation:
    def __init__(self, strategy: str, reqs: list[Req], args):
        self.strategy, self.reqs, self.args = strategy, reqs, args
        self.now = 0.0
        self.events: list = []
        self.seq = 0
        outage = (args.duration * 0.3, args.duration * 0.45) if args.outage else None
        self.deps = {n: Dep(n, s, outage if n == "mid-8b" else None) for n, s in DEPLOYMENTS.items()}
        routes = parse_routes({"mixed": {"policy": "balanced", "slo": self.slo.model_dump(exclude_none=True),
                                         "candidates": [
                                             {"model": n, **s["price"], "quality": s["quality"],
                                              "context_length": s["context_length"]}
                                             for n, s in DEPLOYMENTS.items()]}})
        from prometheus_client import CollectorRegistry

        self.tracker = SignalTracker(alpha=0.2, error_cooldown_s=2.0, clock=lambda: self.now)
        self.router = Router(routes, self.tracker, registry=CollectorRegistry(), clock=lambda: self.now)
        self.cands = {c.model: c for c in routes["mixed"].candidates}
        self.rr = 0
        self.records: list[dict] = []
        self.decide_s, self.decisions = 0.0, 0

    @property
    def slo(self) -> SLO:
        return SLO(ttft_ms=self.args.ttft_slo_ms, e2e_ms=self.args.slo_ms)

    def push(self, t, kind, payload):
        heapq.heappush(self.events, (t, self.seq, kind, payload))
        self.seq += 1

    # a deployment admitting a request: raises like a real one would (500 in an outage, 429 when full)
    async def admit(self, req: Req, cand):
        dep = self.deps[cand.deployment_name]
        if dep.outage and dep.outage[0] <= self.now < dep.outage[1]:
            raise CandidateServerError(f"{dep.name} is down")
        if dep.running >= dep.spec["slots"] and len(dep.queue) >= dep.spec["max_waiting"]:
            raise CandidateOverloaded(f"{dep.name} queue full", retry_after=0.5)
        if dep.running < dep.spec["slots"]:
            self.start(dep, req)
        else:
            dep.queue.append(req)
        return dep.name

    def start(self, dep: Dep, req: Req):
        dep.running += 1
        s = dep.spec
        prefill = s["ttft_base_s"] + req.prompt / s["prefill_tok_s"]
        ttft = self.now + prefill
        self.push(ttft + (req.out - 1) * s["tpot_s"], "finish", (dep.name, req, self.now, ttft))

    def order(self, req: Req):
        if self.strategy == "always-largest":
            return [self.cands[LARGEST]]
        if self.strategy == "round-robin":
            names = list(self.cands)
            self.rr = (self.rr + 1) % len(names)
            return [self.cands[names[(self.rr + i) % len(names)]] for i in range(len(names))]
        return None

    def arrive(self, req: Req):
        route = {"route": "mixed", "model": None, "error": None, "fallbacks": 0, "req": req}
        fixed = self.order(req)
        if fixed is not None:  # baselines: a fixed order, fallback along it
            for i, cand in enumerate(fixed):
                try:
                    route["model"] = _run_sync(self.admit(req, cand))
                    route["fallbacks"] = i
                    break
                except (CandidateServerError, CandidateOverloaded):
                    continue
            else:
                route["error"] = "unavailable"
        else:
            for dep in self.deps.values():  # a stats poll just before the decision
                self.tracker.observe_stats(dep.name, dep.stats())
            policy = self.strategy
            try:
                t0 = time.perf_counter()
                decision = self.router.decide("mixed", req.prompt, req.max_tokens, policy=policy,
                                              slo_ms=self.slo if policy == "slo" else None, quality_floor=req.floor)
                self.decide_s += time.perf_counter() - t0
                self.decisions += 1
                res = _run_sync(self.router.run_with_fallback(decision, lambda c: self.admit(req, c)))
                route["model"], route["fallbacks"] = res.result, len(res.attempts)
            except (NoCandidateAvailable, RouteContextOverflow) as exc:
                route["error"] = type(exc).__name__
        if route["error"]:
            self.records.append({**route, "ttft": None, "e2e": None, "cost": 0.0})

    def finish(self, dep_name: str, req: Req, started: float, first: float):
        dep = self.deps[dep_name]
        dep.running -= 1
        if dep.queue:
            self.start(dep, dep.queue.popleft())
        ttft, e2e = first - req.arrival, self.now - req.arrival
        cand = self.cands[dep_name]
        self.tracker.observe_request(dep_name, ttft_s=ttft, prompt_tokens=req.prompt, completion_tokens=req.out,
                                     e2e_s=e2e, queue_s=started - req.arrival)
        self.records.append({"req": req, "model": dep_name, "error": None, "ttft": ttft, "e2e": e2e,
                             "cost": cand.price.cost(req.prompt, req.out), "quality": cand.quality})

    def run(self) -> dict:
        for r in self.reqs:
            self.push(r.arrival, "arrive", r)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(payload)
            else:
                self.finish(*payload)
        return self.summary()

    def summary(self) -> dict:
        recs, n = self.records, len(self.records)
        ok = [r for r in recs if r["error"] is None]
        slo = self.slo
        met = sum(1 for r in ok if r["ttft"] * 1000 <= slo.ttft_ms and r["e2e"] * 1000 <= slo.e2e_ms)
        e2e = sorted(r["e2e"] for r in ok)
        ttft = sorted(r["ttft"] for r in ok)
        violations = sum(1 for r in ok if r["req"].floor is not None and r["quality"] < r["req"].floor)
        return {
            "requests": n,
            "errors": n - len(ok),
            "cost_per_1k_usd": round(sum(r["cost"] for r in ok) / max(1, len(ok)) * 1000, 4),
            "slo_attainment": round(met / max(1, n), 4),  # failed requests count as misses
            "p50_ms": round(_pct(e2e, 50) * 1000, 1),
            "p95_ms": round(_pct(e2e, 95) * 1000, 1),
            "ttft_p95_ms": round(_pct(ttft, 95) * 1000, 1),
            "mean_quality": round(sum(r["quality"] for r in ok) / max(1, len(ok)), 4),
            "quality_floor_violations": violations,
            "mix": dict(sorted(Counter(r["model"] for r in ok).items())),
        }


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _run_sync(coro):
    """Drive a coroutine that never suspends (the simulated calls answer at once) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a simulated call suspended")


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["#4c72b0" if n not in BASELINES else "#999999" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [results[n]["cost_per_1k_usd"] for n in names], color=colors)
    axes[0].set_title("cost per 1k requests (USD)")
    axes[1].bar(names, [100 * results[n]["slo_attainment"] for n in names], color=colors)
    axes[1].set_title(f"SLO attainment % (TTFT<={args.ttft_slo_ms:.0f} ms, e2e<={args.slo_ms:.0f} ms)")
    axes[1].set_ylim(0, 100)
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [results[n]["p50_ms"] / 1000 for n in names], 0.4, label="p50")
    axes[2].bar([i + 0.2 for i in x], [results[n]["p95_ms"] / 1000 for n in names], 0.4, label="p95")
    axes[2].set_xticks(list(x), names)
    axes[2].set_title("end-to-end latency (s)")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"routing: {args.rate:g} req/s for {args.duration:g} s, 3 simulated deployments"
                 + (", mid-8b outage 30-45%" if args.outage else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=6.0, help="arrivals per second (Poisson)")
    ap.add_argument("--duration", type=float, default=120.0, help="simulated seconds of arrivals")
    ap.add_argument("--slo-ms", type=float, default=5000.0, help="end-to-end latency SLO")
    ap.add_argument("--ttft-slo-ms", type=float, default=1500.0, help="time-to-first-token SLO")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-outage", dest="outage", action="store_false", help="keep every deployment up")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/routing"))
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.slo_ms <= 0 or args.ttft_slo_ms <= 0:
        ap.error("--rate, --duration, --slo-ms and --ttft-slo-ms must be > 0")
    logging.getLogger("loraplex.router").setLevel(logging.ERROR)  # fallbacks in the outage are expected

    from rich.progress import Progress

    reqs = workload(args.rate, args.duration, args.seed)
    results, wall, decide_us = {}, {}, []
    with Progress(transient=True, console=None) as progress:
        task = progress.add_task("strategies", total=len(ROUTER_POLICIES) + len(BASELINES))
        for strategy in ROUTER_POLICIES + BASELINES:
            progress.update(task, description=strategy)
            t0 = time.perf_counter()
            sim = Simulation(strategy, reqs, args)
            results[strategy] = sim.run()
            wall[strategy] = time.perf_counter() - t0
            if sim.decisions:
                decide_us.append(1e6 * sim.decide_s / sim.decisions)
            progress.advance(task)

    base = results["always-largest"]
    for r in results.values():
        r["cost_vs_largest"] = round(r["cost_per_1k_usd"] / base["cost_per_1k_usd"], 4)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "routing.png"
    plot(results, png, args)
    line = {
        "benchmark": "routing",
        "requests": len(reqs),
        "rate_rps": args.rate,
        "duration_s": args.duration,
        "slo": {"ttft_ms": args.ttft_slo_ms, "e2e_ms": args.slo_ms},
        "outage": args.outage,
        "decide_us": round(sum(decide_us) / len(decide_us), 1),  # mean Router.decide time per request
        "wall_s": round(sum(wall.values()), 2),
        "results": results,
        "plot": str(png),
    }
    (args.out / "routing.json").write_text(json.dumps(line, indent=2))
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
