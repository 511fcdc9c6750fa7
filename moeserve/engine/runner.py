"""`ModelRunner`: the model, the paged KV pool, and one forward per scheduled step.

The scheduler decides which tokens run (`SchedulerOutput.chunks`: a slice of one sequence each —
a decode token or a prefill chunk); the runner flattens them into one batch of T rows, builds the
step's `AttentionMetadata` once (positions, slot mapping, block tables, sequence lengths, query start
offsets), runs `Decoder.forward`, and returns the logits of the rows that end a sequence. The engine
samples from them. `bench`, warm-up, `generate` and the server all run through `execute`, so what is
benchmarked is what is served; `LLM.logits` runs `forward_full` (one sequence, no cache). On a GPU with a
graph-safe backend, pure decode steps replay captured CUDA graphs instead (`cuda_graphs.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moeserve.engine.cuda_graphs import DecodeGraphs
from moeserve.engine.paged_cache import KVPool, blocks_for
from moeserve.engine.scheduler import Chunk
from moeserve.kernels.metadata import AttentionMetadata, no_cache_metadata
from moeserve.model.decoder import Decoder


@dataclass
class StepInput:
    """One step, flattened: token ids [T], attention metadata, and the rows whose logits are sampled."""

    ids: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor


class ModelRunner:
    def __init__(self, model: Decoder, pool: KVPool, max_num_seqs: int = 1, enforce_eager: bool = False) -> None:
        self.model, self.pool = model, pool
        self.device = pool.device
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and model.graph_safe and not enforce_eager:
            try:
                self.graphs = DecodeGraphs(model, pool, max_num_seqs)
                self.graphs.capture()
            except Exception as exc:  # a driver or kernel that cannot be captured: slower, still correct
                self.graphs = None
                torch.cuda.synchronize(self.device)
                warnings.warn(f"CUDA graph capture failed, decode runs eagerly: {exc}", RuntimeWarning, stacklevel=2)

    def prepare(self, chunks: Sequence[Chunk]) -> StepInput:
        """Flatten the step's chunks and describe them for attention (host loops here, none in the forward)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, contexts, lens, tables, rows = [0], [], [], [], []
        for c in chunks:
            st, end = c.state, c.start + c.length
            if end > self.model.max_positions:
                raise RuntimeError(f"position {end - 1} is past the model's {self.model.max_positions} positions")
            ids.extend(st.tokens(c.start, end))
            positions.extend(range(c.start, end))
            slots.extend(st.kv.slots(c.start, end))
            starts.append(len(ids))
            contexts.append(c.start)
            lens.append(end)
            tables.append(st.kv.blocks[:blocks_for(end)])
            if c.samples:
                rows.append(len(ids) - 1)
        width = max(len(t) for t in tables)
        padded = [t + [t[0]] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev), query_start=starts,
            context_lens=contexts, seq_lens=torch.tensor(lens, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.long, device=dev), block_lists=tables,
            kv=self.pool.tensors, query_start_t=torch.tensor(starts, dtype=torch.int32, device=dev))
        return StepInput(torch.tensor(ids, dtype=torch.long, device=dev), meta,
                         torch.tensor(rows, dtype=torch.long, device=dev))

    def execute(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Run one scheduled step (its k/v land in the pool); float32 logits of the sampling rows."""
        if self.graphs is not None and self.graphs.fits(chunks):
            return self.graphs.run(chunks)
        step = self.prepare(chunks)
        return self.model.forward(step.ids, step.meta, step.logit_rows)

    def forward_full(self, ids: Sequence[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] of one sequence from position 0, touching no cache (reentrant)."""
        return self._full(ids, self.model.forward)

    def hidden_full(self, ids: Sequence[int]) -> torch.Tensor:
        """float32 [len(ids), hidden] final-norm hidden states of one sequence, touching no cache (embeddings)."""
        return self._full(ids, self.model.hidden_states)

    def _full(self, ids: Sequence[int], fn: Callable[[torch.Tensor, AttentionMetadata], torch.Tensor]) -> torch.Tensor:
        if len(ids) > self.model.max_positions:
            raise RuntimeError(f"{len(ids)} tokens are more than the model's {self.model.max_positions} positions")
        meta = no_cache_metadata([len(ids)], self.device)
        return fn(torch.tensor(list(ids), dtype=torch.long, device=self.device), meta)

