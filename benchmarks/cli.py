"""`loraplex bench`: locust, headless, against a running server (or one it starts), then a report folder.

    loraplex bench --users 16 --duration 60 [--host http://127.0.0.1:8000] [--out DIR]

The report folder holds report.json and report.md (TTFT, inter-token latency, end-to-end latency
percentiles, tokens/s and errors per model), latency.png (percentiles over time), throughput.png, the raw
per-request records (requests.jsonl) and locust's CSVs. The last line printed is the JSON of the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from loraplex.cli import CLIError

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MAX_USERS, MAX_DURATION = 512, 3600
# The console script's entry point (not `python -m loraplex.cli`, whose __main__ copy has its own CLIError).
LORAPLEX = [sys.executable, "-c", "import sys; from loraplex.cli import main; sys.exit(main())"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="load-test the chat endpoint with locust and write a report")
    p.add_argument("--users", type=int, default=8, help=f"concurrent users (1..{MAX_USERS})")
    p.add_argument("--duration", type=int, default=30, help=f"seconds of load (1..{MAX_DURATION})")
    p.add_argument("--host", default=None, help="server URL; default: start `loraplex serve` on a free port")
    p.add_argument("--config", default=None, help="serve config for a server it starts")
    p.add_argument("--out", default=None, help="report folder (default: $LORAPLEX_HOME/bench/<time>)")
    p.add_argument("--model", action="append", default=None, help="model to load (repeatable; default: all)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per point in the time plots")
    p.set_defaults(func=cmd_bench)


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CLIError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise CLIError(f"{url} was not ready within {timeout:.0f}s")


def _start_server(config: str | None, log_path: Path) -> tuple[subprocess.Popen, str]:
    from serving.router.sim import free_port

    port = free_port()
    cmd = [*LORAPLEX, "serve", "--port", str(port)]
    if config:
        cmd += ["--config", config]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def cmd_bench(args) -> int:
    if not 1 <= args.users <= MAX_USERS:
        raise CLIError(f"--users must be 1..{MAX_USERS}, got {args.users}")
    if not 1 <= args.duration <= MAX_DURATION:
        raise CLIError(f"--duration must be 1..{MAX_DURATION} seconds, got {args.duration}")
    if args.max_tokens < 1:
        raise CLIError("--max-tokens must be >= 1")
    if args.host and not args.host.startswith(("http://", "https://")):
        raise CLIError(f"--host must be a URL like http://127.0.0.1:8000, got {args.host!r}")
    if args.config and args.host:
        raise CLIError("--config is for a server bench starts; it cannot be combined with --host")
    from loraplex.paths import subdir

    out = Path(args.out) if args.out else subdir("bench") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    records = out / "requests.jsonl"
    records.write_text("")
    proc = None
    host = args.host.rstrip("/") if args.host else None
    try:
        if host is None:
            print("bench: starting loraplex serve ...", flush=True)
            proc, host = _start_server(args.config, out / "server.log")
            _wait_ready(host, proc, timeout=600)
        else:
            _wait_ready(host, None, timeout=30)
        env = {**os.environ, "LORAPLEX_BENCH_RECORDS": str(records),
               "LORAPLEX_BENCH_MAX_TOKENS": str(args.max_tokens)}
        if args.model:
            env["LORAPLEX_BENCH_MODELS"] = ",".join(args.model)
        rate = args.spawn_rate or args.users
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
               "-r", str(rate), "-t", f"{args.duration}s", "--host", host, "--csv", str(out / "locust"),
               "--only-summary", "--stop-timeout", "60", "--exit-code-on-error", "0", "--loglevel", "WARNING"]
        print(f"bench: {args.users} users for {args.duration}s against {host} ...", flush=True)
        t0 = time.time()
        run = subprocess.run(cmd, env=env, timeout=args.duration + 180)
        if run.returncode != 0:
            raise CLIError(f"locust exited with status {run.returncode}")
        wall = time.time() - t0
    finally:
        if proc is not None:
            _stop_server(proc)
    figures = write_report(records, out, users=args.users, duration=args.duration, host=host,
                           window=args.window, wall_s=wall)
    import json

    print(f"bench: report in {out}", flush=True)
    print(json.dumps(figures, sort_keys=True))
    return 0


# ---- the report -----------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def _summary(rows: list[dict], span: float) -> dict:
    ok = [r for r in rows if not r.get("error")]
    ttft = [r["ttft_s"] * 1000 for r in ok if r.get("ttft_s") is not None]
    itl = [g * 1000 for r in ok for g in r.get("itl_s") or []]
    e2e = [r["e2e_s"] for r in ok]
    tps = [r["tps"] for r in ok if r.get("tps")]
    tokens = sum(r.get("tokens", 0) for r in ok)
    out = {"requests": len(rows), "errors": len(rows) - len(ok),
           "error_rate": (len(rows) - len(ok)) / len(rows) if rows else 0.0,
           "output_tokens": tokens, "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in ok),
           "throughput_tok_s": tokens / span if span > 0 else None,
           "requests_per_s": len(ok) / span if span > 0 else None,
           "per_request_tok_s_mean": sum(tps) / len(tps) if tps else None}
    for name, vals in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_s", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = _pct(vals, q)
    return out


def _windows(rows: list[dict], t0: float, window: float):
    import math

    n = max(1, math.ceil(max((r["t"] + r["e2e_s"] - t0) for r in rows) / window)) if rows else 0
    buckets = [[] for _ in range(n)]
    for r in rows:
        end = r["t"] + r["e2e_s"] - t0
        buckets[min(n - 1, int(end // window))].append(r)
    return [(i * window + window / 2, b) for i, b in enumerate(buckets)]


def _plots(rows: list[dict], out: Path, t0: float, window: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wins = _windows(rows, t0, window)
    xs = [x for x, _ in wins]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ttft = [_pct([r["ttft_s"] * 1000 for r in b if r.get("ttft_s") is not None], q) for _, b in wins]
        itl = [_pct([g * 1000 for r in b for g in r.get("itl_s") or []], q) for _, b in wins]
        a1.plot(xs, [v if v is not None else float("nan") for v in ttft], style, marker="o", label=f"p{q}")
        a2.plot(xs, [v if v is not None else float("nan") for v in itl], style, marker="o", label=f"p{q}")
    a1.set_ylabel("time to first token (ms)")
    a2.set_ylabel("inter-token latency (ms)")
    a2.set_xlabel(f"time since start (s), {window:g}s windows by request end")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    fig.suptitle("loraplex chat streaming: latency percentiles over time")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    tok = [sum(r.get("tokens", 0) for r in b if not r.get("error")) / window for _, b in wins]
    errs = [sum(1 for r in b if r.get("error")) / window for _, b in wins]
    ax.plot(xs, tok, marker="o", label="output tokens/s")
    ax.set_ylabel("output tokens/s")
    ax.set_xlabel("time since start (s)")
    ax2 = ax.twinx()
    ax2.plot(xs, [sum(1 for r in b if not r.get("error")) / window for _, b in wins], "g--", label="requests/s")
    ax2.plot(xs, errs, "r:", label="errors/s")
    ax2.set_ylabel("requests/s")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.suptitle("loraplex chat streaming: throughput")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    return ["latency.png", "throughput.png"]


def _fmt(v, digits=1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(records: Path, out: Path, *, users: int, duration: int, host: str, window: float,
                 wall_s: float) -> dict:
    """Figures per model and overall from the per-request records: report.json, report.md, PNG plots."""
    import json
    import platform

    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    if not rows:
        raise CLIError(f"no requests were recorded in {records}; see locust's output above")
    t0 = min(r["t"] for r in rows)
    span = max(r["t"] + r["e2e_s"] for r in rows) - t0
    models = sorted({r["model"] for r in rows})
    report = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "host": host, "users": users, "duration_s": duration, "measured_span_s": span, "wall_s": wall_s,
        "overall": _summary(rows, span),
        "models": {m: _summary([r for r in rows if r["model"] == m], span) for m in models},
    }
    report["plots"] = _plots(rows, out, t0, window)
    errors: dict[str, int] = {}
    for r in rows:
        if r.get("error"):
            errors[r["error"][:120]] = errors.get(r["error"][:120], 0) + 1
    report["error_kinds"] = errors
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# loraplex load benchmark", "",
             f"{users} users, {duration}s against {host}; {report['machine']}.", "",
             "| model | requests | errors | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | "
             "e2e p50 / p99 (s) | output tok/s | per-request tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in [*report["models"].items(), ("**all**", report["overall"])]:
        lines.append(
            f"| {name} | {s['requests']} | {s['errors']} | "
            f"{_fmt(s['ttft_ms_p50'], 0)} / {_fmt(s['ttft_ms_p90'], 0)} / {_fmt(s['ttft_ms_p99'], 0)} | "
            f"{_fmt(s['itl_ms_p50'])} / {_fmt(s['itl_ms_p90'])} / {_fmt(s['itl_ms_p99'])} | "
            f"{_fmt(s['e2e_s_p50'], 2)} / {_fmt(s['e2e_s_p99'], 2)} | {_fmt(s['throughput_tok_s'])} | "
            f"{_fmt(s['per_request_tok_s_mean'])} |")
    if errors:
        lines += ["", "Errors:", *[f"- {n} x {e}" for e, n in errors.items()]]
    lines += ["", "![latency](latency.png)", "", "![throughput](throughput.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    o = report["overall"]
    return {"users": users, "duration_s": duration, "requests": o["requests"], "errors": o["errors"],
            "ttft_ms_p50": o["ttft_ms_p50"], "ttft_ms_p99": o["ttft_ms_p99"], "itl_ms_p50": o["itl_ms_p50"],
            "itl_ms_p99": o["itl_ms_p99"], "throughput_tok_s": o["throughput_tok_s"],
            "report": str(out)}
