"""CUDA graphs for decode steps: capture the forward once per batch-size bucket, replay it every step.

A decode step of a MoE model launches a few hundred small kernels; from Python each launch costs more
than the kernel runs on an H100. A CUDA graph records the launches of one forward and replays them with
one call (vLLM's and SGLang's `cuda_graph_runner`). That needs every input at a fixed address and every
shape fixed, so:

* the step's ids, positions, slots, sequence lengths and block tables live in one static device buffer,
  filled by one host-to-device copy per step;
* a batch of n decode rows runs in the smallest captured bucket >= n (1, 2, 4, 8, 16, 24, 32, 48, 64,
  96, 128, ... up to 512; a larger batch runs eagerly), and the padding rows decode token 0 at position 0
  into the pool's scratch block, so they never touch a real sequence's keys;
* the captured graphs share one memory pool, largest first, so they cost about one forward's activations.

Only backends whose forward never synchronises with the host may be captured (`Decoder.graph_safe`).
`EngineConfig.enforce_eager` (`--enforce-eager`) turns this off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeserve.engine.paged_cache import BLOCK_SIZE, KVPool, blocks_for
from moeserve.engine.scheduler import Chunk
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.model.decoder import Decoder

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_CAPTURED_BATCH = BUCKETS[-1]  # larger decode steps run eagerly: launches are a small share of them (vLLM: 512)


def largest_bucket(max_num_seqs: int) -> int:
    """The largest decode batch a captured graph runs (and the engine's profile step for the graphs' pool)."""
    return min(max_num_seqs, MAX_CAPTURED_BATCH)


def is_decode_step(chunks: Sequence[Chunk]) -> bool:
    """Every chunk adds one token to a cached context (what a captured graph computes)."""
    return all(c.length == 1 and c.start > 0 for c in chunks)


class DecodeGraphs:
    """Captured decode forwards for batch sizes up to `max_batch` over one model and KV pool."""

    def __init__(self, model: Decoder, pool: KVPool, max_batch: int) -> None:
        self.model, self.pool = model, pool
        max_batch = largest_bucket(max_batch)
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = self.buckets[-1]
        self.width = blocks_for(model.max_positions)  # block-table columns: enough for the longest sequence
        B, dev = self.max_batch, pool.device
        # One int64 buffer: ids | positions | slots | seq_lens | block tables [B, width]; one copy per step.
        self.host = torch.empty(B * (4 + self.width), dtype=torch.long, pin_memory=dev.type == "cuda")
        self.buf = torch.empty_like(self.host, device=dev)
        self.query_start = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def views(self, t: torch.Tensor, b: int) -> tuple[torch.Tensor, ...]:
        B = self.max_batch
        return t[:b], t[B:B + b], t[2 * B:2 * B + b], t[3 * B:3 * B + b], t[4 * B:].reshape(B, self.width)[:b]

    def metadata(self, b: int) -> tuple[torch.Tensor, AttentionMetadata]:
        ids, pos, slots, lens, tables = self.views(self.buf, b)
        meta = AttentionMetadata(positions=pos, query_start=list(range(b + 1)), context_lens=[1] * b, seq_lens=lens,
                                 slot_mapping=slots, block_tables=tables, kv=self.pool.tensors,
                                 query_start_t=self.query_start[:b + 1])
        return ids, meta

    def _fill(self, chunks: Sequence[Chunk], b: int) -> None:
        """Write the step's rows (and padding rows up to bucket b) into the pinned host buffer, then copy."""
        h = self.host.numpy()
        ids, pos, slots, lens, tables = self.views(h, b)
        scratch = self.pool.scratch_block
        ids[:] = 0
        pos[:] = 0
        slots[:] = scratch * BLOCK_SIZE
        lens[:] = 1
        tables[:] = scratch
        for i, c in enumerate(chunks):
            st, p = c.state, c.start
            ids[i] = st.tokens(p, p + 1)[0]
            pos[i] = p
            slots[i] = st.kv.slots(p, p + 1)[0]
            lens[i] = p + 1
            blocks = st.kv.blocks[:blocks_for(p + 1)]
            tables[i, :len(blocks)] = blocks
        self.buf.copy_(self.host, non_blocking=True)

    def capture(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool."""
        self._fill([], self.max_batch)
        mempool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            ids, meta = self.metadata(b)
            self.model.forward(ids, meta)  # compiles and autotunes this bucket's kernels outside the capture
            torch.cuda.synchronize(self.pool.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = self.model.forward(ids, meta)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.pool.device)

    def fits(self, chunks: Sequence[Chunk]) -> bool:
        return 0 < len(chunks) <= self.max_batch and is_decode_step(chunks)

    def run(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Replay the bucket for this decode step; float32 logits of the sampling rows."""
        n = len(chunks)
        b = next(b for b in self.buckets if b >= n)
        self._fill(chunks, b)
        graph, out = self.graphs[b]
        graph.replay()
        rows = [i for i, c in enumerate(chunks) if c.samples]
        if len(rows) == n:
            return out[:n]
        return out[torch.tensor(rows, dtype=torch.long, device=out.device)]

