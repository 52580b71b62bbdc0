"""Which replica of a model deployment takes a request: a Ray Serve request router (`request_router_class`).

policy "prefix" (the default): a request goes to the replica that last served the longest prefix of its prompt
(so its KV blocks are likely still in that replica's prefix cache), unless that replica is clearly busier than
another; otherwise, and for policy "pow2", power-of-two choices on live queue length. Adapter residency counts
first: replicas holding the request's adapter in a device slot are preferred while not clearly busier.

The prefix map is an approximate radix tree, as SGLang's cache-aware router keeps: the prompt (adapter, tools and
messages as text) is cut into PREFIX_CHUNK_CHARS-character chunks and each chained chunk hash remembers the
replica it went to (LRU, MAX_ENTRIES). A request costs one hash and dict lookup per chunk: no replica is scanned
or asked. A replica's load is Serve's own queue-length cache (probed, and counted up on every send), else the
queue it last reported through Serve's routing stats (LLMServer.record_routing_stats, every
ROUTING_STATS_PERIOD_S), which also carry its resident adapters. A request may name replicas to `avoid` (the ones
serving.api.failover just lost).
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict

from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

PREFIX_CHUNK_CHARS = 256  # prefix granularity (~64 tokens of English; a KV block is 16)
MAX_PREFIX_CHUNKS = 64  # prompts are matched on at most this many leading chunks (16k characters)
MAX_ENTRIES = 65536  # chunk hashes remembered (LRU)
BALANCE_ABS = 8  # the affinity replica is "clearly busier" with this many more requests than the least busy
BALANCE_REL = 1.5  # ... and this many times as many
ROUTING_STATS_PERIOD_S = 1.0
POLICIES = ("prefix", "pow2")


def prompt_text(req: dict) -> str:
    """The part of a replica request that decides its prompt's leading tokens, as one string."""
    head = f"{req.get('adapter') or ''}\x00"
    if req.get("tools"):
        head += json.dumps(req["tools"], sort_keys=True, separators=(",", ":")) + "\x00"
    if req.get("kind") == "chat":
        parts = []
        for m in req.get("messages") or ():
            content = m.get("content")
            parts.append(f"{m.get('role')}\x01{content if isinstance(content, str) else json.dumps(content)}\x02")
        return head + "".join(parts)
    prompt = req.get("prompt")
    return head + (prompt if isinstance(prompt, str) else ",".join(map(str, prompt or ())))


def chunk_hashes(text: str) -> list[int]:
    """Chained hashes of the text's whole leading chunks (the first chunk, the first two, ...)."""
    out, h = [], 0
    for k in range(min(len(text) // PREFIX_CHUNK_CHARS, MAX_PREFIX_CHUNKS)):
        h = hash((h, text[k * PREFIX_CHUNK_CHARS:(k + 1) * PREFIX_CHUNK_CHARS]))
        out.append(h)
    return out


class PrefixMap:
    """Chunk hash -> the replica that last took a prompt with that prefix (LRU)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.entries: OrderedDict[int, str] = OrderedDict()
        self.max_entries = max_entries

    def lookup(self, hashes: list[int], alive) -> tuple[str | None, int]:
        """(replica, chunks matched) of the longest remembered prefix whose replica `alive(replica)`."""
        for depth in range(len(hashes), 0, -1):
            rid = self.entries.get(hashes[depth - 1])
            if rid is not None and alive(rid):
                return rid, depth
        return None, 0

    def record(self, hashes: list[int], replica: str) -> None:
        for h in hashes:
            self.entries[h] = replica
            self.entries.move_to_end(h)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def forget(self, replica: str) -> None:
        for h in [h for h, r in self.entries.items() if r == replica]:
            del self.entries[h]


def clearly_busier(load: float, least: float) -> bool:
    return load - least > BALANCE_ABS and load > BALANCE_REL * least


def rank(ids: list[str], load, policy: str, affinity: str | None, adapter_on=None) -> list[list[str]]:
    """The routing decision as ranks of replica ids (Serve tries the first rank first): pure, for tests.
    `load(id)` is a replica's queue; `adapter_on(id)` whether it holds the request's adapter in a device slot."""
    if not ids:
        return []
    least = min(load(r) for r in ids)
    if adapter_on is not None:
        holders = [r for r in ids if adapter_on(r) and not clearly_busier(load(r), least)]
        if holders and len(holders) < len(ids):
            rest = [r for r in ids if r not in holders]
            return rank(holders, load, policy, affinity if affinity in holders else None) + \
                rank(rest, load, "pow2", None)
    if policy == "prefix" and affinity in ids and not clearly_busier(load(affinity), least):
        return [[affinity], _two(ids, exclude=affinity)]
    return [_two(ids)]  # Serve probes both and takes the shorter live queue


def _two(ids: list[str], exclude: str | None = None) -> list[str]:
    pool = [r for r in ids if r != exclude]
    return random.sample(pool, min(2, len(pool)))


class ReplicaChoice(FIFOMixin, RequestRouter):
    """The Ray Serve request router of every LLMServer deployment (see the module docstring)."""

    def initialize_state(self, policy: str = "prefix", **_):
        if policy not in POLICIES:
            raise ValueError(f"replica_choice must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.policy = policy
        self.prefixes = PrefixMap()

    def _load(self, replica) -> float:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return float(cached if cached is not None else (replica.routing_stats or {}).get("queue", 0))

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        req = _request_of(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        avoid = set((req or {}).get("avoid") or ())
        ids = [i for i in by_id if i not in avoid] or list(by_id)
        affinity, adapter_on = None, None
        if req is not None:
            if self.policy == "prefix":
                affinity, _ = self.prefixes.lookup(chunk_hashes(prompt_text(req)), lambda r: r in ids)
            adapter = req.get("adapter")
            if adapter:
                adapter_on = lambda r: adapter in ((by_id[r].routing_stats or {}).get("adapters") or ())  # noqa: E731
        ranks = rank(ids, lambda r: self._load(by_id[r]), self.policy, affinity, adapter_on)
        return [[by_id[r] for r in group] for group in ranks]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        req = _request_of(pending_request)
        if req is not None and self.policy == "prefix":
            self.prefixes.record(chunk_hashes(prompt_text(req)), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.prefixes.forget(replica_id.unique_id)


def _request_of(pending_request) -> dict | None:
    """The replica request dict of a `stream` call (other methods carry none)."""
    if pending_request is None or pending_request.metadata.call_method != "stream" or not pending_request.args:
        return None
    req = pending_request.args[0]
    return req if isinstance(req, dict) else None
