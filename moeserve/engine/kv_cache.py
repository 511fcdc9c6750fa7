"""Contiguous KV cache: one preallocated [layers, capacity, kv_heads, head_dim] buffer per sequence.

Capacity is fixed when a sequence starts, so a step never reallocates. Before any layer writes,
`reserve` checks that every sequence in the step fits; if one does not, it raises
`KVCacheOverflowError` naming the sequence, its length and the capacity, and nothing is written.
(The paged cache for serving many users lives in `paged_cache.py`.)
"""

from __future__ import annotations

import torch

from moeserve.errors import KVCacheOverflowError
from moeserve.gguf.config import ModelConfig


class SequenceKV:
    """One sequence's keys and values; implements the model's `KVStore` protocol."""

    def __init__(self, seq_id: object, k: torch.Tensor, v: torch.Tensor) -> None:
        self.seq_id, self.k, self.v = seq_id, k, v
        self.length = 0  # tokens whose K/V are stored

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, pos:pos + k.shape[0]] = k
        self.v[layer, pos:pos + v.shape[0]] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :end], self.v[layer, :end]


class KVCache:
    """Hands out one `SequenceKV` per live sequence and recycles released buffers."""

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if capacity <= 0:
            raise ValueError(f"KV capacity must be positive, got {capacity}")
        self.capacity, self.dtype, self.device = capacity, dtype, torch.device(device)
        self.shape = (config.n_layers, capacity, config.n_kv_heads, config.head_dim)
        self.seqs: dict[object, SequenceKV] = {}
        self._free: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, seq_id: object) -> SequenceKV:
        """The cache of `seq_id`, allocated (empty) on first use."""
        kv = self.seqs.get(seq_id)
        if kv is None:
            if self._free:
                k, v = self._free.pop()
            else:
                k = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                v = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            kv = self.seqs[seq_id] = SequenceKV(seq_id, k, v)
        return kv

    def reserve(self, seq_id: object, n_new: int) -> SequenceKV:
        """Check that `n_new` more tokens fit; raise before anything is written if not."""
        kv = self.get(seq_id)
        if kv.length + n_new > self.capacity:
            raise KVCacheOverflowError(
                f"sequence {seq_id!r}: {kv.length} cached + {n_new} new tokens exceeds the KV cache "
                f"capacity of {self.capacity} tokens"
            )
        return kv

    def release(self, seq_id: object) -> None:
        """Forget `seq_id`; its buffers are reused by the next sequence."""
        kv = self.seqs.pop(seq_id, None)
        if kv is not None:
            self._free.append((kv.k, kv.v))

    def reset(self) -> None:
        for seq_id in list(self.seqs):
            self.release(seq_id)
