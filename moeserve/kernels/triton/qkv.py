"""The q/k/v projection of an attention layer: products, Qwen3's per-head QK RMSNorm, RoPE, the KV-pool store.

`TritonQKV` finishes every head in the epilogue of its product (`_qkv_heads_kernel`): a head's dimensions are
whole 64-wide column tiles of the stacked q|k|v weight (`qmatmul.PLAN_BLOCK_N`), so the program that adds the
last partial tile of a head (split-K's arrival counter, counted per head instead of per tile) holds everything
the head needs. It sums the head's partials for a few tokens at a time, applies the per-head RMSNorm when its
weight is given, rotates the first `rope_dim` dimensions with the load-time cos/sin tables at each token's
position (NEOX "rotate half" or interleaved pairs; the rest of the head passes through), and stores q, or k and
v straight into the tokens' pool slots (cast to the pool's dtype). A decode layer's q/k/v then costs one launch
instead of two or three (the product, a second product where attn_v has its own quant type — Q4_K_M's Q6_K
layers —, and the QK-norm kernel): a v of another type gets its own K loop in the same kernel, its tiles after
the stacked q|k tiles in the grid. In a decode step of a row or two the same launch also takes the attention
norm of its input (`norm.PendingNorm`): one launch for everything between the residual stream and attention.

A dimension's rotation partner is summed again from the partials (and normalised with the same per-head scale)
instead of shuffled in registers. Positions and slots are read on the device: no host sync.

Projections whose heads are not whole tiles (a head_dim that is not 64, 128 or 256), or whose weights are not
all packed without bias (qwen2's biases, float weights), keep the three linears the backend made and finish q
and k in one separate kernel (`_qk_norm_rope_kernel`, a block of heads of one token per program), which also
stores k and v into the pool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.backend import Linear
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.kernels.reference import QKVRope
from moeserve.kernels.rope import Rope
from moeserve.kernels.triton.norm import PendingNorm, norm_args, store_normed
from moeserve.kernels.triton.packing import PackedWeight
from moeserve.kernels.triton.pdl import pdl, pdl_enter
from moeserve.kernels.triton.qmatmul import (
    PLAN_BLOCK_N,
    TritonLinear,
    activations,
    arrive_last,
    counters,
    plan_products,
    reset_count,
    sum_splits,
    tile_product,
    weight_args,
)


@triton.jit
def _rope_pairs(d, ROPE_DIM: tl.constexpr, NEOX: tl.constexpr):
    """For head dimensions `d`: the rotation partner, the frequency index, whether the dimension is its pair's first
    (it takes -sin), and whether it rotates at all (partial RoPE)."""
    HALF: tl.constexpr = ROPE_DIM // 2
    if NEOX:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        freq = tl.where(d < HALF, d, d - HALF)
        first = d < HALF
    else:
        partner = d ^ 1
        freq = d // 2
        first = (d % 2) == 0
    return partner, freq, first, d < ROPE_DIM


@triton.jit
def _norm_rope(x, xp, w_ptr, d, partner, rot, first, cos, sin, eps, HAS_NORM: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Rows of heads x ([rows, HD_PAD] float32, zero past HEAD_DIM) and their partners' values xp: RMSNorm with
    `w_ptr` (HAS_NORM), then the rotation (`cos`/`sin` broadcast against x; 1 and 0 where nothing rotates)."""
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)
        w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * w[None, :]
        xp = xp * rstd[:, None] * wp[None, :]
    sign = tl.where(first, -1.0, 1.0)
    return x * cos + sign[None, :] * xp * sin


# --------------------------------------------------------------------------------------------
# the product with the heads finished in its epilogue
# --------------------------------------------------------------------------------------------


@triton.jit
def _finish_head(part_ptr, stride_ps, stride_pm, M, pid_m, head, q_out, k_out, v_out, rows_ptr, qw_ptr, kw_ptr,
                 pos_ptr, cos_ptr, sin_ptr, stride_qot, stride_qoh, stride_kot, stride_koh, stride_vot, stride_voh,
                 stride_cos, n_q_heads, n_kv_heads, eps,
                 BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr,
                 NEOX: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, WRITE_KV: tl.constexpr):
    """Head `head` of the layer (q heads, then k, then v) for the row tile `pid_m`, from the summed partials, SUB
    tokens at a time (a [SUB, HEAD_DIM] tile keeps registers low)."""
    SUB: tl.constexpr = 16
    d = tl.arange(0, HEAD_DIM)
    partner, freq, first, rot = _rope_pairs(d, ROPE_DIM, NEOX)
    for r0 in tl.static_range(0, BLOCK_M, SUB):
        t = pid_m * BLOCK_M + r0 + tl.arange(0, SUB)
        ok = t < M
        src = part_ptr + t[:, None].to(tl.int64) * stride_pm + head * HEAD_DIM
        x = sum_splits(src + d[None, :], stride_ps, ok[:, None], SPLIT_K)
        if WRITE_KV:
            row = tl.load(rows_ptr + t, mask=ok, other=0).to(tl.int64)
        else:
            row = t.to(tl.int64)
        if head < n_q_heads + n_kv_heads:  # q or k: normalise and rotate
            xp = sum_splits(src + partner[None, :], stride_ps, ok[:, None] & rot[None, :], SPLIT_K)
            pos = tl.load(pos_ptr + t, mask=ok, other=0)
            at = pos[:, None] * stride_cos + freq[None, :]
            cos = tl.load(cos_ptr + at, mask=ok[:, None] & rot[None, :], other=1.0)
            sin = tl.load(sin_ptr + at, mask=ok[:, None] & rot[None, :], other=0.0)
            if head < n_q_heads:
                y = _norm_rope(x, xp, qw_ptr, d, partner, rot, first, cos, sin, eps, HAS_QNORM, HEAD_DIM)
                tl.store(q_out + t[:, None].to(tl.int64) * stride_qot + head * stride_qoh + d[None, :], y,
                         mask=ok[:, None])
            else:
                y = _norm_rope(x, xp, kw_ptr, d, partner, rot, first, cos, sin, eps, HAS_KNORM, HEAD_DIM)
                tl.store(k_out + row[:, None] * stride_kot + (head - n_q_heads) * stride_koh + d[None, :],
                         y.to(k_out.dtype.element_ty), mask=ok[:, None])
        else:
            tl.store(v_out + row[:, None] * stride_vot + (head - n_q_heads - n_kv_heads) * stride_voh + d[None, :],
                     x.to(v_out.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _qkv_heads_kernel(x_ptr, part_ptr, count_ptr, M, N, N_A, stride_xm, stride_ps, stride_pm,
                      qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, groups_per_split,
                      qs_b, qh_b, sc_b, mn_b, d_b, dm_b, s_qs_b, s_qh_b, s_sc_b, s_d_b, groups_per_split_b,
                      q_out, k_out, v_out, rows_ptr, qw_ptr, kw_ptr, pos_ptr, cos_ptr, sin_ptr,
                      stride_qot, stride_qoh, stride_kot, stride_koh, stride_vot, stride_voh, stride_cos,
                      n_q_heads, n_kv_heads, eps, delta_ptr, nw_ptr, s_ptr, K, norm_eps,
                      QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr, PREFETCH: tl.constexpr,
                      TWO: tl.constexpr, QTYPE_B: tl.constexpr, SH_B: tl.constexpr, GPI_B: tl.constexpr,
                      PREFETCH_B: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
                      SWAP: tl.constexpr, PDL: tl.constexpr,
                      HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, NEOX: tl.constexpr, HEAD_DIM: tl.constexpr,
                      ROPE_DIM: tl.constexpr, WRITE_KV: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr,
                      N_ROWS: tl.constexpr, H_PAD: tl.constexpr):
    """The layer's q/k/v products (`tile_product`): columns [0, N_A) from the first weight and, with TWO, [N_A, N)
    from a second of another quant type (Q4_K_M's Q6_K attn_v), whose tiles follow the first's in the grid. Every
    program stores its partial tile and counts itself in its head's counter (HEAD_DIM // BLOCK_N tiles x SPLIT_K
    splits per head and row tile); the last finishes the head (`_finish_head`) and resets the counter for the next
    launch or graph replay. With NORM, x is the attention norm still to take (`norm.PendingNorm`): every program
    normalises its activations itself and the first also stores the residual stream x + delta into `s_ptr`."""
    pid = tl.program_id(0)
    tiles_a = tl.cdiv(M, BLOCK_M) * tl.cdiv(N_A, BLOCK_N)
    if (pid >= tiles_a) & TWO:
        acc, offs_m, offs_n, pid_m, pid_n = tile_product(
            pid - tiles_a, x_ptr, M, N - N_A, stride_xm, qs_b, qh_b, sc_b, mn_b, d_b, dm_b, s_qs_b, s_qh_b, s_sc_b,
            s_d_b, groups_per_split_b, QTYPE_B, SH_B, GPI_B, BLOCK_M, BLOCK_N, GROUP_M, SWAP, PDL, PREFETCH_B,
            delta_ptr, nw_ptr, K, norm_eps, NORM, HAS_DELTA, N_ROWS, H_PAD)
        offs_n += N_A
        pid_n += N_A // BLOCK_N
    else:
        acc, offs_m, offs_n, pid_m, pid_n = tile_product(
            pid, x_ptr, M, N_A, stride_xm, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
            groups_per_split, QTYPE, SH, GPI, BLOCK_M, BLOCK_N, GROUP_M, SWAP, PDL, PREFETCH,
            delta_ptr, nw_ptr, K, norm_eps, NORM, HAS_DELTA, N_ROWS, H_PAD)
    if NORM and HAS_DELTA:  # the first program stores the residual stream (a row or two)
        if (pid == 0) & (tl.program_id(1) == 0):
            store_normed(x_ptr, delta_ptr, nw_ptr, s_ptr, s_ptr, stride_xm, tl.arange(0, N_ROWS), M, 0, K,
                         tl.zeros((N_ROWS,), dtype=tl.float32), True, False, 256)
    part = part_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
    tl.store(part + tl.program_id(1) * stride_ps, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    TILES: tl.constexpr = HEAD_DIM // BLOCK_N
    head = pid_n // TILES
    lock = count_ptr + pid_m * (N // HEAD_DIM) + head
    if arrive_last(lock, TILES * SPLIT_K):
        _finish_head(part_ptr, stride_ps, stride_pm, M, pid_m, head, q_out, k_out, v_out, rows_ptr, qw_ptr, kw_ptr,
                     pos_ptr, cos_ptr, sin_ptr, stride_qot, stride_qoh, stride_kot, stride_koh, stride_vot, stride_voh,
                     stride_cos, n_q_heads, n_kv_heads, eps, BLOCK_M, SPLIT_K, HAS_QNORM, HAS_KNORM, NEOX,
                     HEAD_DIM, ROPE_DIM, WRITE_KV)
        reset_count(lock)


# --------------------------------------------------------------------------------------------
# the separate kernel, after three linears of any kind
# --------------------------------------------------------------------------------------------


@triton.jit
def _norm_rope_heads(x_ptr, o_ptr, w_ptr, token, o_row, pos, cos_ptr, sin_ptr, first_head, stride_xt, stride_xh,
                     stride_ot, stride_oh, stride_cos, n_heads, eps,
                     HAS_NORM: tl.constexpr, NEOX: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr,
                     ROPE_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Norm + rope of heads first_head .. first_head + BLOCK_H of one token ([BLOCK_H, HD_PAD] tile), stored in
    row `o_row` of the output (the token's row, or its pool slot), cast to the output's dtype."""
    h = first_head + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HD_PAD)
    ok = (h < n_heads)[:, None] & (d < HEAD_DIM)[None, :]
    src = x_ptr + token * stride_xt + h[:, None] * stride_xh
    x = tl.load(src + d[None, :], mask=ok, other=0.0).to(tl.float32)
    partner, freq, first, rot = _rope_pairs(d, ROPE_DIM, NEOX)
    xp = tl.load(src + partner[None, :], mask=ok & rot[None, :], other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * stride_cos + freq, mask=rot, other=1.0)
    sin = tl.load(sin_ptr + pos * stride_cos + freq, mask=rot, other=0.0)
    y = _norm_rope(x, xp, w_ptr, d, partner, rot, first, cos[None, :], sin[None, :], eps, HAS_NORM, HEAD_DIM)
    tl.store(o_ptr + o_row * stride_ot + h[:, None] * stride_oh + d[None, :], y.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vo_ptr, slots_ptr, qw_ptr, kw_ptr, pos_ptr, cos_ptr,
                         sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot,
                         stride_qoh, stride_kot, stride_koh, stride_vot, stride_voh, stride_cos, n_q_heads, n_kv_heads,
                         eps,
                         HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, NEOX: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                         WRITE_KV: tl.constexpr, PDL: tl.constexpr):
    """q and k heads of token `program_id(0)`, a block of heads per program; with WRITE_KV the k heads go
    straight into the KV pool at the token's slot (`ko`/`vo` are the layer's k/v caches) and the k programs copy
    the matching v heads there too."""
    pdl_enter(PDL)
    token = tl.program_id(0)
    blk = tl.program_id(1)
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    pos = tl.load(pos_ptr + token)
    if blk < q_blocks:
        _norm_rope_heads(q_ptr, qo_ptr, qw_ptr, token, token, pos, cos_ptr, sin_ptr, blk * BLOCK_H, stride_qt,
                         stride_qh, stride_qot, stride_qoh, stride_cos, n_q_heads, eps,
                         HAS_QNORM, NEOX, HEAD_DIM, HD_PAD, ROPE_DIM, BLOCK_H)
    else:
        first = (blk - q_blocks) * BLOCK_H
        if WRITE_KV:
            row = tl.load(slots_ptr + token).to(tl.int64)
        else:
            row = token.to(tl.int64)
        _norm_rope_heads(k_ptr, ko_ptr, kw_ptr, token, row, pos, cos_ptr, sin_ptr, first, stride_kt, stride_kh,
                         stride_kot, stride_koh, stride_cos, n_kv_heads, eps,
                         HAS_KNORM, NEOX, HEAD_DIM, HD_PAD, ROPE_DIM, BLOCK_H)
        if WRITE_KV:
            h = first + tl.arange(0, BLOCK_H)[:, None]
            d = tl.arange(0, HD_PAD)[None, :]
            ok = (h < n_kv_heads) & (d < HEAD_DIM)
            v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=ok)
            tl.store(vo_ptr + row * stride_vot + h * stride_voh + d, v.to(vo_ptr.dtype.element_ty), mask=ok)


class TritonQKV(QKVRope):
    """`QKVRope` on the GPU: (h, meta) -> float32 q, and k and v stored into layer `layer`'s pool slots when the
    step has a pool (float32 k and v returned otherwise). The heads are finished in the products' epilogue once
    the backend stacks the weights (`stack`); else by one kernel after the three linears (module docstring)."""

    split_k: int | None = None  # tests force the products' K splits

    def __init__(self, layer: int, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int,
                 eps: float) -> None:
        super().__init__(wq, wk, wv, q_norm, k_norm, rope, n_heads, n_kv_heads, head_dim, eps)
        self.layer = layer
        assert rope.rope_dim <= head_dim and rope.rope_dim % 2 == 0
        self.cos, self.sin = rope.cos.float().contiguous(), rope.sin.float().contiguous()
        self.qw = None if q_norm is None else q_norm.contiguous()
        self.kw = None if k_norm is None else k_norm.contiguous()
        self.hd_pad = triton.next_power_of_2(head_dim)
        # a [heads, head_dim] tile of up to ~2K elements per program
        self.block_h = min(triton.next_power_of_2(max(n_heads, n_kv_heads)), max(1, 2048 // self.hd_pad))
        self.fused: Linear | None = None  # q|k(|v) in one linear, once `stack` is called
        self.fused_v = False
        # the epilogue path's products, one launch: the stacked q|k(|v), then a v of another quant type
        self.weights: list[PackedWeight] = []

    def stack(self, fused: TritonLinear, with_v: bool) -> None:
        """Project q and k (and v, `with_v`) with one `fused` linear whose output is theirs side by side; the
        separate ones are dropped (their packed bytes live on in `fused`). Where the heads are whole column tiles
        and v is packed too, the heads are finished in the products' epilogue from now on."""
        self.fused, self.fused_v = fused, with_v
        self.wq = self.wk = None  # type: ignore[assignment]
        if with_v:
            self.wv = None  # type: ignore[assignment]
        hd = self.head_dim
        whole_tiles = hd % PLAN_BLOCK_N == 0 and hd & (hd - 1) == 0
        wv = self.wv
        v_packed = with_v or (isinstance(wv, TritonLinear) and wv.packed is not None and wv.bias is None)
        if whole_tiles and v_packed and fused.packed is not None:
            self.weights = [fused.packed] if with_v else [fused.packed, wv.packed]  # type: ignore[union-attr]

    @property
    def takes_pending_norm(self) -> bool:
        """The epilogue path takes the attention norm itself (`norm.PendingNorm`)."""
        return bool(self.weights)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The raw projections (before QK-norm and RoPE), as views of the fused product where there is one."""
        if self.fused is None:
            return super().project(h)
        T, nq, nk = h.shape[0], self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        y = self.fused(h)  # views of one [T, nq + nk (+ nv)] output: the kernel below reads them strided
        q, k = y[:, :nq].view(T, self.n_heads, self.head_dim), y[:, nq:nq + nk].view(T, self.n_kv_heads, self.head_dim)
        v = y[:, nq + nk:] if self.fused_v else self.wv(h)
        return q, k, v.reshape(T, self.n_kv_heads, self.head_dim)

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor | None, ...]:
        """float32 q, k, v; in a step with a pool and a slot mapping k and v go straight into the layer's pool
        slots instead, in the same launch, and come back as None (the QKVProjection protocol)."""
        if isinstance(h, PendingNorm) and not self.weights:
            h = h.tensor()  # only the epilogue path takes the norm itself
        T = h.shape[0]
        kv = meta.kv
        write = kv is not None and meta.slot_mapping is not None
        q_out = torch.empty(T, self.n_heads, self.head_dim, dtype=torch.float32, device=h.device)
        if write:
            k_out, v_out = kv.k[self.layer], kv.v[self.layer]
            assert k_out.stride(-1) == 1 and v_out.stride(-1) == 1, "the pool's head_dim must be contiguous"
        else:
            k_out, v_out = (torch.empty(T, self.n_kv_heads, self.head_dim, dtype=torch.float32, device=h.device)
                            for _ in range(2))
        if T:
            rows = meta.slot_mapping if write else meta.positions
            if self.weights:
                self._heads(h, q_out, k_out, v_out, rows, meta.positions, write)
            else:
                self._norm_rope(h, q_out, k_out, v_out, rows, meta.positions, write)
        return (q_out, None, None) if write else (q_out, k_out, v_out)

    def _heads(self, h: torch.Tensor | PendingNorm, q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
               rows: torch.Tensor, positions: torch.Tensor, write: bool) -> None:
        """The products, finishing their heads in the epilogue (`_qkv_heads_kernel`), in one launch; a pending
        norm of h is taken by the same launch."""
        x, norm = norm_args(h)
        x = activations(x)
        T = x.shape[0]
        plans = plan_products(T, self.weights, x.device, self.split_k)
        a, b = plans[0], plans[-1]
        n_a = self.weights[0].shape[0]
        n = sum(w.shape[0] for w in self.weights)
        part = torch.empty(a.split_k, T, n, dtype=torch.float32, device=x.device)
        locks = counters(triton.cdiv(T, a.constexprs["BLOCK_M"]) * (n // self.head_dim), x.device, "qkv")
        cx = a.constexprs
        _qkv_heads_kernel[(a.tiles + (b.tiles if b is not a else 0), a.split_k)](
            x, part, locks, T, n, n_a, x.stride(0), part.stride(0), part.stride(1),
            *weight_args(self.weights[0]), a.groups_per_split, *weight_args(self.weights[-1]), b.groups_per_split,
            q_out, k_out, v_out, rows, self._qw(q_out), self._kw(q_out), positions, self.cos, self.sin,
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
            self.cos.stride(0), self.n_heads, self.n_kv_heads, self.eps, norm["delta"], norm["weight"], norm["s"],
            x.shape[1], norm["eps"],
            QTYPE=cx["QTYPE"], SH=cx["SH"], GPI=cx["GPI"], PREFETCH=cx["PREFETCH"], TWO=b is not a,
            QTYPE_B=b.constexprs["QTYPE"], SH_B=b.constexprs["SH"], GPI_B=b.constexprs["GPI"],
            PREFETCH_B=b.constexprs["PREFETCH"], BLOCK_M=cx["BLOCK_M"], BLOCK_N=cx["BLOCK_N"], GROUP_M=cx["GROUP_M"],
            SPLIT_K=cx["SPLIT_K"], SWAP=cx["SWAP"], num_warps=cx["num_warps"], num_stages=cx["num_stages"],
            HAS_QNORM=self.qw is not None, HAS_KNORM=self.kw is not None, NEOX=self.rope.neox,
            HEAD_DIM=self.head_dim, ROPE_DIM=self.rope.rope_dim, WRITE_KV=write, NORM=norm["NORM"],
            HAS_DELTA=norm["HAS_DELTA"], N_ROWS=norm["N_ROWS"], H_PAD=norm["H_PAD"], **pdl(x.device))

    def _norm_rope(self, h: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                   rows: torch.Tensor, positions: torch.Tensor, write: bool) -> None:
        """The three (or two) products, then QK-norm + RoPE and the k/v store in one kernel."""
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in self.project(h))
        if not write:  # v passes through unchanged
            v_out.copy_(v)
        bh = self.block_h
        grid = (h.shape[0], triton.cdiv(self.n_heads, bh) + triton.cdiv(self.n_kv_heads, bh))
        _qk_norm_rope_kernel[grid](
            q, k, v, q_out, k_out, v_out, rows, self._qw(q_out), self._kw(q_out), positions, self.cos, self.sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
            q_out.stride(1), k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1), self.cos.stride(0),
            self.n_heads, self.n_kv_heads, self.eps,
            HAS_QNORM=self.qw is not None, HAS_KNORM=self.kw is not None, NEOX=self.rope.neox,
            HEAD_DIM=self.head_dim, HD_PAD=self.hd_pad, ROPE_DIM=self.rope.rope_dim, BLOCK_H=bh, WRITE_KV=write,
            num_warps=4 if bh * self.hd_pad >= 1024 else 2, **pdl(h.device))

    def _qw(self, dummy: torch.Tensor) -> torch.Tensor:
        return self.qw if self.qw is not None else dummy  # never read without HAS_QNORM

    def _kw(self, dummy: torch.Tensor) -> torch.Tensor:
        return self.kw if self.kw is not None else dummy
