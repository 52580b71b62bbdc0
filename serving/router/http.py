"""Calls to OpenAI-compatible deployments over HTTP (httpx), raising the errors the router falls back on.

For candidates that live behind a URL (another server, a vendor API); in-process deployments raise the
engine's errors directly. `url_for(candidate)` gives the deployment's base URL, ending in /v1.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

import httpx

from serving.router.config import CandidateConfig
from serving.router.errors import CandidateServerError, RouteRequestError, from_http_status


def _raise_for(status: int, text: str, headers) -> None:
    err = from_http_status(status, text, headers)
    if err is not None:
        raise err
    raise RouteRequestError(f"deployment answered {status}: {text[:500]}")


class HttpDeployments:
    def __init__(self, client: httpx.AsyncClient, url_for: Callable[[CandidateConfig], str], api_key: str | None = None):
        self.client = client
        self.url_for = url_for
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _request(self, cand: CandidateConfig, body: dict) -> tuple[str, dict]:
        return self.url_for(cand).rstrip("/") + "/chat/completions", {**body, "model": cand.model}

    async def chat(self, cand: CandidateConfig, body: dict) -> dict:
        url, payload = self._request(cand, {**body, "stream": False})
        try:
            resp = await self.client.post(url, json=payload, headers=self.headers)
        except httpx.HTTPError as exc:
            raise CandidateServerError(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            _raise_for(resp.status_code, resp.text, resp.headers)
        return resp.json()

    async def stream(self, cand: CandidateConfig, body: dict) -> AsyncIterator[dict]:
        """Yield the parsed `data:` chunks of a streamed chat completion (without the final [DONE])."""
        url, payload = self._request(cand, {**body, "stream": True})
        try:
            async with self.client.stream("POST", url, json=payload, headers=self.headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    _raise_for(resp.status_code, text, resp.headers)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk: Any = json.loads(data)
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise CandidateServerError(f"stream error: {chunk['error']}")
                    yield chunk
        except httpx.HTTPError as exc:
            raise CandidateServerError(f"{type(exc).__name__}: {exc}") from exc
