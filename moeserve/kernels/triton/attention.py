"""Unified paged attention: one Triton kernel answers every row of a step, decode rows and prefill chunks alike.

The design of vLLM's unified (prefix-prefill) triton attention. The grid is (sequence, query tile, kv head
[x split]). A program takes `BLOCK_Q` consecutive query tokens of one sequence together with all query heads
of one kv head's group, so its `BLOCK_M = BLOCK_Q * group` rows share every key tile it loads (GQA without
copying K/V per head). It walks the sequence's keys through the block table (`slot = table[b, j // bs] * bs
+ j % bs`) in tiles of `BLOCK_N` keys, independent of the pool's block size, applies the causal mask (the
query at absolute position `p = seq_len - query_len + i` sees keys `j <= p`) and the optional sliding window
(`p - j < window`), and keeps an online softmax in float32; the two products take float16 operands.

Only device tensors of the metadata are read (query starts, sequence lengths, block tables, slot mapping)
plus the host int `max_query_len`, which sizes the grid: a decode step never synchronises with the host and
can be captured in a CUDA graph.

Long-context decode with few sequences would leave most SMs idle, so for `max_query_len == 1` on a GPU the
keys of each (sequence, kv head) are split across several programs (flash-decoding): each writes its
normalised partial output and log-sum-exp, counts itself in an int32 arrival counter (acquire-release), and
the split that arrives last merges them in split order (deterministic) and resets the counter — no second
launch. The split count follows only from shapes (sequences, kv heads, block-table width, SM count), never
from lengths on the device.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl

from moeserve.kernels.attention import PagedAttention
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.kernels.triton.pdl import pdl, pdl_enter
from moeserve.kernels.triton.qmatmul import arrive_last, counters, reset_count

LOG2E = 1.4426950408889634
MIN_KEYS_PER_SPLIT = 256  # a split with fewer keys costs more to merge than it saves
MAX_SPLITS = 16


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache, v_cache, o_ptr, part_o, part_lse, count_ptr,
    seq_lens, query_start, block_tables,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_bt,
    scale_log2, window,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    b = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS

    q_begin = tl.load(query_start + b)
    q_len = tl.load(query_start + b + 1) - q_begin
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + b).to(tl.int32)
    ctx = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    qi = tile * BLOCK_Q + r // GROUP_PAD  # the row's query token within the sequence's rows
    g = r % GROUP_PAD
    row_ok = (qi < q_len) & (g < GROUP)
    head = kvh * GROUP + g
    tok = q_begin + qi
    pos = ctx + qi  # absolute position of the row's query
    d = tl.arange(0, HD_PAD)
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float16)

    # keys this tile can see: up to its last query's position, from its first query's window start
    hi = tl.minimum(seq_len, ctx + tl.minimum(q_len, (tile + 1) * BLOCK_Q))
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, ctx + tile * BLOCK_Q - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    if SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row with no visible key in a tile stays NaN-free
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        blk = tl.load(block_tables + b * stride_bt + j // BLOCK_SIZE, mask=j_ok, other=0)
        slot = blk * BLOCK_SIZE + j % BLOCK_SIZE
        kt = tl.load(k_cache + slot[None, :] * stride_ks + kvh * stride_kh + d[:, None],
                     mask=j_ok[None, :] & d_ok[:, None], other=0.0).to(tl.float16)
        s = tl.dot(q, kt) * scale_log2
        visible = j_ok[None, :] & (j[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & ((pos[:, None] - j[None, :]) < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLITS == 1:
        tl.store(o_ptr + tok[:, None] * stride_ot + head[:, None] * HEAD_DIM + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (tok * N_HEADS + head) * SPLITS + split
        tl.store(part_o + part[:, None] * HD_PAD + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + part, lse, mask=row_ok)
        # the split that arrives last merges all of them (module docstring); the others are done
        count = count_ptr + (b * tl.num_programs(1) + tile) * (N_HEADS // GROUP) + kvh
        if arrive_last(count, SPLITS):
            _merge_splits(part_o, part_lse, o_ptr, tok, head, row_ok, d, d_ok, stride_ot, N_HEADS, HEAD_DIM, HD_PAD,
                          SPLITS, BLOCK_M)
            reset_count(count)


@triton.jit
def _merge_splits(part_o, part_lse, o_ptr, tok, head, row_ok, d, d_ok, stride_ot, N_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[row] = sum_s o_s * 2^(lse_s - max lse) / sum_s 2^(lse_s - max lse) over the SPLITS partials of each
    row (tok, head), in split order; partials are read through L2 (`.cg`): other SMs wrote them."""
    base = (tok * N_HEADS + head) * SPLITS
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(part_lse + base + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg"))
    top = tl.where(row_ok, top, 0.0)  # every real row has a visible key in some split, so its max is finite
    num = tl.zeros((BLOCK_M, HD_PAD), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.exp2(tl.load(part_lse + base + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - top)
        o = tl.load(part_o + (base + s)[:, None] * HD_PAD + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0, cache_modifier=".cg")
        num += o * w[:, None]
        den += w
    out = num / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * stride_ot + head[:, None] * HEAD_DIM + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonPagedAttention(PagedAttention):
    """`PagedAttention` with one Triton kernel over the pool; a full forward without a pool uses the reference.

    `splits` forces the number of key splits per (sequence, kv head) (None: chosen per step, see the module
    docstring); any value gives the same result, only the speed differs.
    """

    def __init__(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None) -> None:
        super().__init__(layer, n_heads, n_kv_heads, head_dim, window)
        self.group = n_heads // n_kv_heads
        self.splits: int | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                 meta: AttentionMetadata) -> torch.Tensor:
        kv = meta.kv
        if kv is None or meta.block_tables is None:
            return super().__call__(q, k, v, meta)
        kc, vc = kv.k[self.layer], kv.v[self.layer]
        self.store(k, v, meta)  # triton's q/k/v projection stores them itself and hands over None
        T = q.shape[0]
        out_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        out = torch.empty(T, self.n_heads * self.head_dim, dtype=out_dtype, device=q.device)
        if T == 0:
            return out
        if q.stride(-1) != 1:
            q = q.contiguous()
        assert kc.stride(-1) == 1 and vc.stride(-1) == 1, "the pool's head_dim must be contiguous"

        hd_pad = max(16, _pow2(self.head_dim))
        group_pad = _pow2(self.group)
        max_q = meta.max_query_len
        prefill_m = 128 if hd_pad <= 64 else 64
        block_m = max(16, group_pad, min(prefill_m, group_pad * _pow2(max_q)))
        block_q = block_m // group_pad
        block_n = 64 if hd_pad <= 128 else 32
        splits = self._splits(meta, q.device, kv.block_size)
        tables = meta.block_tables
        grid = (meta.num_seqs, triton.cdiv(max_q, block_q), self.n_kv_heads * splits)
        if splits > 1:
            part_o = torch.empty(T, self.n_heads, splits, hd_pad, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(T, self.n_heads, splits, dtype=torch.float32, device=q.device)
            count = counters(grid[0] * grid[1] * self.n_kv_heads, q.device, "attention")
        else:
            part_o = part_lse = count = out  # unused
        _paged_attention_kernel[grid](
            q, kc, vc, out, part_o, part_lse, count,
            meta.seq_lens, meta.query_start_tensor(), tables,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), out.stride(0),
            tables.stride(0),
            LOG2E / math.sqrt(self.head_dim), self.window or 0,
            N_HEADS=self.n_heads, HEAD_DIM=self.head_dim, HD_PAD=hd_pad, GROUP=self.group, GROUP_PAD=group_pad,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=kv.block_size, HAS_WINDOW=self.window is not None,
            SPLITS=splits, num_warps=4 if block_m <= 64 else 8, num_stages=2, **pdl(q.device),
        )
        return out

    def _splits(self, meta: AttentionMetadata, device: torch.device, block_size: int) -> int:
        """Key splits per (sequence, kv head): only for decode-shaped steps that leave SMs idle; from shapes only."""
        if self.splits is not None:
            return max(1, self.splits)
        if meta.max_query_len != 1 or device.type != "cuda":
            return 1
        assert meta.block_tables is not None
        programs = meta.num_seqs * self.n_kv_heads
        sms = _sm_count(device)
        if programs >= sms:
            return 1
        max_keys = meta.block_tables.shape[1] * block_size  # an upper bound on every sequence's length
        return max(1, min(MAX_SPLITS, triton.cdiv(sms, programs), max_keys // MIN_KEYS_PER_SPLIT))
