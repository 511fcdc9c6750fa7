"""`AttentionMetadata`: where every token of one forward step sits, built once per step.

The model runner (engine/runner.py) flattens a step's sequences into T rows — decode tokens and
prefill chunks alike — and describes them here once; every attention layer then reads the same
object (vLLM's attention metadata, nano-vllm's context). Nothing in a layer's forward loops over
sequences: the attention kernel is the only place that needs to know where one sequence ends.

The KV cache is one paged pool of `block_size`-token blocks: token `j` of sequence `b` lives in slot
`block_tables[b, j // block_size] * block_size + j % block_size` of every layer's `k_cache`/`v_cache`
`[slots, kv_heads, head_dim]`. Without a pool (`kv is None`: `LLM.logits`, a full forward with no
cache) each sequence attends only within its own rows, which must then start at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class KVCacheTensors:
    """The pool's keys and values of every layer, `[layers, slots, kv_heads, head_dim]` (views of the pool)."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int


@dataclass(frozen=True)
class DecodeSplit:
    seqs: list[int]  # sequences that add one token to a cached context
    rows: torch.Tensor  # their rows in the step
    seq_index: torch.Tensor  # the same sequence indices, as a tensor (to select block tables and lengths)
    max_len: int  # their longest key count
    prefills: list[int]  # every other sequence


@dataclass(eq=False)
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64: the absolute position of each row
    query_start: list[int]  # [B + 1]: rows of sequence b are query_start[b] .. query_start[b + 1]
    context_lens: list[int]  # [B]: tokens of sequence b already in the cache before this step
    seq_lens: torch.Tensor  # [B] int64: keys of sequence b after this step (context + new rows)
    slot_mapping: torch.Tensor | None = None  # [T] int64: the pool slot each row's k/v is written to
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int64; short rows padded with their first block
    block_lists: list[list[int]] | None = None  # the same tables on the host, unpadded
    kv: KVCacheTensors | None = None
    query_start_t: torch.Tensor | None = None  # [B + 1] int32: query_start on the device (GPU kernels read it)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @cached_property
    def max_query_len(self) -> int:
        """The most rows any one sequence has in this step (1 in a decode step)."""
        return max((self.query_start[b + 1] - self.query_start[b] for b in range(self.num_seqs)), default=0)

    def query_start_tensor(self) -> torch.Tensor:
        """`query_start` as an int32 device tensor (the runner provides it; built here otherwise)."""
        if self.query_start_t is None:
            self.query_start_t = torch.tensor(self.query_start, dtype=torch.int32, device=self.positions.device)
        return self.query_start_t

    @cached_property
    def seq_lens_host(self) -> list[int]:
        return [c + self.query_start[b + 1] - self.query_start[b] for b, c in enumerate(self.context_lens)]

    @cached_property
    def decode_only(self) -> bool:
        """Every sequence adds exactly one token to a cache (a pure decode step)."""
        return self.kv is not None and len(self.query_start) - 1 == int(self.positions.shape[0])

    @cached_property
    def decode_split(self) -> DecodeSplit:
        """Which sequences are decode rows (one new token after a cached context) and which are prefill chunks."""
        seqs, rows, prefills = [], [], []
        for b, ctx in enumerate(self.context_lens):
            if self.kv is not None and ctx > 0 and self.query_start[b + 1] - self.query_start[b] == 1:
                seqs.append(b)
                rows.append(self.query_start[b])
            else:
                prefills.append(b)
        dev = self.positions.device
        return DecodeSplit(seqs, torch.tensor(rows, dtype=torch.long, device=dev),
                           torch.tensor(seqs, dtype=torch.long, device=dev),
                           max((self.seq_lens_host[b] for b in seqs), default=0), prefills)

    def key_slots(self, b: int) -> slice | torch.Tensor:
        """The pool slots of sequence b's keys 0 .. seq_len: a slice when its blocks are consecutive."""
        assert self.kv is not None and self.block_lists is not None
        bs, blocks, n = self.kv.block_size, self.block_lists[b], self.seq_lens_host[b]
        nb = -(-n // bs)
        if all(blocks[i + 1] == blocks[i] + 1 for i in range(nb - 1)):
            return slice(blocks[0] * bs, blocks[0] * bs + n)
        assert self.block_tables is not None
        j = torch.arange(n, device=self.block_tables.device)
        return self.block_tables[b, j // bs] * bs + j % bs


def no_cache_metadata(seq_lens: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for sequences that start at position 0 and use no KV cache (a full forward)."""
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens]) if seq_lens else torch.empty(0)
    return AttentionMetadata(positions=positions.long(), query_start=starts, context_lens=[0] * len(seq_lens),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device))


def positions_metadata(positions: torch.Tensor) -> AttentionMetadata:
    """One sequence's rows at `positions` (any values), without a pool: what a q/k/v projection reads."""
    T = positions.shape[0]
    return AttentionMetadata(positions=positions, query_start=[0, T], context_lens=[0],
                             seq_lens=torch.tensor([T], device=positions.device))
