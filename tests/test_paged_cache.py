"""Paged KV cache: allocator bookkeeping, prefix-cache rules, and KVStore reads/writes vs a plain tensor."""

from __future__ import annotations

import pytest
import torch

from moeserve.engine.paged_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    KVPool,
    PagedDecodeBatch,
    PagedSequenceKV,
    blocks_for,
    chain_hash,
    parse_memory,
)
from moeserve.gguf.config import ModelConfig

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


@pytest.mark.parametrize("contiguous", [True, False])
def test_sequence_kv_matches_a_plain_tensor(contiguous: bool) -> None:
    """Chunks written at arbitrary offsets read back exactly, whether the table is a run or scattered."""
    torch.manual_seed(0)
    pool = KVPool(CFG, 12)
    alloc = BlockAllocator(12)
    kv = PagedSequenceKV(pool)
    if not contiguous:
        alloc.allocate(1)  # make the sequence's blocks non-adjacent
    total = 70
    ref_k = torch.randn(CFG.n_layers, total, CFG.n_kv_heads, CFG.head_dim)
    ref_v = torch.randn_like(ref_k)
    pos = 0
    for n in (5, 11, 1, 1, 40, 12):  # crosses block boundaries in every way
        while kv.capacity < pos + n:
            blocks = alloc.allocate(1, prefer=kv.blocks[-1] + 1 if kv.blocks else None)
            if not contiguous:
                alloc.allocate(1)  # a neighbour steals the next block
            kv.append_blocks(blocks)
        for layer in range(CFG.n_layers):
            kv.write(layer, pos, ref_k[layer, pos:pos + n], ref_v[layer, pos:pos + n])
            k, v = kv.read(layer, pos + n)
            assert torch.equal(k, ref_k[layer, :pos + n]) and torch.equal(v, ref_v[layer, :pos + n])
        pos += n
    assert (kv._contiguous == len(kv.blocks)) == contiguous
    with pytest.raises(RuntimeError):
        kv.write(0, kv.capacity, ref_k[0, :1], ref_v[0, :1])


def test_other_sequences_are_untouched() -> None:
    pool = KVPool(CFG, 4)
    alloc = BlockAllocator(4)
    a, b = PagedSequenceKV(pool), PagedSequenceKV(pool)
    a.append_blocks(alloc.allocate(2))
    b.append_blocks(alloc.allocate(2))
    ka = torch.randn(20, CFG.n_kv_heads, CFG.head_dim)
    a.write(0, 0, ka, ka)
    b.write(0, 0, torch.zeros(32, CFG.n_kv_heads, CFG.head_dim), torch.zeros(32, CFG.n_kv_heads, CFG.head_dim))
    assert torch.equal(a.read(0, 20)[0], ka)
    alloc.free(a.clear())
    assert a.capacity == 0 and alloc.num_free == 2


@pytest.mark.parametrize("window", [None, 5])
def test_batched_decode_attention_equals_per_sequence(window: int | None) -> None:
    """`PagedDecodeBatch` + `decode_attention` (one gather and one SDPA for the whole step), and the
    native kernel reading the pool in place through the block table, give the same cache contents
    and outputs as writing, reading and attending one sequence at a time."""
    from moeserve.kernels.attention import decode_attention, gqa_attention
    from moeserve.kernels.fast import native

    torch.manual_seed(0)
    lengths = [3, 17, 40]  # cached tokens before this step; block tables deliberately scattered
    tables = [[7], [2, 9], [4, 0, 11]]
    nh, nkv, hd = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
    out = {}
    modes = ["per_sequence", "gather"] + (["paged"] if native.available() else [])
    for mode in modes:
        pool = KVPool(CFG, 12)
        pool.k.fill_(float("nan"))  # never-written slots may hold anything: padding must not read them
        pool.v.fill_(float("nan"))
        seqs = []
        for n, blocks in zip(lengths, tables, strict=True):
            kv = PagedSequenceKV(pool)
            kv.append_blocks(blocks)
            g = torch.Generator().manual_seed(n)
            for layer in range(CFG.n_layers):
                kv.write(layer, 0, torch.randn(n, nkv, hd, generator=g), torch.randn(n, nkv, hd, generator=g))
            seqs.append(kv)
        g = torch.Generator().manual_seed(99)
        q = torch.randn(3, nh, hd, generator=g)
        k, v = torch.randn(3, nkv, hd, generator=g), torch.randn(3, nkv, hd, generator=g)
        if mode != "per_sequence":
            batch = PagedDecodeBatch(seqs, lengths)
            batch.write(1, k, v)
            if mode == "gather":
                keys, values = batch.read(1)
                o = decode_attention(q, keys, values, batch.positions, window)
            else:
                o = native.attn_decode(q, *batch.pool(1), batch.lens, window, table=batch.table,
                                       block_size=batch.block_size)
            out[mode] = (o, pool.k.clone())
        else:
            rows = []
            for i, (kv, n) in enumerate(zip(seqs, lengths, strict=True)):
                kv.write(1, n, k[i:i + 1], v[i:i + 1])
                keys, values = kv.read(1, n + 1)
                rows.append(gqa_attention(q[i:i + 1], keys, values, n, window))
            out[mode] = (torch.cat(rows), pool.k.clone())
    for mode in modes[1:]:
        assert torch.equal(out[mode][1].nan_to_num(), out["per_sequence"][1].nan_to_num())
        torch.testing.assert_close(out[mode][0], out["per_sequence"][0], rtol=1e-5, atol=1e-5)


def test_native_paged_attention_rejects_blocks_outside_the_pool() -> None:
    """A block id past the pool (or negative) makes the kernel decline (None) instead of reading
    outside the pool's memory."""
    from moeserve.kernels.fast import native

    if not native.available():
        pytest.skip("native kernels not built on this machine")
    pool = KVPool(CFG, 4)
    q = torch.randn(1, CFG.n_heads, CFG.head_dim)
    k, v = pool.k_slots[0], pool.v_slots[0]
    k.zero_()
    v.zero_()
    lens = torch.tensor([20])
    ok = native.attn_decode(q, k, v, lens, table=torch.tensor([[1, 2]]), block_size=BLOCK_SIZE)
    assert ok is not None and ok.shape == (1, CFG.n_heads * CFG.head_dim)
    for bad in ([[1, 4]], [[-1, 2]]):
        assert native.attn_decode(q, k, v, lens, table=torch.tensor(bad), block_size=BLOCK_SIZE) is None
