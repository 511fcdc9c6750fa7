"""Continuous batching: decide, step by step, which tokens of which sequences run together.

One rule covers prefill, chunked prefill, decode and recompute after preemption (as in vLLM's
v1 scheduler): every sequence has `num_computed` tokens whose K/V are in the cache, and the next
step must compute tokens `num_computed ..` of `prompt + output`. A decoding sequence has exactly
one such token (the one it just sampled); a prompt has many, cut into chunks that fit the step's
token budget. Each step:

1. Running sequences, oldest first, take their tokens (one each while decoding) from the budget.
   If the pool has no block for one of them, the *newest* running sequence is preempted: its
   blocks are freed and it goes back to the head of the waiting queue, to be recomputed later
   (cheaply, as its full blocks usually survive in the prefix cache). The oldest sequence is
   never preempted for a newer one, so it always progresses: no livelock, no starvation.
2. Waiting sequences join, first come first served, while the budget, `max_num_seqs` and the
   pool allow. On joining, their leading full blocks are looked up in the prefix cache and
   shared instead of recomputed.

Everything scheduled in a step becomes one `Decoder.forward` (engine/runner.py builds it and its
attention metadata): the dense projections and the MoE run once over all of the step's tokens, the
decode rows' attention in one batched call, each prefill chunk's over its own blocks. Sequences
never share a writable block, so one sequence cannot corrupt another: shared blocks are full,
immutable, and reference counted.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from moeserve.engine.paged_cache import BLOCK_SIZE, BlockAllocator, KVPool, PagedSequenceKV, chain_hash
from moeserve.engine.sequence import Sequence


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()


@dataclass(eq=False)
class SeqState:
    """Scheduling state of one `Sequence`: its blocks, how much is computed, its queue."""

    seq: Sequence
    kv: PagedSequenceKV
    arrival: int = field(default_factory=lambda: next(_arrivals))
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the leading full blocks
    num_preemptions: int = 0
    sent: int = 0  # output tokens already reported to the caller (delta streaming)
    final_sent: bool = False  # the delta carrying finish_reason has been reported

    @property
    def num_tokens(self) -> int:
        return self.seq.length

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids start..end of prompt + output."""
        n = len(self.seq.prompt_ids)
        if end <= n:
            return self.seq.prompt_ids[start:end]
        return (self.seq.prompt_ids[start:] if start < n else []) + self.seq.output_ids[max(start - n, 0):end - n]

    def hashes(self, n_blocks: int) -> list[int]:
        """Chain hashes of the first `n_blocks` full blocks (extended lazily; tokens never change)."""
        while len(self.block_hashes) < n_blocks:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if i else None
            self.block_hashes.append(chain_hash(parent, self.tokens(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)))
        return self.block_hashes[:n_blocks]


@dataclass
class Chunk:
    """Tokens `start .. start+length` of one sequence, computed in this step."""

    state: SeqState
    start: int
    length: int
    samples: bool = field(init=False)  # reaches the sequence's end: its last logits give the next token

    def __post_init__(self) -> None:
        self.samples = self.start + self.length == self.state.num_tokens  # fixed before sampling grows the seq


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[SeqState] = field(default_factory=list)
    exhausted: list[SeqState] = field(default_factory=list)  # alone and the whole pool is full: must stop

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    """Waiting/running queues over a shared `BlockAllocator`; `schedule()` then `commit()` per step."""

    def __init__(self, pool: KVPool, allocator: BlockAllocator, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.pool, self.allocator = pool, allocator
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.num_preemptions = 0

    # -- queues -----------------------------------------------------------------------------
    def new_state(self, seq: Sequence) -> SeqState:
        return SeqState(seq, PagedSequenceKV(self.pool))

    def add(self, state: SeqState) -> None:
        state.status = SeqStatus.WAITING
        self.waiting.append(state)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, state: SeqState) -> None:
        """Remove a sequence (finished or aborted) from whichever queue holds it; free its blocks."""
        # Membership, not status, decides: after a failed step the two may disagree, and
        # cleaning up must still work.
        if state in self.running:
            self.running.remove(state)
        if state in self.waiting:
            self.waiting.remove(state)
        self.allocator.free(state.kv.clear())
        state.status = SeqStatus.FINISHED

    # -- scheduling -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decoders first (one token each, latency-sensitive), then running prefills, oldest first.
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1)
        for st in order:
            if budget == 0:
                break
            if st.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this step
            n = self._fit(st, min(st.num_tokens - st.num_computed, budget))
            while n == 0:  # not one more block anywhere: preempt the newest running sequence
                victim = self.running[-1]
                if victim is st and len(self.running) == 1:
                    self.running.pop()
                    self.allocator.free(st.kv.clear())
                    st.status = SeqStatus.FINISHED
                    out.exhausted.append(st)
                    break
                budget += self._unschedule(out, victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is st:
                    break
                n = self._fit(st, min(st.num_tokens - st.num_computed, budget))
            if n:
                out.chunks.append(Chunk(st, st.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            st = self.waiting[0]
            if not st.kv.blocks:
                self._match_prefix(st)
            n = self._fit(st, min(st.num_tokens - st.num_computed, budget))
            if n == 0:
                self.allocator.free(st.kv.clear())
                st.num_computed = 0
                break
            self._count_prefix(st)
            self.waiting.popleft()
            self.running.append(st)
            st.status = SeqStatus.RUNNING
            out.chunks.append(Chunk(st, st.num_computed, n))
            budget -= n
        return out

    @staticmethod
    def _unschedule(out: SchedulerOutput, st: SeqState) -> int:
        """Drop `st`'s chunk from this step (it is being preempted); returns the tokens given back."""
        for i, c in enumerate(out.chunks):
            if c.state is st:
                del out.chunks[i]
                return c.length
        return 0

    def _fit(self, st: SeqState, want: int) -> int:
        """Reserve blocks for up to `want` more tokens of `st`; returns how many fit (0: none)."""
        have = st.kv.capacity - st.num_computed
        if want <= have:
            return want
        need = min(-(-(want - have) // BLOCK_SIZE), self.allocator.num_free)
        if need:
            prefer = st.kv.blocks[-1] + 1 if st.kv.blocks else None
            st.kv.append_blocks(self.allocator.allocate(need, prefer))
        return min(want, st.kv.capacity - st.num_computed)

    def _preempt(self, st: SeqState) -> None:
        """Free all of `st`'s blocks and requeue it first in line; it will be recomputed."""
        self.running.remove(st)
        self.allocator.free(st.kv.clear())
        st.num_computed = 0
        st.status = SeqStatus.WAITING
        st.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(st)

    def _match_prefix(self, st: SeqState) -> None:
        """Share the cached blocks of the longest cached prefix of `st`.

        At least the last token is always recomputed (its logits are needed), so at most
        `(num_tokens - 1) // 16` blocks can come from the cache; none of them is ever written.
        """
        alloc = self.allocator
        if not alloc.enable_prefix_caching:
            return
        limit = (st.num_tokens - 1) // BLOCK_SIZE
        hit: list[int] = []
        for i, h in enumerate(st.hashes(limit)):
            b = alloc.lookup(h, st.tokens(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE))
            if b is None:
                break
            alloc.share(b)
            hit.append(b)
        st.kv.append_blocks(hit)
        st.num_computed = len(hit) * BLOCK_SIZE

    def _count_prefix(self, st: SeqState) -> None:
        """Account a joining sequence's prefix lookup (once per admission, not per attempt)."""
        if not self.allocator.enable_prefix_caching:
            return
        self.allocator.prefix_queries += st.num_tokens
        self.allocator.prefix_hits += st.num_computed
        if st.num_preemptions == 0:
            st.seq.num_cached_tokens = st.num_computed

    def commit(self, out: SchedulerOutput) -> None:
        """After the forward: the chunks' K/V are in the pool; publish newly completed blocks."""
        for c in out.chunks:
            st = c.state
            before = st.num_computed // BLOCK_SIZE
            st.num_computed = c.start + c.length
            after = st.num_computed // BLOCK_SIZE
            if after > before and self.allocator.enable_prefix_caching:
                hashes = st.hashes(after)
                for i in range(before, after):
                    self.allocator.register(st.kv.blocks[i], hashes[i], st.tokens(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE))
