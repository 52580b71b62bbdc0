"""Autoscaling on real Ray Serve (`autoscaling:`): load grows the model deployment to max_replicas, idleness shrinks
it to min_replicas, and requests running while a replica is drained all complete."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_helpers import MODEL, Server, small_config

ART = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = small_config({"num_threads": 1, "autoscaling": {
    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0, "downscale_delay_s": 4,
    "look_back_period_s": 2}})


def running(server: Server) -> int:
    r = httpx.get(server.base + "/ready", timeout=10)
    return r.json().get("replicas", {}).get(MODEL, 0) if r.status_code == 200 else 0


def test_grows_under_load_and_shrinks_idle_without_cutting_a_request(tmp_path):
    server = Server(tmp_path, CONFIG).start()
    seen: list[tuple[float, int]] = []

    async def load(seconds: float, concurrency: int, target: int) -> list[int]:
        """`concurrency` users for at most `seconds`, stopping 3 s after `target` replicas are first running."""
        statuses: list[int] = []
        end = time.monotonic() + seconds

        async def user(c, i):
            while time.monotonic() < end:
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 48,
                                                          "temperature": 0, "ignore_eos": True})
                statuses.append(r.status_code)

        async def watch():
            nonlocal end
            while time.monotonic() < end:
                seen.append((time.monotonic(), n := await asyncio.to_thread(running, server)))
                if n == target:
                    end = min(end, time.monotonic() + 3)
                await asyncio.sleep(1)

        async with httpx.AsyncClient(base_url=server.base, timeout=300) as c:
            await asyncio.gather(watch(), *(user(c, i) for i in range(concurrency)))
        return statuses

    def first(n: int) -> float | None:  # seconds from the phase's start until `n` replicas were running
        return next((round(t - seen[0][0], 1) for t, k in seen if k == n), None)

    try:
        assert running(server) == 1
        busy = asyncio.run(load(40, 12, target=2))
        assert max(n for _, n in seen) == 2, seen  # grew to max_replicas under load
        assert set(busy) == {200}
        figures = {"scale_up_s": first(2), "busy_requests": len(busy)}
        seen.clear()
        # light load (one user): the deployment shrinks to min_replicas while that user's requests keep completing
        light = asyncio.run(load(30, 1, target=1))  # it shrank within 7 s here
        assert seen[-1][1] == 1 and set(light) == {200}, (seen, light)
        figures.update(scale_down_s=first(1), light_requests=len(light), failed=0)
        ART.mkdir(parents=True, exist_ok=True)  # the README's autoscaling figures come from here
        (ART / "autoscaling.json").write_text(json.dumps(figures))
        print(json.dumps(figures))
    finally:
        server.stop()
