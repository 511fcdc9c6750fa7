"""Paged KV cache: allocator bookkeeping, prefix-cache rules, and the attention kernels writing and
reading the pool through the step's metadata, against plain tensors."""

from __future__ import annotations

import pytest
import torch

from moeserve.engine.paged_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    KVPool,
    PagedSequenceKV,
    blocks_for,
    chain_hash,
    parse_memory,
)
from moeserve.gguf.config import ModelConfig
from moeserve.kernels.attention import PagedAttention, gqa_attention
from moeserve.kernels.metadata import AttentionMetadata

CFG = ModelConfig(arch="qwen3moe", vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  rms_eps=1e-6, rope_theta=1e4, rope_dim=8, context_length=256)


def test_sizes_and_memory_parsing() -> None:
    assert parse_memory("2GiB") == 2 * 1024**3
    assert parse_memory("512MB") == 512 * 1000**2
    assert parse_memory(1234) == 1234
    with pytest.raises(ValueError):
        parse_memory("lots")
    per_block = KVPool.bytes_per_block(CFG)
    assert per_block == 2 * 2 * BLOCK_SIZE * 2 * 8 * 4
    assert KVPool.blocks_in_budget(CFG, per_block * 10 + 5) == 10
    assert KVPool.bytes_per_block(CFG, torch.bfloat16) == per_block // 2
    assert blocks_for(0) == 0 and blocks_for(1) == 1 and blocks_for(16) == 1 and blocks_for(17) == 2


def test_allocate_free_refcounts() -> None:
    a = BlockAllocator(4)
    b = a.allocate(3)
    assert len(set(b)) == 3 and a.num_free == 1 and a.num_used == 3
    with pytest.raises(MemoryError):
        a.allocate(2)  # all or nothing
    assert a.num_free == 1
    a.share(b[0])  # a second owner
    a.free(b)
    assert a.num_used == 1 and a.ref[b[0]] == 1
    a.free([b[0]])
    assert a.num_used == 0 and a.num_free == 4
    with pytest.raises(RuntimeError):
        a.free([b[0]])


def test_prefer_keeps_tables_contiguous() -> None:
    a = BlockAllocator(8)
    first = a.allocate(2)
    other = a.allocate(1)
    a.free(other)
    more = a.allocate(2, prefer=first[-1] + 1)
    assert more == [first[-1] + 1, first[-1] + 2]


def test_prefix_cache_register_lookup_and_lru_eviction() -> None:
    a = BlockAllocator(3)
    toks = list(range(BLOCK_SIZE))
    h = chain_hash(None, toks)
    assert chain_hash(h, toks) != h  # the parent is part of the identity
    [b] = a.allocate(1)
    a.register(b, h, toks)
    assert a.lookup(h, toks) == b
    assert a.lookup(h, toks[::-1]) is None  # same hash key, different tokens: no hit
    a.free([b])
    assert a.stats().cached_blocks == 1 and a.num_free == 3
    # Unhashed free blocks are handed out before the cached one ...
    x = a.allocate(2)
    assert b not in x and a.lookup(h, toks) == b
    # ... which can be revived while it is still free,
    a.share(b)
    assert a.ref[b] == 1 and a.num_free == 0
    a.free([b])
    a.free(x)
    # and is only evicted (forgotten) when nothing else is left.
    assert a.stats().cached_blocks == 1
    y = a.allocate(3)
    assert b in y and a.lookup(h, toks) is None
    a.free(y)
    assert a.stats().cached_blocks == 0 == sum(a.block_hash[i] is not None for i in a.free_list)


def test_register_first_writer_wins_and_disabled() -> None:
    a = BlockAllocator(4)
    toks = [1] * BLOCK_SIZE
    h = chain_hash(None, toks)
    b1, b2 = a.allocate(2)
    a.register(b1, h, toks)
    a.register(b2, h, toks)
    assert a.lookup(h, toks) == b1 and a.block_hash[b2] is None
    off = BlockAllocator(2, enable_prefix_caching=False)
    [c] = off.allocate(1)
    off.register(c, h, toks)
    assert off.lookup(h, toks) is None


def _meta(pool: KVPool, seqs: list[PagedSequenceKV], contexts: list[int], news: list[int]) -> AttentionMetadata:
    """What the model runner builds for one step (see engine/runner.py)."""
    positions, slots, starts, tables = [], [], [0], []
    for kv, c, n in zip(seqs, contexts, news, strict=True):
        positions += list(range(c, c + n))
        slots += kv.slots(c, c + n)
        starts.append(starts[-1] + n)
        tables.append(kv.blocks[:blocks_for(c + n)])
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        positions=torch.tensor(positions), query_start=starts, context_lens=list(contexts),
        seq_lens=torch.tensor([c + n for c, n in zip(contexts, news, strict=True)]),
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [t[0]] * (width - len(t)) for t in tables]),
        block_lists=tables, kv=pool.tensors)


def _kernels(window: int | None = None) -> dict[str, PagedAttention]:
    from moeserve.kernels.cpu.backend import NativeAttention

    nh, nkv, hd = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
    return {"reference": PagedAttention(1, nh, nkv, hd, window), "cpu": NativeAttention(1, nh, nkv, hd, window)}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_chunks_land_in_their_slots_and_attend_like_a_plain_tensor(contiguous: bool, backend: str) -> None:
    """Chunks written at arbitrary offsets (through the attention kernel's slot mapping) read back exactly,
    whether the table is a run or scattered, and attention over them equals SDPA on a plain tensor."""
    torch.manual_seed(0)
    attn = _kernels()[backend]
    pool = KVPool(CFG, 12)
    alloc = BlockAllocator(12)
    kv = PagedSequenceKV(pool)
    if not contiguous:
        alloc.allocate(1)  # make the sequence's blocks non-adjacent
    total, nh, hd = 70, CFG.n_heads, CFG.head_dim
    ref_k = torch.randn(total, CFG.n_kv_heads, hd)
    ref_v = torch.randn_like(ref_k)
    pos = 0
    for n in (5, 11, 1, 1, 40, 12):  # crosses block boundaries in every way
        while kv.capacity < pos + n:
            blocks = alloc.allocate(1, prefer=kv.blocks[-1] + 1 if kv.blocks else None)
            if not contiguous:
                alloc.allocate(1)  # a neighbour steals the next block
            kv.append_blocks(blocks)
        meta = _meta(pool, [kv], [pos], [n])
        q = torch.randn(n, nh, hd)
        o = attn(q, ref_k[pos:pos + n], ref_v[pos:pos + n], meta)
        slots = meta.key_slots(0)
        assert isinstance(slots, slice) == (contiguous or blocks_for(pos + n) == 1)  # a view when it can be
        assert torch.equal(pool.tensors.k[1][slots], ref_k[:pos + n])
        assert torch.equal(pool.tensors.v[1][slots], ref_v[:pos + n])
        torch.testing.assert_close(o, gqa_attention(q, ref_k[:pos + n], ref_v[:pos + n], pos), rtol=1e-5, atol=1e-5)
        pos += n
    with pytest.raises(RuntimeError):
        kv.slots(kv.capacity, kv.capacity + 1)


def test_other_sequences_are_untouched() -> None:
    pool = KVPool(CFG, 4)
    alloc = BlockAllocator(4)
    a, b = PagedSequenceKV(pool), PagedSequenceKV(pool)
    a.append_blocks(alloc.allocate(2))
    b.append_blocks(alloc.allocate(2))
    ka = torch.randn(20, CFG.n_kv_heads, CFG.head_dim)
    attn = _kernels()["reference"]
    attn(torch.randn(20, CFG.n_heads, CFG.head_dim), ka, ka, _meta(pool, [a], [0], [20]))
    zeros = torch.zeros(32, CFG.n_kv_heads, CFG.head_dim)
    attn(torch.randn(32, CFG.n_heads, CFG.head_dim), zeros, zeros, _meta(pool, [b], [0], [32]))
    meta = _meta(pool, [a], [0], [20])
    assert torch.equal(pool.tensors.k[1][meta.key_slots(0)], ka)
    alloc.free(a.clear())
    assert a.capacity == 0 and alloc.num_free == 2


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("decode_only", [True, False])
def test_batched_step_attention_equals_per_sequence(window: int | None, decode_only: bool) -> None:
    """A step of several sequences (a pure decode step: one gather + one SDPA, or the native kernel reading
    the pool in place through the block table; or decode rows mixed with prefill chunks) gives the same
    cache contents and outputs as writing, reading and attending one sequence at a time on plain tensors."""
    torch.manual_seed(0)
    contexts = [3, 17, 40] + ([] if decode_only else [0, 21])  # cached tokens before this step
    news = [1, 1, 1] + ([] if decode_only else [9, 6])
    tables = [[7], [2, 9], [4, 0, 11]] + ([] if decode_only else [[5], [1, 3]])  # deliberately scattered
    nh, nkv, hd = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
    cached = [(torch.randn(c, nkv, hd), torch.randn(c, nkv, hd)) for c in contexts]
    T = sum(news)
    q, k, v = torch.randn(T, nh, hd), torch.randn(T, nkv, hd), torch.randn(T, nkv, hd)
    expected, row = [], 0
    for (ck, cv), c, n in zip(cached, contexts, news, strict=True):
        keys, values = torch.cat([ck, k[row:row + n]]), torch.cat([cv, v[row:row + n]])
        expected.append(gqa_attention(q[row:row + n], keys, values, c, window))
        row += n
    for name, attn in _kernels(window).items():
        pool = KVPool(CFG, 12)
        pool.k.fill_(float("nan"))  # never-written slots may hold anything: padding must not read them
        pool.v.fill_(float("nan"))
        seqs = []
        for (ck, cv), blocks, c in zip(cached, tables, contexts, strict=True):
            kv = PagedSequenceKV(pool)
            kv.append_blocks(blocks)
            if c:
                slots = torch.tensor(kv.slots(0, c))
                pool.tensors.k[1].index_copy_(0, slots, ck)
                pool.tensors.v[1].index_copy_(0, slots, cv)
            seqs.append(kv)
        meta = _meta(pool, seqs, contexts, news)
        assert meta.decode_only == decode_only
        o = attn(q, k, v, meta)
        torch.testing.assert_close(o, torch.cat(expected), rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(pool.tensors.k[1][meta.slot_mapping], k)
        assert torch.equal(pool.tensors.v[1][meta.slot_mapping], v)


def test_native_paged_attention_rejects_blocks_outside_the_pool() -> None:
    """A block id past the pool (or negative) makes the kernel decline (None) instead of reading
    outside the pool's memory."""
    from moeserve.kernels.cpu import native

    pool = KVPool(CFG, 4)
    q = torch.randn(1, CFG.n_heads, CFG.head_dim)
    k, v = pool.tensors.k[0], pool.tensors.v[0]
    k.zero_()
    v.zero_()
    lens = torch.tensor([20])
    ok = native.attn_decode(q, k, v, lens, table=torch.tensor([[1, 2]]), block_size=BLOCK_SIZE)
    assert ok is not None and ok.shape == (1, CFG.n_heads * CFG.head_dim)
    for bad in ([[1, 5]], [[-1, 2]]):  # block 4 is the pool's scratch block (CUDA-graph padding)
        assert native.attn_decode(q, k, v, lens, table=torch.tensor(bad), block_size=BLOCK_SIZE) is None
