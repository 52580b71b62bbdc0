"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first (decodes and unfinished
prefill chunks, oldest first), then waiting ones are admitted FIFO while budget, sequence slots and KV blocks
last; a long prompt is prefilled in chunks over several steps. When a running sequence needs a block and none
is free, the newest running sequence is preempted: its blocks are freed and it is recomputed later (its full
blocks usually come straight back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.kv_cache import BlockAllocator, block_hash
from serving.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step yields its next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    prefills: list[Scheduled] = field(default_factory=list)  # chunks of more than one token
    decodes: list[Scheduled] = field(default_factory=list)  # exactly one token, the sequence's last
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.lora = None  # LoRAManager: sequences hold an adapter slot while running


    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, upto: int) -> int:
        return max(0, -(-upto // self.block_size) - len(seq.block_table))

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_hash(parent, tuple(seq.token_ids[j * bs:(j + 1) * bs]), seq.lora_name))
        return seq.block_hashes[:num_full_blocks]

    def _free(self, seq: Sequence) -> None:
        self.allocator.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        if seq.lora_slot >= 0:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = -1

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._blocks_needed(seq, seq.num_computed_tokens + n)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            seq.block_table += self.allocator.allocate(need)
            scheduled.append(Scheduled(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                # Prefix cache: reuse full blocks, but always leave at least the last token to compute.
                hits = self.allocator.lookup_prefix(self._hashes(seq, (seq.num_tokens - 1) // self.block_size))
                seq.block_table = hits
                seq.num_computed_tokens = len(hits) * self.block_size
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._blocks_needed(seq, seq.num_computed_tokens + n)
            if need > self.allocator.num_free:
                self._free(seq)
                break
            if seq.lora_name and seq.lora_slot < 0:
                slot = self.lora.acquire(seq.lora_name)
                if slot is None:  # every adapter slot is busy: wait for one to free up
                    self._free(seq)
                    break
                seq.lora_slot = slot
            seq.block_table += self.allocator.allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(Scheduled(seq, n))
            budget -= n
        for s in scheduled:
            if s.seq.status != Status.RUNNING:
                continue
            (out.decodes if s.num_tokens == 1 and s.samples else out.prefills).append(s)
        if self.lora is not None:  # decodes grouped by adapter slot: the LoRA step then needs no token reorder
            out.decodes.sort(key=lambda s: s.seq.lora_slot)
        return out

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance computed counts and publish newly filled blocks to the prefix cache."""
        bs = self.block_size
        for s in out.prefills + out.decodes:
            seq = s.seq
            before = seq.num_computed_tokens // bs
            seq.num_computed_tokens += s.num_tokens
            full = seq.num_computed_tokens // bs
            if full > before:
                hashes = self._hashes(seq, full)
                for j in range(before, full):
                    self.allocator.publish(seq.block_table[j], hashes[j])

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED
