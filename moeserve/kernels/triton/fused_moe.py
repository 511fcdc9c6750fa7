"""The MoE block on the GPU in three kernels over all experts at once (vLLM's fused_moe design).

1. Route and align. Routing: router logits, float32 softmax, top-k, optional renormalisation
   (`moe.route`). Alignment (`align_blocks`): the T*k (token, slot) pairs sorted by expert into
   BLOCK_M-row blocks, each expert's rows padded to whole blocks, so every block belongs to one expert.
   Up to `FUSED_ROUTE_MAX_PAIRS` pairs (decode and small batches) both are one single-program kernel
   (`route_align`); larger steps take two launches of a program per 16 tokens (each program routes its tokens
   and counts their pairs per expert, the last one lays out the blocks; then each places its pairs), instead of
   the ~35 torch ops of `moe.route` + `align_blocks`, which remain the reference (and `mix`'s alignment).
   Steps of up to `ROUTER_FUSED_MAX_T` tokens with a float router also compute the router's logits in that
   launch (`router_route_align`: ~64 programs stream the router, the last one to finish routes and aligns).
2. Gate and up in one kernel: each program takes one block and a column tile, gathers the block's
   token rows, dequantizes its expert's gate and up rows once for the whole block and writes
   `silu(x @ gate.T) * (x @ up.T)` (float32 rounded to TF32 for the down product, one row per pair). Decode
   steps (a few blocks) also split K over programs, as `qmatmul` does, so every SM has work: T=1 is 8 blocks x
   24 column tiles, 192 programs of eight K steps each for 132 SMs without it.
3. Down in one kernel: the same blocks over the activations (a TF32 product: the SwiGLU product may pass
   fp16's range, `qmatmul.group_dot`), each row scaled by its routing weight into a `[T*k, H]` buffer; the
   program that writes a token's last part of a column tile adds the token's k parts in slot order (int32
   arrival counters, no float atomics: deterministic).

A decode step's MoE block is thus router+route_align, gate/up and down: three launches. For a decode
step (T=1, top-8) that is 8 blocks: each active expert's weights are read once.
Every step runs on the device with shapes fixed by T alone: no host synchronisation, CUDA-graph
capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.backend import Linear
from moeserve.kernels.moe import GroupedMoE
from moeserve.kernels.qlinear import ReferenceExperts
from moeserve.kernels.triton.norm import PendingNorm, norm_args, normed_cols, rows_rstd, store_normed
from moeserve.kernels.triton.packing import pack_weight, packable
from moeserve.kernels.triton.pdl import (
    PREFETCH_MAX_BYTES,
    pdl,
    pdl_enter,
    pdl_release,
    pdl_wait,
    prefetch_span,
)
from moeserve.kernels.triton.qmatmul import (
    acc_final,
    acc_init,
    activations,
    arrive_last,
    counters,
    group_dot,
    groups_per_step,
    half_group,
    k_splits,
    prefetch_rows,
    reset_count,
    round_tf32,
    sum_splits,
    weight_args,
    x_group,
)

__all__ = ["FUSED_ROUTE_MAX_PAIRS", "ROUTER_FUSED_MAX_T", "TritonMoE", "align_blocks", "block_m_for", "route_align",
           "router_route_align"]

FUSED_ROUTE_MAX_PAIRS = 1024
"""Up to this many (token, slot) pairs routing and alignment run as one single-program launch; above, as two
launches of a program per `ROUTE_TILE_TOKENS` tokens."""

ROUTE_TILE_TOKENS = 16
"""Tokens per program of the large-step routing kernels."""


def block_m_for(n_pairs: int, n_experts: int) -> int:
    """BLOCK_M for `n_pairs` (token, expert) pairs: 16 while experts average at most 16 rows (decode and
    small batches: little padding, each expert's weights read once), else 64 (prefill: fewer weight
    re-reads per row)."""
    return 16 if n_pairs <= 16 * n_experts else 64


def _n_blocks(n_pairs: int, n_experts: int, block_m: int) -> int:
    """The block count bound of `align_blocks`: every expert's padding is at most block_m - 1 rows."""
    return (n_pairs + min(n_experts, n_pairs) * (block_m - 1)) // block_m


def align_blocks(experts: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Sort the pairs of `experts` [T, k] by expert into `block_m`-row blocks (vLLM's moe_align_block_size).

    Returns (sorted_ids, block_expert, n_rows):
    * sorted_ids int32 [n_blocks * block_m]: the pair index (t * k + slot) of each row, blocks in expert
      order, each expert's rows padded with the sentinel T*k;
    * block_expert int32 [n_blocks]: the expert of each block;
    * n_rows int64 [1]: rows actually used (blocks from n_rows / block_m on are unused: kernels exit).
    n_blocks is the bound (T*k + min(E, T*k) * (block_m - 1)) // block_m, so every shape is a function of
    T alone and nothing is read back to the host (counts by scatter_add_, not bincount).
    """
    flat = experts.reshape(-1)
    n = flat.numel()
    device = flat.device
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[by_expert]
    n_blocks = _n_blocks(n, n_experts, block_m)
    sorted_ids = torch.full((n_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, (ends - padded)[by_expert] + rank, order.to(torch.int32))
    starts = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=n_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:]


@triton.jit
def _route_tile(logits_ptr, stride_l, weights_ptr, experts_ptr, t0, T, E,
                TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_T: tl.constexpr, CG: tl.constexpr):
    """Route tokens t0 .. t0 + BLOCK_T: store their weights and experts; return their pairs per expert.

    A [BLOCK_T, BLOCK_E] logit tile (`CG`: read through L2, other programs of the launch wrote it), TOP_K rounds
    of (max, lowest index attaining it, mask it out); the weights from float64 exps (precise in compiled code
    too, where float32 `exp` is an approximation), taken after the rounds on the [BLOCK_T, K_PAD] tile of the
    chosen logits (a slot per lane, instead of each round's exp on every lane: ~280 of the ~1,750 instructions of
    a decode step's routing on sm_90 were those exps); the rounds' one-hot masks give the per-expert pair counts
    (one cross-warp reduction per tile; the rounds' reductions are along rows, within a warp)."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    kcols = tl.arange(0, K_PAD)
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    where = logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :]
    if CG:
        logit = tl.load(where, mask=row_ok[:, None] & col_ok[None, :], other=0.0, cache_modifier=".cg")
    else:
        logit = tl.load(where, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    logit = logit.to(tl.float32)
    logit = tl.where(col_ok[None, :], logit, float("-inf"))  # rows past T stay finite: no NaNs
    top = tl.max(logit, axis=1)
    work = logit
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    vals = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for r in tl.static_range(TOP_K):
        v = tl.max(work, axis=1)
        # ties: the lowest expert; never one taken or past E (a -inf logit may equal v)
        free = (work == v[:, None]) & (chosen == 0) & col_ok[None, :]
        idx = tl.min(tl.where(free, cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == idx[:, None]
        work = tl.where(hit, float("-inf"), work)
        chosen = tl.where(hit, 1, chosen)
        slot = kcols[None, :] == r
        vals = tl.where(slot, v[:, None], vals)
        ids = tl.where(slot, idx[:, None], ids)
    w = tl.where(kcols[None, :] < TOP_K, tl.exp((vals - top[:, None]).to(tl.float64)), 0.0)
    if RENORMALIZE:
        denom = tl.sum(w, axis=1)  # the selected exps (slots past TOP_K hold 0)
    else:
        denom = tl.sum(tl.exp((logit - top[:, None]).to(tl.float64)), axis=1)
    off = rows[:, None] * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + off, (w / denom[:, None]).to(tl.float32), mask=out_ok)
    tl.store(experts_ptr + off, ids.to(tl.int64), mask=out_ok)
    return tl.sum(tl.where(row_ok[:, None], chosen, 0), axis=0)


@triton.jit
def _layout(counts, sorted_ptr, block_expert_ptr, n_rows_ptr, n_pairs, E, n_blocks,
            BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """From the pairs per expert: padded counts, their cumsum (each expert's padded end), n_rows; the sentinel
    fill of sorted_ids; block_expert[b] = #experts whose padded end <= b * BLOCK_M (clamped to E - 1 like
    searchsorted). Returns each expert's first row."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # experts past E: no pairs, end = total
    tl.store(n_rows_ptr, tl.sum(padded, axis=0).to(tl.int64))
    n_slots = n_blocks * BLOCK_M
    sentinel = tl.zeros([BLOCK_S], dtype=tl.int32) + n_pairs
    for s0 in range(0, n_slots, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        tl.store(sorted_ptr + offs, sentinel, mask=offs < n_slots)
    for b0 in range(0, n_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((ends[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.minimum(expert, E - 1), mask=blocks < n_blocks)
    return ends - padded


@triton.jit
def _scatter_pairs(experts_ptr, sorted_ptr, base, p_begin, p_end, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """sorted_ids[row] = pair for pairs p_begin .. p_end, `base` [BLOCK_E] being each expert's next free row: per
    BLOCK_P pairs, a [BLOCK_P, BLOCK_E] one-hot of their experts; a pair's row is its expert's base + the pairs of
    that expert before it in the chunk (an exclusive cumsum down the one-hot), so the order within an expert is
    the pair order (stable)."""
    cols = tl.arange(0, BLOCK_E)
    for p0 in range(p_begin, p_end, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        ok = pairs < p_end
        e = tl.load(experts_ptr + pairs, mask=ok, other=BLOCK_E).to(tl.int32)  # BLOCK_E: matches no column
        onehot = (e[:, None] == cols[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot
        row = tl.sum(onehot * (base[None, :] + before), axis=1)
        tl.store(sorted_ptr + row, pairs, mask=ok)
        base += tl.sum(onehot, axis=0)


@triton.jit
def _route_align(logits_ptr, stride_l, weights_ptr, experts_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr,
                 T, E, n_blocks,
                 TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, CG: tl.constexpr):
    """`moe.route` then `align_blocks` in one program (see `route_align`): route every tile of tokens, lay out
    the blocks, then (after a barrier: the expert ids and sentinels are in global memory) scatter every pair."""
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        counts += _route_tile(logits_ptr, stride_l, weights_ptr, experts_ptr, t0, T, E, TOP_K, K_PAD, RENORMALIZE,
                              BLOCK_E, BLOCK_T, CG)
    base = _layout(counts, sorted_ptr, block_expert_ptr, n_rows_ptr, T * TOP_K, E, n_blocks, BLOCK_M, BLOCK_B,
                   BLOCK_S)
    tl.debug_barrier()
    _scatter_pairs(experts_ptr, sorted_ptr, base, 0, T * TOP_K, BLOCK_E, BLOCK_P)


@triton.jit
def _route_tiles_kernel(logits_ptr, stride_l, weights_ptr, experts_ptr, tile_counts_ptr, tile_base_ptr, count_ptr,
                        sorted_ptr, block_expert_ptr, n_rows_ptr, T, E, n_blocks,
                        TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Large steps, first launch: each program routes BLOCK_T tokens and stores its pairs per expert; the last
    program to finish lays out the blocks and stores each tile's first row per expert (the tiles before it, in
    order: stable), for `_scatter_tiles_kernel`."""
    pdl_enter(PDL)
    tile = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    counts = _route_tile(logits_ptr, stride_l, weights_ptr, experts_ptr, tile * BLOCK_T, T, E, TOP_K, K_PAD,
                         RENORMALIZE, BLOCK_E, BLOCK_T, False)
    tl.store(tile_counts_ptr + tile * BLOCK_E + cols, counts)
    n_tiles = tl.num_programs(0)
    if arrive_last(count_ptr, n_tiles):
        total = tl.zeros([BLOCK_E], dtype=tl.int32)
        for t in range(0, n_tiles):
            total += tl.load(tile_counts_ptr + t * BLOCK_E + cols, cache_modifier=".cg")
        base = _layout(total, sorted_ptr, block_expert_ptr, n_rows_ptr, T * TOP_K, E, n_blocks, BLOCK_M, BLOCK_B,
                       BLOCK_S)
        for t in range(0, n_tiles):
            tl.store(tile_base_ptr + t * BLOCK_E + cols, base)
            base += tl.load(tile_counts_ptr + t * BLOCK_E + cols, cache_modifier=".cg")
        reset_count(count_ptr)


@triton.jit
def _scatter_tiles_kernel(experts_ptr, sorted_ptr, tile_base_ptr, T,
                          TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                          PDL: tl.constexpr):
    """Large steps, second launch: each program places its tile's pairs from the tile's first rows."""
    pdl_enter(PDL)
    tile = tl.program_id(0)
    base = tl.load(tile_base_ptr + tile * BLOCK_E + tl.arange(0, BLOCK_E))
    p_begin = tile * BLOCK_T * TOP_K
    _scatter_pairs(experts_ptr, sorted_ptr, base, p_begin, tl.minimum(p_begin + BLOCK_T * TOP_K, T * TOP_K),
                   BLOCK_E, BLOCK_P)


@triton.jit
def _route_align_kernel(logits_ptr, stride_l, weights_ptr, experts_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr,
                        T, E, n_blocks,
                        TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Routing and alignment of given router logits, one program."""
    pdl_enter(PDL)
    _route_align(logits_ptr, stride_l, weights_ptr, experts_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr, T, E,
                 n_blocks, TOP_K, K_PAD, RENORMALIZE, BLOCK_M, BLOCK_E, BLOCK_T, BLOCK_P, BLOCK_B, BLOCK_S, False)


@triton.jit
def _router_route_align_kernel(h_ptr, stride_h, router_ptr, logits_ptr, count_ptr, weights_ptr, experts_ptr,
                               sorted_ptr, block_expert_ptr, n_rows_ptr, T, E, H, n_blocks,
                               delta_ptr, nw_ptr, s_ptr, normed_ptr, norm_eps,
                               ROUTER_T: tl.constexpr, ROUTER_E: tl.constexpr, ROUTER_K: tl.constexpr,
                               PROGRAMS: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr,
                               N_ROWS: tl.constexpr, H_PAD: tl.constexpr, NORM_COLS: tl.constexpr,
                               TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """The router's logits, then routing and alignment, in one launch (see `router_route_align`).

    Each of the PROGRAMS programs computes the logits of ROUTER_E experts for the step's (at most ROUTER_T)
    tokens in float32 — products summed along H in ROUTER_K-wide chunks, a fixed order whatever the arrival —
    and stores them; the program that arrives last (`arrive_last`) routes and aligns every token from them and
    resets the counter for the next launch or graph replay. With PDL its router rows are asked of L2 before it
    waits for the previous kernel (the norm that makes h). With NORM, h is the FFN norm still to take
    (`norm.PendingNorm`): every program normalises the rows itself and stores NORM_COLS columns of the residual
    stream x + delta (`s_ptr`) and of the normed rows the expert kernels read (`normed_ptr`)."""
    pdl_release(PDL)
    if PDL:
        e0 = tl.program_id(0) * ROUTER_E
        prefetch_span(router_ptr, e0 * H, tl.minimum(e0 + ROUTER_E, E) * H - 1)
    pdl_wait(PDL)
    experts = tl.program_id(0) * ROUTER_E + tl.arange(0, ROUTER_E)
    e_ok = experts < E
    toks = tl.arange(0, ROUTER_T)
    t_ok = toks < T
    if NORM:  # each program also stores its share of the columns of s and of the normed rows
        rstd = rows_rstd(h_ptr, delta_ptr, stride_h, toks, T, H, norm_eps, HAS_DELTA, N_ROWS, H_PAD)
        c0 = tl.program_id(0) * NORM_COLS
        store_normed(h_ptr, delta_ptr, nw_ptr, s_ptr, normed_ptr, stride_h, toks, T, c0, tl.minimum(c0 + NORM_COLS, H),
                     rstd, HAS_DELTA, True, NORM_COLS)
    acc = tl.zeros((ROUTER_T, ROUTER_E), dtype=tl.float32)
    for k0 in range(0, H, ROUTER_K):
        k = k0 + tl.arange(0, ROUTER_K)
        k_ok = k < H
        if NORM:
            x = normed_cols(h_ptr, delta_ptr, nw_ptr, tl.minimum(toks, T - 1) * stride_h, tl.minimum(k, H - 1), rstd,
                            HAS_DELTA)
            x = tl.where(t_ok[:, None] & k_ok[None, :], x, 0.0)
        else:
            x = tl.load(h_ptr + toks[:, None] * stride_h + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0)
        w = tl.load(router_ptr + experts[:, None].to(tl.int64) * H + k[None, :], mask=e_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(logits_ptr + toks[:, None] * E + experts[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
    if arrive_last(count_ptr, PROGRAMS):
        _route_align(logits_ptr, E, weights_ptr, experts_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr, T, E,
                     n_blocks, TOP_K, K_PAD, RENORMALIZE, BLOCK_M, BLOCK_E, BLOCK_T, BLOCK_P, BLOCK_B, BLOCK_S, True)
        reset_count(count_ptr)


def _route_align_config(T: int, E: int, top_k: int, block_m: int) -> dict[str, int]:
    """The constexprs and warps of `_route_align_kernel`: one warp while the pair tile has at most 2048
    elements (decode: T=1, top-8, E=128), so every reduction is warp shuffles; 4 or 8 warps above. Tile
    rows: at most 16 elements a thread in the top-k tile (eight unrolled rounds), 32 in the pair and block
    tiles (no spills on sm_90)."""
    n_pairs, block_e = T * top_k, triton.next_power_of_2(E)
    n_blocks = _n_blocks(n_pairs, E, block_m)
    work = max(T, n_pairs) * block_e
    num_warps = 1 if work <= 2048 else 4 if work <= 32768 else 8
    threads = 32 * num_warps
    return dict(TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_M=block_m, BLOCK_E=block_e,
                BLOCK_T=min(max(1, 16 * threads // block_e), triton.next_power_of_2(T)),
                BLOCK_P=min(max(1, 32 * threads // block_e), triton.next_power_of_2(n_pairs)),
                BLOCK_B=min(max(1, 32 * threads // block_e), triton.next_power_of_2(n_blocks)),
                BLOCK_S=min(32 * threads, triton.next_power_of_2(n_blocks * block_m)), num_warps=num_warps)


def _route_outputs(T: int, E: int, top_k: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty (weights, experts, sorted_ids, block_expert, n_rows) for the routing kernels (n_rows is zero when T
    is: no kernel fills it)."""
    if not 0 < top_k <= E:
        raise ValueError(f"routing takes 1 <= top_k <= E, got E={E}, top_k={top_k}")
    n_blocks = _n_blocks(T * top_k, E, block_m)
    return (torch.empty(T, top_k, dtype=torch.float32, device=device),
            torch.empty(T, top_k, dtype=torch.int64, device=device),
            torch.empty(n_blocks * block_m, dtype=torch.int32, device=device),
            torch.empty(n_blocks, dtype=torch.int32, device=device),
            (torch.empty if T else torch.zeros)(1, dtype=torch.int64, device=device))


def route_align(logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int) -> tuple[torch.Tensor, ...]:
    """`moe.route(logits, top_k, renormalize)` then `align_blocks(experts, E, block_m)` on the device: one
    single-program launch up to `FUSED_ROUTE_MAX_PAIRS` pairs, two launches of a program per 16-token tile
    above (`_route_tiles_kernel`, `_scatter_tiles_kernel`).

    Returns (weights [T, k] float32, experts [T, k] int64, sorted_ids, block_expert, n_rows) with the
    meaning, dtypes and shapes of those functions. Experts are taken by logit; ties go to the lowest
    expert index (torch.topk leaves tie order unspecified). Weights are exp(l - max) over the sum of the
    selected (renormalize) or of all exps, computed in float64 and rounded once.
    """
    T, E = logits.shape
    outs = _route_outputs(T, E, top_k, block_m, logits.device)
    if logits.dtype == torch.float64 or (logits.dtype == torch.bfloat16 and logits.device.type != "cuda"):
        logits = logits.float()  # the interpreter has no bfloat16
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if T == 0:
        return outs
    n_blocks = outs[3].shape[0]
    if T * top_k <= FUSED_ROUTE_MAX_PAIRS:
        _route_align_kernel[(1,)](logits, logits.stride(0), *outs, T, E, n_blocks, RENORMALIZE=bool(renormalize),
                                  **_route_align_config(T, E, top_k, block_m), **pdl(logits.device))
        return outs
    config = _route_align_config(ROUTE_TILE_TOKENS, E, top_k, block_m)
    config["BLOCK_S"] = 32 * 32 * config["num_warps"]  # the sentinel fill of every block, by one program
    tiles = triton.cdiv(T, config["BLOCK_T"])
    block_e = config["BLOCK_E"]
    tile_counts = torch.empty(tiles, block_e, dtype=torch.int32, device=logits.device)
    tile_base = torch.empty_like(tile_counts)
    weights, experts, sorted_ids, block_expert, n_rows = outs
    _route_tiles_kernel[(tiles,)](
        logits, logits.stride(0), weights, experts, tile_counts, tile_base, counters(1, logits.device, "route"),
        sorted_ids, block_expert, n_rows, T, E, n_blocks, RENORMALIZE=bool(renormalize),
        **{k: v for k, v in config.items() if k != "BLOCK_P"}, **pdl(logits.device))
    _scatter_tiles_kernel[(tiles,)](experts, sorted_ids, tile_base, T, TOP_K=top_k, BLOCK_E=block_e,
                                    BLOCK_T=config["BLOCK_T"], BLOCK_P=config["BLOCK_P"],
                                    num_warps=config["num_warps"], **pdl(logits.device))
    return outs


ROUTER_FUSED_MAX_T = 16
"""Steps of up to this many tokens (decode) compute the router logits in the routing launch too."""


def router_route_align(h: torch.Tensor | PendingNorm, router: torch.Tensor, top_k: int, renormalize: bool,
                       block_m: int, normed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """`route_align(h @ router.T, ...)` with the router's product in the same launch, for up to
    `ROUTER_FUSED_MAX_T` tokens: `h` [T, H], `router` [E, H] float32 or float16 (products and sums in float32).

    The logits are spread over programs of a few experts each (every SM streams part of the router); the last
    program to finish routes and aligns (`_router_route_align_kernel`). Returns what `route_align` returns.
    `h` may be a pending norm (`norm.PendingNorm`), taken in the same launch, which then also stores the normed
    rows into `normed` (float32 [T, H]) and the residual stream into the pending norm's `s`."""
    h, norm = norm_args(h)
    if not norm["NORM"]:
        h = normed = activations(h)
    elif normed is None or normed.shape != h.shape or not normed.is_contiguous():
        raise ValueError(f"a pending norm needs a contiguous float32 {tuple(h.shape)} buffer for the normed rows")
    T, H = h.shape
    E = router.shape[0]
    if T > ROUTER_FUSED_MAX_T or router.shape[1] != H:
        raise ValueError(f"router_route_align takes up to {ROUTER_FUSED_MAX_T} tokens of a [E, {H}] router, "
                         f"got T={T}, router {tuple(router.shape)}")
    outs = _route_outputs(T, E, top_k, block_m, h.device)
    if T == 0:
        return outs
    config = _route_align_config(T, E, top_k, block_m)
    rows = triton.next_power_of_2(T)
    per_program = triton.next_power_of_2(max(1, E // 64))  # ~64 programs share the router's bytes
    chunk = max(16, min(triton.next_power_of_2(H), 1024 * config["num_warps"] // (rows * per_program)))
    programs = triton.cdiv(E, per_program)
    logits = torch.empty(T, E, dtype=torch.float32, device=h.device)
    _router_route_align_kernel[(programs,)](
        h, h.stride(0), router, logits, counters(1, h.device, "router"), *outs, T, E, H, outs[3].shape[0],
        norm["delta"], norm["weight"], norm["s"], normed, norm["eps"],
        ROUTER_T=rows, ROUTER_E=per_program, ROUTER_K=chunk, PROGRAMS=programs, RENORMALIZE=bool(renormalize),
        NORM=norm["NORM"], HAS_DELTA=norm["HAS_DELTA"], N_ROWS=norm["N_ROWS"], H_PAD=norm["H_PAD"],
        NORM_COLS=triton.next_power_of_2(triton.cdiv(H, programs)),
        **config, **pdl(h.device))
    return outs


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, n_pairs, BLOCK_M: tl.constexpr):
    """This block's pair ids [BLOCK_M], which of them are real, and its expert (int64)."""
    pid_m = tl.program_id(0)
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return ids, ids < n_pairs, expert


@triton.jit
def _gate_up_kernel(x_ptr, act_ptr, part_ptr, count_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr, n_pairs, stride_x,
                    I, groups_per_split,
                    g_qs, g_qh, g_sc, g_mn, g_d, g_dm, u_qs, u_qh, u_sc, u_mn, u_d, u_dm, s_qs, s_qh, s_sc, s_d,
                    dn_qs, dn_qh, dn_sc, dn_mn, dn_d, dn_dm, dn_s_qs, dn_s_qh, dn_s_sc, dn_s_d, H,
                    TOP_K: tl.constexpr, QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr, SPLIT_K: tl.constexpr,
                    DOWN_QTYPE: tl.constexpr, PREFETCH_DOWN: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr):
    """act[pair, cols] = silu(x[token] @ gate[e, cols].T) * (x[token] @ up[e, cols].T) for one block's pairs,
    or with SPLIT_K > 1 the K range `program_id(2)` of both products.

    Split-K as in `qmatmul`: each split stores its two partial tiles (the block's real rows only) and counts
    itself in the (block, column tile) counter; the split that arrives last adds the partials in split order
    (deterministic), applies SiLU·mul, stores act and resets the counter.

    PREFETCH_DOWN (decode, on a GPU with `pdl`): the block's programs first ask L2 for the down rows of their
    expert (`dn_*`, an even share each), which no kernel can know before routing: the down kernel then reads them
    from L2, fetched while gate/up streams its own weights. WIDE (BF16 gate/up): TF32 products (`group_dot`)."""
    pdl_enter(PDL)
    if tl.program_id(0) * BLOCK_M >= tl.load(n_rows_ptr):
        return
    ids, valid, expert = _block_rows(sorted_ptr, block_expert_ptr, n_pairs, BLOCK_M)
    if PREFETCH_DOWN:
        share = tl.cdiv(H, tl.num_programs(1) * tl.num_programs(2))
        first = (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)) * share
        last = tl.minimum(first + share, H) - 1
        if first <= last:
            prefetch_rows(dn_qs, dn_qh, dn_sc, dn_mn, dn_d, dn_dm, dn_s_qs, dn_s_qh, dn_s_sc, dn_s_d,
                          expert * H + first, expert * H + last, DOWN_QTYPE)
    xoff = tl.where(valid, ids // TOP_K, 0).to(tl.int64) * stride_x  # padding rows read token 0, never stored
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = expert * I + tl.minimum(offs_n, I - 1)
    acc_g = acc_init(BLOCK_M, BLOCK_N, SWAP)
    acc_u = acc_init(BLOCK_M, BLOCK_N, SWAP)
    g0 = tl.program_id(2) * groups_per_split
    for kb in range(g0, g0 + groups_per_split, GPI):
        for gi in tl.static_range(GPI):
            x_lo, x_hi = x_group(x_ptr, xoff, kb + gi, SH, WIDE, ROUND=WIDE)
            acc_g = group_dot(acc_g, x_lo, x_hi, g_qs, g_qh, g_sc, g_mn, g_d, g_dm, s_qs, s_qh, s_sc, s_d,
                              rows, kb + gi, QTYPE, SH, SWAP, WIDE)
            acc_u = group_dot(acc_u, x_lo, x_hi, u_qs, u_qh, u_sc, u_mn, u_d, u_dm, s_qs, s_qh, s_sc, s_d,
                              rows, kb + gi, QTYPE, SH, SWAP, WIDE)
    acc_g = acc_final(acc_g, SWAP)
    acc_u = acc_final(acc_u, SWAP)
    mask = valid[:, None] & (offs_n[None, :] < I)
    cell = ids[:, None].to(tl.int64) * I + offs_n[None, :]
    if SPLIT_K > 1:
        split = n_pairs.to(tl.int64) * I  # part is [SPLIT_K, 2, n_pairs, I]
        mine = part_ptr + tl.program_id(2) * 2 * split + cell
        tl.store(mine, acc_g, mask=mask)
        tl.store(mine + split, acc_u, mask=mask)
        count = count_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if arrive_last(count, SPLIT_K):
            acc_g = sum_splits(part_ptr + cell, 2 * split, mask, SPLIT_K)
            acc_u = sum_splits(part_ptr + split + cell, 2 * split, mask, SPLIT_K)
            act = acc_g * tl.sigmoid(acc_g) * acc_u
            tl.store(act_ptr + cell, round_tf32(act), mask=mask)
            reset_count(count)
    else:
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(act_ptr + cell, round_tf32(act), mask=mask)


@triton.jit
def _down_kernel(act_ptr, part_ptr, out_ptr, count_ptr, weight_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr,
                 n_pairs, H, I, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                 TOP_K: tl.constexpr, QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr):
    """part[pair, cols] = routing_weight[pair] * (act[pair] @ down[e, cols].T) for one block's pairs; then
    out[token, cols] = sum of the token's k parts, in slot order, by whichever program adds the token's last
    part to this column tile.

    Each valid row counts itself in its (token, column tile) counter (`arrive_last`). The row that brings the
    count to TOP_K adds the k parts — read through L2 (`.cg`), other SMs wrote them — stores the sum and resets
    the counter for the next launch or graph replay. A token appears at most once in a block (its k experts are
    distinct). Deterministic: the order of the sum is fixed whichever program finishes it."""
    pdl_enter(PDL)
    if tl.program_id(0) * BLOCK_M >= tl.load(n_rows_ptr):
        return
    ids, valid, expert = _block_rows(sorted_ptr, block_expert_ptr, n_pairs, BLOCK_M)
    pair = tl.where(valid, ids, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = expert * H + tl.minimum(offs_n, H - 1)
    acc = acc_init(BLOCK_M, BLOCK_N, SWAP)
    for kb in range(0, n_groups, GPI):
        for gi in tl.static_range(GPI):
            x_lo, x_hi = x_group(act_ptr, pair * I, kb + gi, SH, WIDE=True)
            acc = group_dot(acc, x_lo, x_hi, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                            rows, kb + gi, QTYPE, SH, SWAP, WIDE=True)
    acc = acc_final(acc, SWAP) * tl.load(weight_ptr + pair)[:, None]
    cols_ok = offs_n[None, :] < H
    tl.store(part_ptr + pair[:, None] * H + offs_n[None, :], acc, mask=valid[:, None] & cols_ok)
    token = pair // TOP_K
    count = count_ptr + token * tl.num_programs(1) + tl.program_id(1)
    last = valid & arrive_last(count, TOP_K, valid)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        total += tl.load(part_ptr + (token * TOP_K + j)[:, None] * H + offs_n[None, :], mask=last[:, None] & cols_ok,
                         other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + token[:, None] * H + offs_n[None, :], total, mask=last[:, None] & cols_ok)
    reset_count(count, last)


class TritonMoE:
    """The MoE block (the MoEBlock protocol) with fused Triton expert kernels over packed expert stacks.

    `gate`/`up` are `[E, I, H]` stacks of one quant type, `down` `[E, H, I]` of any packed type (the quant types
    and F16/BF16). Stacks the kernels cannot take (F32, or gate and up of different types) run the reference
    GroupedMoE.
    """

    def __init__(self, router: Linear, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
                 renormalize: bool) -> None:
        self.router, self.top_k, self.renormalize = router, top_k, renormalize
        # a float router's matrix, for decode steps that compute its logits in the routing launch
        w = getattr(router, "dense_weight", None)
        self.router_weight = None if w is None else w.float() if w.dtype == torch.bfloat16 else w.contiguous()
        self.n_experts, self.inter, self.hidden = gate.shape
        if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (self.n_experts, self.hidden, self.inter):
            raise ValueError(f"expert stacks do not fit: gate {gate.shape}, up {up.shape}, down {down.shape}")
        self.split_k: int | None = None  # gate/up K splits: None picks them (decode blocks only); tests force them
        self._reference: GroupedMoE | None = None
        if QT(gate.qtype) != QT(up.qtype) or not all(packable(w) for w in (gate, up, down)):
            self._reference = GroupedMoE(router, ReferenceExperts(gate), ReferenceExperts(up),
                                         ReferenceExperts(down), top_k, renormalize)
            return
        self.gate, self.up, self.down = pack_weight(gate), pack_weight(up), pack_weight(down)

    @property
    def takes_pending_norm(self) -> bool:
        """The routing launch takes the FFN norm of a decode step itself (`norm.PendingNorm`)."""
        return self._reference is None and self.router_weight is not None

    def __call__(self, h: torch.Tensor | PendingNorm) -> torch.Tensor:
        T, E, k = h.shape[0], self.n_experts, self.top_k
        n_pairs = T * k
        fused_route = self.router_weight is not None and T <= ROUTER_FUSED_MAX_T and n_pairs <= FUSED_ROUTE_MAX_PAIRS
        if isinstance(h, PendingNorm) and (self._reference is not None or not fused_route):
            h = h.tensor()
        if self._reference is not None:
            return self._reference(h)
        if T == 0:
            return torch.zeros(0, self.hidden, dtype=torch.float32, device=h.device)
        block_m = block_m_for(n_pairs, E)
        if fused_route:
            normed = torch.empty(h.shape, dtype=torch.float32, device=h.device) if isinstance(h, PendingNorm) \
                else None
            weights, _, sorted_ids, block_expert, n_rows = router_route_align(h, self.router_weight, k,
                                                                              self.renormalize, block_m, normed)
            if normed is not None:
                h = normed
        else:
            weights, _, sorted_ids, block_expert, n_rows = route_align(self.router(h), k, self.renormalize, block_m)
        return self._experts(h, weights, sorted_ids, block_expert, n_rows, k, block_m)

    def mix(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_j weights[:, j] * expert_{experts[:, j]}(h) for routing decided elsewhere (expert parallel)."""
        if self._reference is not None:
            return self._reference.mix(h, weights, experts)
        T, k = experts.shape
        if T == 0:
            return torch.zeros(0, self.hidden, dtype=torch.float32, device=h.device)
        block_m = block_m_for(T * k, self.n_experts)
        sorted_ids, block_expert, n_rows = align_blocks(experts, self.n_experts, block_m)
        return self._experts(h, weights.float(), sorted_ids, block_expert, n_rows, k, block_m)

    def _experts(self, h: torch.Tensor, weights: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                 n_rows: torch.Tensor, k: int, block_m: int) -> torch.Tensor:
        """gate+up (SiLU·mul) and down over the expert-sorted pairs, then each token's sum over its k pairs.

        Decode blocks (16 rows) run the down product transposed (`group_dot`'s SWAP: on sm_90 its K loop issues
        1021 instead of 1091 instructions for Q4_K, 1395 instead of 1540 for Q6_K, `benchmarks/sass_report.py`);
        gate/up stays as it is (its 32-column tiles transposed compile to 1.8x the instructions)."""
        T, n_pairs, n_blocks = h.shape[0], h.shape[0] * k, block_expert.shape[0]
        h = activations(h)

        gate, up, down = self.gate, self.up, self.down
        sh = half_group(gate.qtype)
        n_groups = self.hidden // (2 * sh)
        gpi = groups_per_step(gate.qtype, n_groups, block_m)
        block_n = 32 if block_m == 16 else 64  # decode: two weight tiles per program, and programs for every SM
        col_tiles = triton.cdiv(self.inter, block_n)
        forced = self.split_k
        if forced is None and block_m != 16:
            forced = 1  # only decode blocks split K
        splits = k_splits(n_groups // gpi, n_blocks * col_tiles, h.device, forced)
        launch = pdl(h.device)
        # decode steps of a few blocks (T <= 2 at 128 experts) also fetch their experts' down rows into L2
        prefetch_down = (block_m == 16 and n_blocks * (down.nbytes // self.n_experts) <= PREFETCH_MAX_BYTES
                         and launch["PDL"])
        act = torch.empty(n_pairs, self.inter, dtype=torch.float32, device=h.device)
        part = torch.empty(splits, 2, n_pairs, self.inter, dtype=torch.float32, device=h.device) if splits > 1 else act
        locks = counters(n_blocks * col_tiles, h.device, "moe_gate_up") if splits > 1 else act
        _gate_up_kernel[(n_blocks, col_tiles, splits)](
            h, act, part, locks, sorted_ids, block_expert, n_rows, n_pairs, h.stride(0), self.inter,
            n_groups // splits, *weight_args(gate)[:6], *weight_args(up), *weight_args(down), self.hidden,
            TOP_K=k, QTYPE=int(gate.qtype), SH=sh, GPI=gpi, BLOCK_M=block_m, BLOCK_N=block_n, SWAP=False,
            SPLIT_K=splits, DOWN_QTYPE=int(down.qtype), PREFETCH_DOWN=prefetch_down, WIDE=gate.tf32,
            num_warps=4, num_stages=3, **launch)

        sh = half_group(down.qtype)
        n_groups = self.inter // (2 * sh)
        block_n = 64
        tiles = triton.cdiv(self.hidden, block_n)
        part = torch.empty(n_pairs, self.hidden, dtype=torch.float32, device=h.device)
        out = torch.empty(T, self.hidden, dtype=torch.float32, device=h.device)
        _down_kernel[(n_blocks, tiles)](
            act, part, out, counters(T * tiles, h.device, "moe_down"), weights.reshape(-1).contiguous(), sorted_ids,
            block_expert, n_rows, n_pairs, self.hidden, self.inter, n_groups, *weight_args(down),
            TOP_K=k, QTYPE=int(down.qtype), SH=sh, GPI=groups_per_step(down.qtype, n_groups, block_m),
            BLOCK_M=block_m, BLOCK_N=block_n, SWAP=block_m == 16, num_warps=4, num_stages=3, **launch)
        return out
