"""The `reference` backend: plain torch on any device, the oracle every fast kernel is tested against.

Linears dequantize the one matrix a call needs (`qlinear.py`), the MoE runs each chosen expert once
over its tokens (`moe.py`), attention is SDPA over keys gathered from the paged pool
(`attention.py`), and RMSNorm, QK-norm and RoPE are the formulas of the paper.
"""

from __future__ import annotations

import torch

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.attention import PagedAttention
from moeserve.kernels.backend import Backend, Linear
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.kernels.moe import GroupedMoE
from moeserve.kernels.qlinear import ReferenceExperts, ReferenceLinear
from moeserve.kernels.rope import Rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * weight


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps = weight, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`s = x + delta; (s, norm(s))` (the Norm protocol)."""
        s = x if delta is None else x + delta
        return s, self(s)


class QKVRope:
    """q, k, v = wq(h), wk(h), wv(h) per head; Qwen3's per-head RMSNorm of q and k; RoPE on q and k."""

    def __init__(self, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                 rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int, eps: float) -> None:
        self.wq, self.wk, self.wv, self.q_norm, self.k_norm, self.rope = wq, wk, wv, q_norm, k_norm, rope
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, head_dim, eps

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = h.shape[0]
        return (self.wq(h).view(T, self.n_heads, self.head_dim), self.wk(h).view(T, self.n_kv_heads, self.head_dim),
                self.wv(h).view(T, self.n_kv_heads, self.head_dim))

    def norm_rope(self, x: torch.Tensor, weight: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        if weight is not None:
            x = rms_norm(x, weight, self.eps)
        return self.rope(x, positions)

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        q, k, v = self.project(h)
        return self.norm_rope(q, self.q_norm, meta.positions), self.norm_rope(k, self.k_norm, meta.positions), v


class EmbeddingRows:
    def __init__(self, w: PackedTensor) -> None:
        self.weight = w

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)


class ReferenceBackend(Backend):
    name = "reference"

    def linear(self, w: PackedTensor, bias: torch.Tensor | None = None) -> Linear:
        return ReferenceLinear(self.place(w), bias)

    def qkv(self, layer: int, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None,
            k_norm: torch.Tensor | None, rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int,
            eps: float) -> QKVRope:
        return QKVRope(wq, wk, wv, q_norm, k_norm, rope, n_heads, n_kv_heads, head_dim, eps)

    def attention(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  window: int | None) -> PagedAttention:
        return PagedAttention(layer, n_heads, n_kv_heads, head_dim, window)

    def moe(self, router: PackedTensor, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
            renormalize: bool) -> GroupedMoE:
        experts = [ReferenceExperts(self.place(w)) for w in (gate, up, down)]
        return GroupedMoE(self.linear(router), *experts, top_k=top_k, renormalize=renormalize)

    def norm(self, weight: torch.Tensor, eps: float) -> RMSNorm:
        return RMSNorm(weight, eps)

    def embedding(self, w: PackedTensor) -> EmbeddingRows:
        return EmbeddingRows(self.place(w))
