"""Locust load test of the chat endpoint with streaming: TTFT, inter-token latency, tokens/s, errors per model.

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000
    loraplex bench --users 8 --duration 60      # the same, plus a report folder (JSON, Markdown, PNG)

Environment: LORAPLEX_BENCH_MODELS (comma list; default: every base chat model from /v1/models),
LORAPLEX_BENCH_MAX_TOKENS (default 64), LORAPLEX_BENCH_RECORDS (a JSONL file: one line per request).
Custom locust entries: TTFT, ITL (mean gap of a request) and TPS (its tokens/s), named by model.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

from locust import HttpUser, constant, events, task

PROMPTS = [
    "Explain what a KV cache is in two sentences.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet briefly.",
    "Give me a recipe idea with tomatoes and rice.",
    "Why is the sky blue?",
    "Translate 'good morning, friends' into French and Spanish.",
]
MAX_TOKENS = int(os.environ.get("LORAPLEX_BENCH_MAX_TOKENS", "64"))
_records = None
_models: list[str] = []
_cycle = None


@events.test_start.add_listener
def _open_records(environment, **_):
    global _records
    path = os.environ.get("LORAPLEX_BENCH_RECORDS")
    if path:
        _records = open(path, "a", buffering=1)


@events.test_stop.add_listener
def _close_records(environment, **_):
    if _records is not None:
        _records.flush()


def _record(**row) -> None:
    if _records is not None:
        _records.write(json.dumps(row) + "\n")


class ChatStreamUser(HttpUser):
    wait_time = constant(float(os.environ.get("LORAPLEX_BENCH_WAIT_S", "0")))

    def on_start(self):
        global _models, _cycle
        if not _models:
            wanted = [m for m in os.environ.get("LORAPLEX_BENCH_MODELS", "").split(",") if m]
            if not wanted:
                r = self.client.get("/v1/models", name="models")
                wanted = [m["id"] for m in r.json()["data"] if not m.get("parent") and m.get("type") != "embedding"]
            _models = wanted
            _cycle = itertools.cycle(_models)

    def _fire(self, kind: str, model: str, ms: float) -> None:
        self.environment.events.request.fire(request_type=kind, name=model, response_time=ms,
                                             response_length=0, exception=None, context={})

    @task
    def chat(self):
        model = next(_cycle)
        body = {"model": model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": MAX_TOKENS, "temperature": 0.7, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.time()
        start = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        usage = None
        error = None
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name=f"chat {model}") as resp:
            try:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}"
                    resp.failure(f"{error}: {resp.text[:200]}")
                else:
                    for line in resp.iter_lines():
                        if not line or not line.startswith(b"data: "):
                            continue
                        data = line[6:]
                        if data == b"[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                    if usage is None or first is None:
                        raise RuntimeError("stream ended without content or usage")
                    resp.success()
            except Exception as exc:  # noqa: BLE001 - a failed request is a data point
                error = error or f"{type(exc).__name__}: {exc}"
                resp.failure(error)
        end = time.perf_counter()
        tokens = (usage or {}).get("completion_tokens", 0)
        row = {"t": t0, "model": model, "error": error, "e2e_s": end - start, "tokens": tokens,
               "prompt_tokens": (usage or {}).get("prompt_tokens", 0)}
        if first is not None and error is None:
            row["ttft_s"] = first - start
            row["itl_s"] = gaps
            decode = end - first
            row["tps"] = (tokens - 1) / decode if tokens > 1 and decode > 0 else None
            self._fire("TTFT", model, row["ttft_s"] * 1000)
            if gaps:
                self._fire("ITL", model, sum(gaps) / len(gaps) * 1000)
            if row["tps"]:
                self._fire("TPS", model, row["tps"])
        _record(**row)
