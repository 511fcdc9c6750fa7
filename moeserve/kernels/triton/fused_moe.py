"""The MoE block on the GPU in three kernels over all experts at once (vLLM's fused_moe design).

1. Route: router logits, float32 softmax, top-k, optional renormalisation (`moe.route`).
2. Align (`align_blocks`): the T*k (token, slot) pairs sorted by expert into BLOCK_M-row blocks, each
   expert's rows padded to whole blocks, so every block belongs to one expert.
3. Gate and up in one kernel: each program takes one block and a column tile, gathers the block's
   token rows, dequantizes its expert's gate and up rows once for the whole block and writes
   `silu(x @ gate.T) * (x @ up.T)` (fp16, one row per pair).
4. Down in one kernel: the same blocks over the activations, each row scaled by its routing weight
   into a `[T*k, H]` buffer, then summed over k (deterministic: no atomics).

For a decode step (T=1, top-8) that is 8 blocks: each active expert's weights are read once. Every
step runs on the device with shapes fixed by T alone: no host synchronisation, CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.backend import Linear
from moeserve.kernels.moe import GroupedMoE, route
from moeserve.kernels.qlinear import ReferenceExperts
from moeserve.kernels.triton.packing import PACKED_QTYPES, pack_weight
from moeserve.kernels.triton.qmatmul import activations, group_dot, groups_per_step, half_group, weight_args, x_group

__all__ = ["TritonMoE", "align_blocks", "block_m_for"]


def block_m_for(n_pairs: int, n_experts: int) -> int:
    """BLOCK_M for `n_pairs` (token, expert) pairs: 16 while experts average at most 16 rows (decode and
    small batches: little padding, each expert's weights read once), else 64 (prefill: fewer weight
    re-reads per row)."""
    return 16 if n_pairs <= 16 * n_experts else 64


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
    n_blocks = (n + min(n_experts, n) * (block_m - 1)) // block_m
    sorted_ids = torch.full((n_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, (ends - padded)[by_expert] + rank, order.to(torch.int32))
    starts = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=n_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:]


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, n_pairs, BLOCK_M: tl.constexpr):
    """This block's pair ids [BLOCK_M], which of them are real, and its expert (int64)."""
    pid_m = tl.program_id(0)
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return ids, ids < n_pairs, expert


@triton.jit
def _gate_up_kernel(x_ptr, act_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr, n_pairs, stride_x, I, n_groups,
                    g_qs, g_qh, g_sc, g_mn, g_d, g_dm, u_qs, u_qh, u_sc, u_mn, u_d, u_dm, s_qs, s_qh, s_sc, s_d,
                    TOP_K: tl.constexpr, QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """act[pair, cols] = silu(x[token] @ gate[e, cols].T) * (x[token] @ up[e, cols].T) for one block's pairs."""
    if tl.program_id(0) * BLOCK_M >= tl.load(n_rows_ptr):
        return
    ids, valid, expert = _block_rows(sorted_ptr, block_expert_ptr, n_pairs, BLOCK_M)
    xoff = tl.where(valid, ids // TOP_K, 0).to(tl.int64) * stride_x  # padding rows read token 0, never stored
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = expert * I + tl.minimum(offs_n, I - 1)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_groups, GPI):
        for gi in tl.static_range(GPI):
            x_lo, x_hi = x_group(x_ptr, xoff, kb + gi, SH)
            acc_g = group_dot(acc_g, x_lo, x_hi, g_qs, g_qh, g_sc, g_mn, g_d, g_dm, s_qs, s_qh, s_sc, s_d,
                               rows, kb + gi, QTYPE, SH)
            acc_u = group_dot(acc_u, x_lo, x_hi, u_qs, u_qh, u_sc, u_mn, u_d, u_dm, s_qs, s_qh, s_sc, s_d,
                               rows, kb + gi, QTYPE, SH)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out = act_ptr + ids[:, None].to(tl.int64) * I + offs_n[None, :]
    tl.store(out, act.to(tl.float16), mask=valid[:, None] & (offs_n[None, :] < I))


@triton.jit
def _down_kernel(act_ptr, out_ptr, weight_ptr, sorted_ptr, block_expert_ptr, n_rows_ptr, n_pairs, H, I, n_groups,
                 qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                 QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[pair, cols] = routing_weight[pair] * (act[pair] @ down[e, cols].T) for one block's pairs."""
    if tl.program_id(0) * BLOCK_M >= tl.load(n_rows_ptr):
        return
    ids, valid, expert = _block_rows(sorted_ptr, block_expert_ptr, n_pairs, BLOCK_M)
    pair = tl.where(valid, ids, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = expert * H + tl.minimum(offs_n, H - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_groups, GPI):
        for gi in tl.static_range(GPI):
            x_lo, x_hi = x_group(act_ptr, pair * I, kb + gi, SH)
            acc = group_dot(acc, x_lo, x_hi, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                             rows, kb + gi, QTYPE, SH)
    acc = acc * tl.load(weight_ptr + pair)[:, None]
    out = out_ptr + pair[:, None] * H + offs_n[None, :]
    tl.store(out, acc, mask=valid[:, None] & (offs_n[None, :] < H))


class TritonMoE:
    """The MoE block (the MoEBlock protocol) with fused Triton expert kernels over packed expert stacks.

    `gate`/`up` are `[E, I, H]` stacks of one quant type, `down` `[E, H, I]` of any packed type. Stacks the
    kernels cannot take (float types, or gate and up of different types) run the reference GroupedMoE.
    """

    def __init__(self, router: Linear, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
                 renormalize: bool) -> None:
        self.router, self.top_k, self.renormalize = router, top_k, renormalize
        self.n_experts, self.inter, self.hidden = gate.shape
        if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (self.n_experts, self.hidden, self.inter):
            raise ValueError(f"expert stacks do not fit: gate {gate.shape}, up {up.shape}, down {down.shape}")
        self._reference: GroupedMoE | None = None
        if QT(gate.qtype) != QT(up.qtype) or not {QT(gate.qtype), QT(down.qtype)} <= PACKED_QTYPES:
            self._reference = GroupedMoE(router, ReferenceExperts(gate), ReferenceExperts(up),
                                         ReferenceExperts(down), top_k, renormalize)
            return
        self.gate, self.up, self.down = pack_weight(gate), pack_weight(up), pack_weight(down)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self._reference is not None:
            return self._reference(h)
        T, E, k = h.shape[0], self.n_experts, self.top_k
        if T == 0:
            return torch.zeros(0, self.hidden, dtype=torch.float32, device=h.device)
        weights, experts = route(self.router(h), k, self.renormalize)
        n_pairs = T * k
        block_m = block_m_for(n_pairs, E)
        sorted_ids, block_expert, n_rows = align_blocks(experts, E, block_m)
        n_blocks = block_expert.shape[0]
        h = activations(h)

        gate, up, down = self.gate, self.up, self.down
        sh = half_group(gate.qtype)
        n_groups = self.hidden // (2 * sh)
        block_n = 32 if block_m == 16 else 64  # decode: two weight tiles per program, and programs for every SM
        act = torch.empty(n_pairs, self.inter, dtype=torch.float16, device=h.device)
        _gate_up_kernel[(n_blocks, triton.cdiv(self.inter, block_n))](
            h, act, sorted_ids, block_expert, n_rows, n_pairs, h.stride(0), self.inter, n_groups,
            *weight_args(gate)[:6], *weight_args(up),
            TOP_K=k, QTYPE=int(gate.qtype), SH=sh, GPI=groups_per_step(gate.qtype, n_groups, block_m),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3)

        sh = half_group(down.qtype)
        n_groups = self.inter // (2 * sh)
        block_n = 64
        out = torch.empty(n_pairs, self.hidden, dtype=torch.float32, device=h.device)
        _down_kernel[(n_blocks, triton.cdiv(self.hidden, block_n))](
            act, out, weights.reshape(-1).contiguous(), sorted_ids, block_expert, n_rows, n_pairs, self.hidden,
            self.inter, n_groups, *weight_args(down),
            QTYPE=int(down.qtype), SH=sh, GPI=groups_per_step(down.qtype, n_groups, block_m),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3)
        return out.view(T, k, self.hidden).sum(1)
