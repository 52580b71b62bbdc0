"""Decode steps over padded batch-size buckets with persistent inputs: the design CUDA graph capture needs.

A decode-only step of n sequences runs as the smallest bucket b >= n (1, 2, 4, 8, then multiples of 8 up to
max_num_seqs, vLLM's capture sizes). Its inputs are copied into buffers allocated once: token ids, positions, KV
slots, block tables as wide as max_model_len, context lengths. Rows n..b are padding: token 0 at position 0, with
their K/V written to a KV block the allocator never hands out. The step's other metadata (the empty prefill
fields, logits rows 0..b-1) is built once per bucket, and the logits of the first n rows come back.

With `cuda_graphs` on a CUDA device, each bucket's forward is captured as a CUDA graph on its first use and then
replayed. That switch is off by default: no GPU has run it yet. On the CPU the buckets are off by default too
(`decode_buckets`): the fused C step's cost grows with its rows, so padding 33 streams to 40 would cost ~20%.
Tests compare the bucket path's tokens with the unpadded step's.
"""

from __future__ import annotations

import logging

import torch

from serving.engine.model import ForwardBatch

log = logging.getLogger("loraplex.engine")


def bucket_sizes(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including max_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_seqs] + list(range(8, max_seqs, 8))
    return sizes + [max_seqs]


class DecodeBuckets:
    def __init__(self, model, kv_caches, pad_block: int, block_size: int, max_seqs: int, max_model_len: int,
                 device: torch.device, cuda_graphs: bool = False):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = bucket_sizes(max_seqs)
        self.pad_block, self.pad_slot = pad_block, pad_block * block_size
        b, width = self.sizes[-1], -(-max_model_len // block_size)
        self.ids = torch.zeros(b, dtype=torch.long, device=device)
        self.pos = torch.zeros(b, dtype=torch.long, device=device)
        self.slots = torch.full((b,), self.pad_slot, dtype=torch.long, device=device)
        self.tables = torch.full((b, width), pad_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(b, dtype=torch.int32, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        empty = (torch.zeros(1, **i32), torch.zeros((1, 1), **i32), torch.zeros(0, **i32))
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        bound = max_model_len if self.cuda_graphs else None  # a fixed split of the decode attention, no host sync
        self.batches = {s: ForwardBatch(self.ids[:s], self.pos[:s], self.slots[:s], 0, *empty, self.tables[:s],
                                        self.lens[:s], torch.arange(s, device=device), max_decode_seq_len=bound)
                        for s in self.sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def run(self, out) -> torch.Tensor | None:
        """Logits [n, vocab] for a decode-only scheduler output of n sequences, or None (prefills in the step, or
        more sequences than the largest bucket): the caller runs the plain step then."""
        n = len(out.decodes)
        b = self.bucket(n) if not out.prefills and n else None
        if b is None:
            return None
        bs = self.block_size
        ids, pos, slots, lens, tables = [], [], [], [], []
        for s in out.decodes:
            seq, p = s.seq, s.seq.num_tokens - 1
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(seq.block_table)
        width = max(len(t) for t in tables)
        self._fill(self.ids, ids, 0, b)
        self._fill(self.pos, pos, 0, b)
        self._fill(self.slots, slots, self.pad_slot, b)
        self._fill(self.lens, lens, 1, b)
        rows = torch.tensor([t + [self.pad_block] * (width - len(t)) for t in tables], dtype=torch.int32)
        self.tables[:n, :width].copy_(rows)
        self.tables[n:b, 0] = self.pad_block
        return self._forward(b)[:n]

    @staticmethod
    def _fill(buf: torch.Tensor, values: list[int], pad: int, b: int) -> None:
        n = len(values)
        buf[:n].copy_(torch.tensor(values, dtype=buf.dtype))
        buf[n:b] = pad

    def _forward(self, b: int) -> torch.Tensor:
        if not self.cuda_graphs:
            return self.model(self.batches[b], self.kv_caches)
        if b not in self.graphs:
            self.graphs[b] = self._capture(b)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits

    def _capture(self, b: int):
        """Bucket b's forward as a CUDA graph: two warm-up runs on a side stream (lazy inits, Triton autotuning),
        then the capture, all buckets sharing one memory pool. The pad rows' K/V land in the pad block."""
        batch = self.batches[b]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(batch, self.kv_caches)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model(batch, self.kv_caches)
        log.info("captured a CUDA graph for decode bucket %d", b)
        return graph, logits
