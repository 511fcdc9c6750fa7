"""`ModelRunner`: the model, the paged KV pool, and one forward per scheduled step.

The scheduler decides which tokens run (`SchedulerOutput.chunks`: a slice of one sequence each —
a decode token or a prefill chunk); the runner flattens them into one batch of T rows, builds the
step's `AttentionMetadata` once (positions, slot mapping, block tables, sequence lengths, query start
offsets), runs `Decoder.forward`, and returns the logits of the rows that end a sequence. The engine
samples from them. `bench`, warm-up, `generate` and the server all run through `execute`, so what is
benchmarked is what is served; `LLM.logits` runs `forward_full` (one sequence, no cache). On a GPU with a
graph-safe backend, pure decode steps replay captured CUDA graphs instead (`cuda_graphs.py`). Before a GPU's
pool is sized, `profile_activations` runs the largest step the scheduler may send through a scratch pool and
reads its peak memory (the engine keeps that much free).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeserve.engine.cuda_graphs import DecodeGraphs
from moeserve.engine.distributed import FULL, HIDDEN, STEP, Driver
from moeserve.engine.paged_cache import BLOCK_SIZE, KVPool, blocks_for
from moeserve.engine.scheduler import Chunk
from moeserve.kernels.metadata import AttentionMetadata, no_cache_metadata
from moeserve.model.decoder import Decoder


@dataclass
class HostStep:
    """One step as host lists: what `prepare` turns into tensors, and what rank 0 sends to the other ranks."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    starts: list[int]  # query start offset of each sequence, and the total
    contexts: list[int]  # tokens already cached before this step, per sequence
    lens: list[int]  # tokens in the sequence after this step
    tables: list[list[int]]  # the KV blocks each sequence's attention reads
    rows: list[int]  # the rows whose logits are sampled
    argmax: bool = False  # return the rows' argmax token ids instead of their logits (plain greedy)

    @classmethod
    def of(cls, chunks: Sequence[Chunk], max_positions: int, argmax: bool = False) -> HostStep:
        """Flatten the step's chunks (host loops here, none in the forward)."""
        h = cls([], [], [], [0], [], [], [], [], argmax)
        for c in chunks:
            st, end = c.state, c.start + c.length
            if end > max_positions:
                raise RuntimeError(f"position {end - 1} is past the model's {max_positions} positions")
            h.ids.extend(st.tokens(c.start, end))
            h.positions.extend(range(c.start, end))
            h.slots.extend(st.kv.slots(c.start, end))
            h.starts.append(len(h.ids))
            h.contexts.append(c.start)
            h.lens.append(end)
            h.tables.append(st.kv.blocks[:blocks_for(end)])
            if c.samples:
                h.rows.append(len(h.ids) - 1)
        return h

    def pack(self) -> list[int]:
        """One flat list of ints: [T, n, R, argmax, ids, positions, slots, starts, contexts, lens, rows, tables...]."""
        out = [len(self.ids), len(self.lens), len(self.rows), int(self.argmax)]
        for part in (self.ids, self.positions, self.slots, self.starts, self.contexts, self.lens, self.rows):
            out += part
        for t in self.tables:
            out += t
        return out

    @classmethod
    def unpack(cls, flat: list[int]) -> HostStep:
        T, n, R, argmax = flat[:4]
        i = 4
        parts = []
        for size in (T, T, T, n + 1, n, n, R):
            parts.append(flat[i:i + size])
            i += size
        lens = parts[5]
        tables = []
        for length in lens:
            b = blocks_for(length)
            tables.append(flat[i:i + b])
            i += b
        return cls(*parts[:6], tables, parts[6], bool(argmax))


def may_capture(model: Decoder, enforce_eager: bool, driver: Driver | None) -> bool:
    """Whether decode steps on a GPU replay CUDA graphs: a backend that never syncs with the host, graphs not
    turned off, and one process (a parallel group's collectives run eagerly)."""
    return model.graph_safe and not enforce_eager and driver is None


@dataclass
class StepInput:
    """One step, flattened: token ids [T], attention metadata, and the rows whose logits are sampled."""

    ids: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor


class ModelRunner:
    def __init__(self, model: Decoder, pool: KVPool, max_num_seqs: int = 1, enforce_eager: bool = False,
                 driver: Driver | None = None) -> None:
        """`driver`: on rank 0 of a parallel group, sends each step to the other ranks before running it."""
        self.model, self.pool, self.driver = model, pool, driver
        self.device = pool.device
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and may_capture(model, enforce_eager, driver):
            try:
                self.graphs = DecodeGraphs(model, pool, max_num_seqs)
                self.graphs.capture()
            except Exception as exc:  # a driver or kernel that cannot be captured: slower, still correct
                self.graphs = None
                torch.cuda.synchronize(self.device)
                warnings.warn(f"CUDA graph capture failed, decode runs eagerly: {exc}", RuntimeWarning, stacklevel=2)

    def prepare(self, chunks: Sequence[Chunk]) -> StepInput:
        """Flatten the step's chunks and describe them for attention (host loops here, none in the forward)."""
        return self.to_device(HostStep.of(chunks, self.model.max_positions))

    def to_device(self, h: HostStep) -> StepInput:
        dev = self.device
        width = max(len(t) for t in h.tables)
        padded = [t + [t[0]] * (width - len(t)) for t in h.tables]
        meta = AttentionMetadata(
            positions=torch.tensor(h.positions, dtype=torch.long, device=dev), query_start=h.starts,
            context_lens=h.contexts, seq_lens=torch.tensor(h.lens, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(h.slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.long, device=dev), block_lists=h.tables,
            kv=self.pool.tensors, query_start_t=torch.tensor(h.starts, dtype=torch.int32, device=dev))
        return StepInput(torch.tensor(h.ids, dtype=torch.long, device=dev), meta,
                         torch.tensor(h.rows, dtype=torch.long, device=dev))

    def run(self, h: HostStep) -> torch.Tensor:
        """The forward of a flattened step (a parallel group's workers replay rank 0's steps through this)."""
        step = self.to_device(h)
        return self.model.forward(step.ids, step.meta, step.logit_rows, argmax=h.argmax)

    def execute(self, chunks: Sequence[Chunk], argmax: bool = False) -> torch.Tensor:
        """Run one scheduled step (its k/v land in the pool): float32 logits of the sampling rows, or with
        `argmax` their greedy token ids (int64)."""
        if self.graphs is not None and self.graphs.fits(chunks):
            logits = self.graphs.run(chunks)
            return self.model.argmax(logits) if argmax else logits
        h = HostStep.of(chunks, self.model.max_positions, argmax)
        if self.driver is None:
            return self.run(h)
        with self.driver.step(STEP, h.pack()):  # the other ranks replay the same step
            return self.run(h)

    def forward_full(self, ids: Sequence[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] of one sequence from position 0, touching no cache (reentrant)."""
        return self._full(ids, hidden=False)

    def hidden_full(self, ids: Sequence[int]) -> torch.Tensor:
        """float32 [len(ids), hidden] final-norm hidden states of one sequence, touching no cache (embeddings)."""
        return self._full(ids, hidden=True)

    def _full(self, ids: Sequence[int], hidden: bool) -> torch.Tensor:
        if len(ids) > self.model.max_positions:
            raise RuntimeError(f"{len(ids)} tokens are more than the model's {self.model.max_positions} positions")
        if self.driver is None:
            return self.full(ids, hidden)
        with self.driver.step(HIDDEN if hidden else FULL, list(ids)):
            return self.full(ids, hidden)

    def full(self, ids: Sequence[int], hidden: bool = False) -> torch.Tensor:
        """One sequence from position 0 with no cache: logits, or final hidden states when `hidden`."""
        meta = no_cache_metadata([len(ids)], self.device)
        x = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        return self.model.hidden_states(x, meta) if hidden else self.model.forward(x, meta)


def dummy_step(rows: int, seq_len: int, sampled: int, vocab: int = 1) -> HostStep:
    """A prefill step of `rows` rows in sequences of at most `seq_len` tokens, each in its own blocks from block
    0 on, whose last `sampled` rows are sampled: the shape of the largest step the scheduler can send (the
    longest sequences make attention's share the largest). Its ids are spread over the vocabulary, so a MoE
    routes them to many experts, as real text does, not all to one token's."""
    ids = [(7919 * i) % vocab for i in range(rows)]
    h = HostStep(ids, [], [], [0], [], [], [], list(range(rows - min(sampled, rows), rows)))
    first_block = 0
    while len(h.positions) < rows:
        n = min(seq_len, rows - len(h.positions))
        blocks = list(range(first_block, first_block + blocks_for(n)))
        h.positions.extend(range(n))
        h.slots.extend(blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n))
        h.starts.append(len(h.positions))
        h.contexts.append(0)
        h.lens.append(n)
        h.tables.append(blocks)
        first_block += len(blocks)
    return h


PROFILE_MARGIN = 256 * 1024**2  # bytes kept beside the profiled peaks: the sampler, allocator fragmentation
NO_LIMIT = 2**62  # a device whose memory torch does not count leaves the pool to the engine's other bounds


def pool_budget(model: Decoder, utilization: float, reserve: int) -> int:
    """Bytes this rank's device can give its KV pool (vLLM's --gpu-memory-utilization): the share `utilization`
    of its memory, less what is taken now (the weights, other processes) and `reserve` for the steps."""
    if not has_allocator_stats(model.device):
        return NO_LIMIT
    free, total = torch.cuda.mem_get_info(model.device)
    return int(utilization * total) - (total - free) - reserve - PROFILE_MARGIN


def has_allocator_stats(device: torch.device) -> bool:
    """Whether torch counts this device's allocations (peak and current bytes): CUDA's caching allocator."""
    return device.type == "cuda"


def profile_activations(model: Decoder, kv_dtype: torch.dtype, rows: int, sampled: int) -> int:
    """GPU bytes one step of `rows` rows (`sampled` of them sampled) needs beyond what stays allocated: the
    peak of a dummy step run through a scratch KV pool (vLLM's profile run). The KV pool is sized after this,
    from what is left; a step that does not fit at all raises `torch.cuda.OutOfMemoryError` here, at load,
    instead of in the middle of serving. Off a GPU the step runs (a parallel group's ranks meet in it) and
    0 is returned: there is no allocator to read."""
    dev = model.device
    cuda = has_allocator_stats(dev)
    step = dummy_step(rows, model.max_positions, sampled, model.config.vocab_size)
    pool = KVPool(model.cache_config, sum(len(t) for t in step.tables), kv_dtype, dev)
    runner = ModelRunner(model, pool, enforce_eager=True)
    try:
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        runner.run(step)  # its logits are transient too: dropped before what stays allocated is read
        if not cuda:
            return 0
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - torch.cuda.memory_allocated(dev))
    finally:  # an out-of-memory error must not keep the scratch pool alive through its traceback
        del runner, pool
        if cuda:
            torch.cuda.empty_cache()
