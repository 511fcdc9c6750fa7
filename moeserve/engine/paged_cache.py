"""Paged KV cache: one shared pool of 16-token blocks, a block table per sequence, prefix caching.

Why paged: a contiguous per-sequence buffer must be sized for the longest possible sequence, so
a server could hold only a handful of them. With fixed blocks handed out on demand, memory is
spent on tokens that exist, a finished or preempted sequence returns its blocks at once, and
full blocks can be *shared* between sequences (prefix caching) because a full block never
changes again.

Pieces, in the order they are used:

* `KVPool` — the tensors: K and V of shape `[layers, n_blocks, 16, kv_heads, head_dim]`, sized
  from a block count or a memory budget.
* `BlockAllocator` — reference counts, a free list and the prefix cache. The free list is in
  eviction order: blocks that hold nothing reusable are handed out first, blocks that carry a
  prefix hash keep their contents (and stay findable) until they reach the front of the list,
  so recently finished prompts can be revived for free (LRU).
* `PagedSequenceKV` — one sequence's block table; the model runner turns a step's tables into
  `AttentionMetadata` (slot mapping, block tables), through which the attention kernels read and
  write the pool in place.

Prefix hashes form a chain, `hash((parent_hash, block_token_ids))`, so a block matches only if
every token before it matches too; the block's own tokens are also compared on lookup, which
makes a false hit require a 64-bit collision *and* identical tokens. Blocks are registered only
after their K/V have been fully computed, so a hit never reads half-written data.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeserve.gguf.config import ModelConfig
from moeserve.kernels.metadata import KVCacheTensors

BLOCK_SIZE = 16
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as '2GiB', '512MB', '1.5g' (for CLI flags)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse memory size {value!r}; use e.g. 2GiB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def blocks_for(num_tokens: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // BLOCK_SIZE)


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full block given its parent's hash: equal only for equal prefixes (chain)."""
    return hash((parent, tuple(tokens)))


class KVPool:
    """The K/V tensors of every block of every layer, allocated once."""

    def __init__(self, config: ModelConfig, num_blocks: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks, self.dtype, self.device = num_blocks, dtype, torch.device(device)
        # One block past the allocator's: the scratch block that padding rows of a CUDA-graph decode step
        # write to and read from, so a padded batch never touches a real sequence's keys.
        self.scratch_block = num_blocks
        shape = (config.n_layers, num_blocks + 1, BLOCK_SIZE, config.n_kv_heads, config.head_dim)
        # torch.empty: pages are only touched (and counted in RSS) when a block is first written.
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        # [layers, n_blocks * 16, kv_heads, head_dim] views: what the attention kernels address by slot.
        slots = (config.n_layers, (num_blocks + 1) * BLOCK_SIZE, config.n_kv_heads, config.head_dim)
        self.tensors = KVCacheTensors(self.k.view(slots), self.v.view(slots), BLOCK_SIZE)

    @staticmethod
    def bytes_per_block(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        """K plus V bytes of one block across all layers."""
        item = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.n_layers * BLOCK_SIZE * config.n_kv_heads * config.head_dim * item

    @classmethod
    def blocks_in_budget(cls, config: ModelConfig, memory: int | str, dtype: torch.dtype = torch.float32) -> int:
        """How many blocks fit in a memory budget (bytes, or a string such as '2GiB')."""
        return parse_memory(memory) // cls.bytes_per_block(config, dtype)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * BLOCK_SIZE


@dataclass
class PoolStats:
    """A snapshot of the allocator, for /metrics, /health and tests."""

    num_blocks: int
    used_blocks: int  # referenced by at least one live sequence
    free_blocks: int  # allocatable (includes cached_blocks)
    cached_blocks: int  # free blocks still holding a reusable prefix
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of which were found (their K/V reused, not recomputed)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BlockAllocator:
    """Reference-counted blocks with an LRU free list and a hash -> block prefix cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.enable_prefix_caching = num_blocks, enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_list: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self.cache: dict[int, int] = {}  # prefix hash -> block id
        self._cached_free = 0  # free blocks that still carry a hash (kept O(1) for per-step stats)
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_list)

    def allocate(self, n: int, prefer: int | None = None) -> list[int]:
        """Take `n` free blocks (all or none). `prefer`: try this id first (keeps tables contiguous).

        A block taken from the free list loses its prefix-cache entry: it is about to be overwritten.
        """
        if n > len(self.free_list):
            raise MemoryError(f"need {n} KV blocks, only {len(self.free_list)} free")
        out = []
        for _ in range(n):
            if prefer is not None and prefer in self.free_list and self.block_hash[prefer] is None:
                b = prefer
                del self.free_list[b]
            else:
                b, _ = self.free_list.popitem(last=False)
            if self.block_hash[b] is not None:
                self._cached_free -= 1
            self._evict(b)
            self.ref[b] = 1
            out.append(b)
            prefer = b + 1
        return out

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.cache.get(h) == b:
                del self.cache[h]
            self.block_hash[b] = self.block_tokens[b] = None

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks return to the free list.

        Freed in reverse so a sequence's tail is evicted before its head: heads (system prompts,
        shared prefixes) are the blocks most likely to be asked for again.
        """
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] < 0:
                raise RuntimeError(f"KV block {b} freed more often than allocated")
            if self.ref[b] == 0:
                self.free_list[b] = None
                if self.block_hash[b] is None:  # nothing worth keeping: reuse it first
                    self.free_list.move_to_end(b, last=False)
                else:
                    self._cached_free += 1

    def lookup(self, h: int, tokens: Sequence[int]) -> int | None:
        """The cached block for prefix hash `h` holding exactly `tokens`, if any."""
        b = self.cache.get(h)
        if b is None or self.block_tokens[b] != tuple(tokens):
            return None
        return b

    def share(self, b: int) -> None:
        """Take one more reference to a cached block (reviving it if it was on the free list)."""
        if self.ref[b] == 0:
            del self.free_list[b]
            self._cached_free -= 1  # only hashed blocks can be found, so a free one was a cached one
        self.ref[b] += 1

    def register(self, b: int, h: int, tokens: Sequence[int]) -> None:
        """Publish a fully computed block under its prefix hash (first writer wins)."""
        if not self.enable_prefix_caching or self.block_hash[b] is not None or h in self.cache:
            return
        self.block_hash[b], self.block_tokens[b] = h, tuple(tokens)
        self.cache[h] = b

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their data, they just stop being findable)."""
        for b in list(self.cache.values()):
            self.block_hash[b] = self.block_tokens[b] = None
        self.cache.clear()
        self._cached_free = 0

    def stats(self) -> PoolStats:
        return PoolStats(self.num_blocks, self.num_used, self.num_free, self._cached_free, self.prefix_queries,
                         self.prefix_hits)


class PagedSequenceKV:
    """One sequence's block table: `blocks[i]` holds its positions `16*i .. 16*i+15` in every layer.

    The model runner turns the tables of a step's sequences into `AttentionMetadata` (slot mapping,
    padded block tables); the attention kernels read and write the pool through them.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []

    @property
    def capacity(self) -> int:
        return len(self.blocks) * BLOCK_SIZE

    def append_blocks(self, blocks: Sequence[int]) -> None:
        self.blocks.extend(blocks)

    def clear(self) -> list[int]:
        """Forget the table and return the blocks (the caller frees them)."""
        blocks, self.blocks = self.blocks, []
        return blocks

    def slots(self, start: int, end: int) -> list[int]:
        """Pool slots of positions start .. end (all inside the reserved blocks)."""
        if end > self.capacity:
            raise RuntimeError(f"positions {start}..{end} past the {self.capacity} reserved slots")
        b = self.blocks
        return [b[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
