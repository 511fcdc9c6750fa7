"""The triton backend's unified paged attention against the reference `PagedAttention` on the same pool.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import pytest  # noqa: E402
import torch

pytest.importorskip("triton")

from moeserve.kernels.attention import PagedAttention  # noqa: E402
from moeserve.kernels.metadata import AttentionMetadata, KVCacheTensors, no_cache_metadata  # noqa: E402
from moeserve.kernels.triton.attention import TritonPagedAttention  # noqa: E402
from moeserve.kernels.triton.qmatmul import counters  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, LAYER = 2, 1


def make_step(seqs: list[tuple[int, int]], n_kv: int, hd: int, dtype: torch.dtype, block_size: int, seed: int = 0,
              ) -> tuple[AttentionMetadata, KVCacheTensors]:
    """A step of sequences given as (cached context, new rows), with shuffled, non-consecutive block tables
    (as `ModelRunner.prepare` builds them) and a NaN-filled pool whose cached slots hold random keys/values."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(ctx + n) // block_size) for ctx, n in seqs]
    num_blocks = 2 * sum(need) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    k = torch.full((LAYERS, num_blocks * block_size, n_kv, hd), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    positions, slots, starts, tables = [], [], [0], []
    for (ctx, n), nb in zip(seqs, need):
        blocks = [order.pop() for _ in range(nb)]
        tables.append(blocks)
        cached = [blocks[j // block_size] * block_size + j % block_size for j in range(ctx)]
        if cached:
            idx = torch.tensor(cached)
            k[:, idx] = torch.randn(LAYERS, ctx, n_kv, hd, generator=g).to(dtype)
            v[:, idx] = torch.randn(LAYERS, ctx, n_kv, hd, generator=g).to(dtype)
        positions.extend(range(ctx, ctx + n))
        slots.extend(blocks[j // block_size] * block_size + j % block_size for j in range(ctx, ctx + n))
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    padded = [t + [t[0]] * (width - len(t)) for t in tables]
    kv = KVCacheTensors(k.to(DEVICE), v.to(DEVICE), block_size)
    meta = AttentionMetadata(
        positions=torch.tensor(positions, device=DEVICE), query_start=starts, context_lens=[c for c, _ in seqs],
        seq_lens=torch.tensor([c + n for c, n in seqs], device=DEVICE),
        slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=torch.tensor(padded, device=DEVICE),
        block_lists=tables, kv=kv)
    return meta, kv


def run_both(seqs: list[tuple[int, int]], group: int, hd: int, window: int | None, dtype: torch.dtype, n_kv: int = 2,
             block_size: int = 16, splits: int | None = None, q_dtype: torch.dtype = torch.float32, tol: float = 2e-3):
    """Both attentions on copies of one step's pool: outputs within `tol` of max |o|, identical pools after."""
    meta, kv = make_step(seqs, n_kv, hd, dtype, block_size)
    T, nh = meta.query_start[-1], n_kv * group
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, nh, hd, generator=g).to(DEVICE, q_dtype)
    k = torch.randn(T, n_kv, hd, generator=g).to(DEVICE)
    v = torch.randn(T, n_kv, hd, generator=g).to(DEVICE)
    ref_kv = KVCacheTensors(kv.k.clone(), kv.v.clone(), block_size)
    ref_meta = AttentionMetadata(meta.positions, meta.query_start, meta.context_lens, meta.seq_lens,
                                 meta.slot_mapping, meta.block_tables, meta.block_lists, ref_kv)
    want = PagedAttention(LAYER, nh, n_kv, hd, window)(q.float(), k, v, ref_meta)
    attn = TritonPagedAttention(LAYER, nh, n_kv, hd, window)
    attn.splits = splits
    got = attn(q, k, v, meta)
    assert got.shape == (T, nh * hd) and got.dtype == q_dtype
    assert torch.isfinite(got).all()
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err <= tol, f"relative error {err:.2e}"
    # the step's k/v landed in the pool exactly as the reference stores them (NaNs of unused slots included)
    torch.testing.assert_close(kv.k, ref_kv.k, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(kv.v, ref_kv.v, equal_nan=True, rtol=0, atol=0)


DECODE = [(5, 1), (37, 1), (16, 1), (70, 1)]
PREFILL = [(0, 20), (0, 7)]
CHUNK = [(33, 19)]
MIXED = [(12, 1), (17, 21), (40, 1), (0, 9)]
SCENARIOS = {"decode": DECODE, "prefill": PREFILL, "chunk": CHUNK, "mixed": MIXED}
# (head_dim, window, pool dtype): each scenario and group size runs every combination below
VARIANTS = [(16, None, torch.float32), (64, None, torch.float16), (16, 8, torch.float16), (64, 24, torch.float32)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"hd{v[0]}-w{v[1]}-{str(v[2])[6:]}")
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_reference(scenario, group, variant):
    hd, window, dtype = variant
    run_both(SCENARIOS[scenario], group, hd, window, dtype)


@pytest.mark.parametrize("scenario", ["decode", "mixed"])
@pytest.mark.parametrize("window", [None, 20])
def test_split_keys_match_reference(scenario, window):
    """The flash-decoding path (keys split across programs, partial results merged) gives the same answer,
    including splits that get no keys at all."""
    run_both(SCENARIOS[scenario], 2, 32, window, torch.float32, splits=5)
    # the split that arrives last merged them and reset its counter for the next launch (or graph replay)
    assert not counters(0, torch.device(DEVICE), "attention").any()


def test_odd_shapes():
    """A group of 3 (padded to 4 rows per token), head_dim 24 (padded to 32) and a block size of 8."""
    run_both(MIXED, 3, 24, None, torch.float16, n_kv=1, block_size=8)


def test_long_prefill_spans_several_query_tiles():
    run_both([(5, 150), (0, 3)], 1, 16, 40, torch.float32, n_kv=1)


def test_half_queries_give_half_output():
    run_both(MIXED, 2, 32, None, torch.float16, q_dtype=torch.float16)


def test_without_pool_falls_back_to_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(9, h, 16, generator=g) for h in (4, 2, 2))
    meta = no_cache_metadata([5, 4])
    want = PagedAttention(0, 4, 2, 16, None)(q, k, v, meta)
    torch.testing.assert_close(TritonPagedAttention(0, 4, 2, 16, None)(q, k, v, meta), want)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@GPU
def test_bfloat16_pool_on_gpu():
    """The interpreter has no bfloat16 math; on a GPU the kernel converts the pool's bf16 keys/values. (A fresh
    prefill's reference attends to the unrounded k/v, hence bf16's tolerance.)"""
    run_both(MIXED, 2, 64, None, torch.bfloat16, tol=1e-2)
    run_both(DECODE, 4, 128, 16, torch.bfloat16, q_dtype=torch.float16)


@GPU
def test_long_decode_splits_keys_on_its_own():
    """Few long sequences: the automatic split count (> 1 here) gives the reference's answer."""
    meta, _ = make_step([(3000, 1), (700, 1)], 2, 128, torch.float16, 16)
    assert TritonPagedAttention(LAYER, 8, 2, 128, None)._splits(meta, meta.positions.device, 16) > 1
    run_both([(3000, 1), (700, 1)], 4, 128, None, torch.float16)
    run_both([(3000, 1), (700, 1)], 4, 128, 1000, torch.float16)


@GPU
def test_decode_step_replays_in_a_cuda_graph():
    """A decode step captured once replays for the next step after its device tensors change in place."""
    seqs, n_kv, group, hd, bs = [(40, 1), (600, 1), (5, 1)], 2, 2, 64, 16  # 600 keys: 2 splits
    meta, kv = make_step(seqs, n_kv, hd, torch.float16, bs)
    meta.query_start_tensor()
    nh = n_kv * group
    attn = TritonPagedAttention(LAYER, nh, n_kv, hd, None)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, n, hd, generator=g).to(DEVICE) for n in (nh, n_kv, n_kv))
    attn(q, k, v, meta)  # compiles the kernel and stores the first step's keys
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k, v, meta)
    nxt = [(c + 1, 1) for c, _ in seqs]
    meta.seq_lens.add_(1)
    meta.positions.add_(1)
    meta.slot_mapping.copy_(torch.tensor([t[c // bs] * bs + c % bs for (c, _), t in zip(nxt, meta.block_lists)]))
    for x in (q, k, v):
        x.copy_(torch.randn(x.shape, generator=g).to(DEVICE))
    ref_kv = KVCacheTensors(kv.k.clone(), kv.v.clone(), bs)
    ref_meta = AttentionMetadata(meta.positions, meta.query_start, [c for c, _ in nxt], meta.seq_lens,
                                 meta.slot_mapping, meta.block_tables, meta.block_lists, ref_kv)
    want = PagedAttention(LAYER, nh, n_kv, hd, None)(q, k, v, ref_meta)
    graph.replay()
    torch.cuda.synchronize()
    assert (out - want).abs().max() / want.abs().max() <= 2e-3
    torch.testing.assert_close(kv.k, ref_kv.k, equal_nan=True, rtol=0, atol=0)
