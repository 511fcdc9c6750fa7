"""The layers every supported decoder is built from: RMSNorm, attention, dense MLP, MoE.

Each layer reads like the paper and owns its packed weights (`QLinear`/`QExperts`); all the
number crunching lives in `moeserve.kernels`. Layers work on a flattened batch of T tokens that
may belong to several sequences; only attention needs to know where one sequence ends (`SeqSlice`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moeserve.kernels.attention import decode_attention, gqa_attention
from moeserve.kernels.moe import grouped_moe, route
from moeserve.kernels.qlinear import QExperts, QLinear
from moeserve.kernels.rope import Rope
from moeserve.profiler import stage


class KVStore(Protocol):
    """Where one sequence keeps its keys and values (contiguous or paged, see engine/)."""

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class BatchKV(Protocol):
    """The caches of a decode batch (one new token per sequence, rows in sequence order), read and
    written for all sequences at once (see engine/paged_cache.py `PagedDecodeBatch`)."""

    positions: torch.Tensor  # [B] position of each sequence's new token
    lens: torch.Tensor  # [B] keys per sequence after the write (positions + 1)
    table: torch.Tensor  # [B, nb] block ids of each sequence, for `pool`
    block_size: int

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' k/v [B, nkv, hd]."""
        ...

    def pool(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key/value slots [n_blocks * block_size, nkv, hd], addressed through `table`."""
        ...

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's keys/values, padded: [B, L, nkv, hd]."""
        ...


@dataclass
class SeqSlice:
    """Rows `start .. start+length` of the batch are one sequence's tokens at positions `pos ..`."""

    start: int
    length: int
    pos: int = 0
    kv: KVStore | None = None  # None: no cache, attend only within these rows (pos must be 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * weight


class Attention:
    def __init__(self, wq: QLinear, wk: QLinear, wv: QLinear, wo: QLinear, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, n_heads: int, n_kv_heads: int, head_dim: int, eps: float,
                 rope: Rope, window: int | None) -> None:
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.q_norm, self.k_norm = q_norm, k_norm
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, head_dim, eps
        self.rope, self.window = rope, window
        # kernels.fast: one query per sequence, (q [B, nh, hd], k/v [B, L, nkv, hd], lens [B], window)
        # -> [B, nh*hd], or None when it does not apply (then the torch kernels below run)
        self.fast_decode: Callable[..., torch.Tensor | None] | None = None
        self.norm_rope: Callable[..., torch.Tensor] | None = None  # kernels.fast: norm + RoPE in place
        # kernels.fast: (h, positions) -> (q, k, v) [T, heads, hd], projected, q/k-normed and rotated
        self.qkv_rope: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice], layer: int,
                 batch: BatchKV | None = None) -> torch.Tensor:
        T = h.shape[0]
        if self.qkv_rope is not None:  # the same steps in one native call at decode
            q, k, v = self.qkv_rope(h, positions)
        else:
            q = self.wq(h).view(T, self.n_heads, self.head_dim)
            k = self.wk(h).view(T, self.n_kv_heads, self.head_dim)
            v = self.wv(h).view(T, self.n_kv_heads, self.head_dim)
            if self.norm_rope is not None:  # norm + RoPE in one native call per tensor
                q, k = self.norm_rope(q, self.q_norm, positions), self.norm_rope(k, self.k_norm, positions)
            else:
                if self.q_norm is not None:  # Qwen3: per-head RMSNorm, before RoPE
                    q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
                q, k = self.rope(q, positions), self.rope(k, positions)
        if batch is not None:  # decode batch: one write and one attention call for all sequences
            batch.write(layer, k, v)
            o = None
            if self.fast_decode is not None:  # reads the paged pool in place through the block table
                o = self.fast_decode(q, *batch.pool(layer), batch.lens, self.window, table=batch.table,
                                     block_size=batch.block_size)
            if o is None:
                keys, values = batch.read(layer)
                o = decode_attention(q, keys, values, batch.positions, self.window)
            return self.wo(o)
        out = torch.empty(T, self.n_heads * self.head_dim, dtype=q.dtype, device=q.device)
        for s in seqs:
            rows = slice(s.start, s.start + s.length)
            if s.kv is None:
                keys, values = k[rows], v[rows]
            else:
                s.kv.write(layer, s.pos, k[rows], v[rows])
                keys, values = s.kv.read(layer, s.pos + s.length)
            if s.length == 1 and self.fast_decode is not None:
                o = self.fast_decode(q[rows], keys[None], values[None], torch.tensor([s.pos + 1]), self.window)
                if o is not None:
                    out[rows] = o
                    continue
            out[rows] = gqa_attention(q[rows], keys, values, s.pos, self.window)
        return self.wo(out)


class MLP:
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: QLinear, up: QLinear, down: QLinear) -> None:
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))


class MoE:
    """Top-k routed SwiGLU experts; each chosen expert runs once over the tokens routed to it."""

    def __init__(self, router: QLinear, gate: QExperts, up: QExperts, down: QExperts, top_k: int,
                 renormalize: bool = True) -> None:
        self.router, self.gate, self.up, self.down = router, gate, up, down
        self.n_experts, self.top_k, self.renormalize = gate.n_experts, top_k, renormalize
        self.fused = None  # fused(h, weights, experts) -> out for T <= fused.max_tokens (kernels.fast)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        with stage("expert_gate"):
            g = self.gate(e, x)
        with stage("expert_up"):
            u = self.up(e, x)
        with stage("expert_down"):
            return self.down(e, F.silu(g) * u)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        fused = self.fused if self.fused is not None and h.shape[0] <= self.fused.max_tokens else None
        if fused is not None and fused.top_k:  # routing, experts and weighted sum in one native call
            with stage("moe_fused"):
                return fused.routed(h)[0]
        with stage("router"):
            weights, experts = route(self.router(h), self.top_k, self.renormalize)
        if fused is not None:  # gate, up, down and the weighted sum in one native call
            with stage("experts_fused"):
                return fused(h, weights, experts)
        return grouped_moe(h, weights, experts, self.n_experts, self.expert)


class Block:
    """Pre-norm transformer block: x += attn(norm(x)); x += ffn(norm(x))."""

    def __init__(self, attn_norm: torch.Tensor, attn: Attention, ffn_norm: torch.Tensor, ffn: MLP | MoE,
                 eps: float) -> None:
        self.attn_norm, self.attn, self.ffn_norm, self.ffn, self.eps = attn_norm, attn, ffn_norm, ffn, eps
        self.fast_norm: Callable[..., torch.Tensor | None] | None = None  # kernels.fast: native rms_norm

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = self.fast_norm(x, weight, self.eps) if self.fast_norm is not None else None
        return out if out is not None else rms_norm(x, weight, self.eps)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice], layer: int,
                 batch: BatchKV | None = None) -> torch.Tensor:
        with stage("attention"):
            x = x + self.attn(self.norm(x, self.attn_norm), positions, seqs, layer, batch)
        return x + self.ffn(self.norm(x, self.ffn_norm))
