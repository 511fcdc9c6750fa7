"""The `cpu` backend: the native AVX2 kernels (`torch.ops.moeserve.*`, see `native.py`) on GGUF blocks in place.

What each operation gets, decided once per weight at load:

* linear — `NativeLinear` (integer dots for few rows, the tiled/integer GEMM for many) for every
  quantized type with K % 256 == 0; F32/F16/BF16 weights a dense float32 `F.linear`; anything else
  (quantized rows whose K is not a multiple of 256) the reference linear, which dequantizes per call.
* q/k/v — one native call for projections + QK-norm + RoPE at decode when all three are native
  (`QKVRope`); otherwise the backend's linears and the native per-head norm + RoPE.
* attention — the reference paged attention, with the native one-query kernel for decode rows: a
  pure decode step reads the float32 pool in place through the block table, in one call for all
  sequences.
* MoE — the fused native decode MoE (routing, gate/up, SiLU, down, weighted sum in one call) up to
  `max_tokens` tokens; beyond, the reference grouped dispatch over native expert matmuls.
* RMSNorm, embedding rows, greedy argmax — one native call each.

Building the native library happens in `__init__`: a compiler error raises `NativeBuildError` with the
compiler's message.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.attention import PagedAttention
from moeserve.kernels.backend import Backend, Linear
from moeserve.kernels.cpu import native
from moeserve.kernels.cpu.moe import FusedMoE, make_moe
from moeserve.kernels.dense import DenseExperts, DenseLinear, dense_weight
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.kernels.moe import GroupedMoE, route
from moeserve.kernels.qlinear import ReferenceExperts, ReferenceLinear, WithBias
from moeserve.kernels.reference import EmbeddingRows, QKVRope, RMSNorm
from moeserve.kernels.rope import Rope
from moeserve.profiler import stage

FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})


class NativeQKV(QKVRope):
    """Separate projections (some not native, or with a bias), then the native per-head norm + RoPE."""

    def __init__(self, *args: object, norm_rope: native.NormRope) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.native_norm_rope = norm_rope

    def norm_rope(self, x: torch.Tensor, weight: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        return self.native_norm_rope(x.contiguous(), weight, positions)


class NativeAttention(PagedAttention):
    """Reference paged attention with the native one-query kernel (`native.attn_decode`) for decode rows."""

    def decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, max_len: int,
               meta: AttentionMetadata) -> torch.Tensor:
        kv = meta.kv
        assert kv is not None
        out = native.attn_decode(q, kv.k[self.layer], kv.v[self.layer], lens, self.window, table=tables,
                                 block_size=kv.block_size)
        return out if out is not None else super().decode(q, tables, lens, max_len, meta)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: int) -> torch.Tensor:
        if q.shape[0] == 1:
            lens = torch.tensor([q_pos + 1])
            out = native.attn_decode(q, keys[None], values[None], lens, self.window)
            if out is not None:
                return out
        return super().attend(q, keys, values, q_pos)


class NativeMoE(GroupedMoE):
    """The fused native MoE for decode-sized batches; the grouped reference dispatch beyond."""

    def __init__(self, router: Linear, gate: object, up: object, down: object, top_k: int, renormalize: bool,
                 fused: FusedMoE | None) -> None:
        super().__init__(router, gate, up, down, top_k, renormalize)
        self.fused = fused

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if fused is None or h.shape[0] > fused.max_tokens:
            return super().__call__(h)
        if fused.top_k:  # routing, experts and weighted sum in one native call
            with stage("moe_fused"):
                return fused.routed(h)[0]
        with stage("router"):
            weights, experts = route(self.router(h), self.top_k, self.renormalize)
        with stage("experts_fused"):  # gate, up, down and the weighted sum in one native call
            return fused(h, weights, experts)


class NativeNorm(RMSNorm):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x, self.weight, self.eps)
        return out if out is not None else super().__call__(x)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        if self.device.type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU, not on {self.device}")
        native.load()  # NativeBuildError with the compiler's message if the kernels do not build

    @staticmethod
    def _matmul(w: PackedTensor, native_cls: type, dense_cls: type, reference_cls: type) -> Any:
        """The kernel for a weight: native for quantized types with K % 256 == 0, dense float32 for float types,
        else the reference (quantized weights whose K is not a multiple of 256, e.g. hidden 576)."""
        qt = QT(w.qtype)
        if native.supports(w):
            return native_cls(w)
        if qt in FLOAT_TYPES:
            return dense_cls(dense_weight(w.data, qt, w.shape[-1]))
        return reference_cls(w)

    def linear(self, w: PackedTensor, bias: torch.Tensor | None = None) -> Linear:
        lin = self._matmul(w, native.NativeLinear, DenseLinear, ReferenceLinear)
        return lin if bias is None else WithBias(lin, bias)

    def experts(self, w: PackedTensor) -> Any:
        """`(e, x) -> x @ W[e].T` for an expert stack."""
        return self._matmul(w, native.NativeExperts, DenseExperts, ReferenceExperts)

    def rope(self, rope_dim: int, theta: float, neox: bool, max_positions: int,
             freq_factors: torch.Tensor | None = None) -> Rope:
        return Rope(rope_dim, theta, neox, max_positions, self.device, freq_factors)

    def qkv(self, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
            rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int, eps: float) -> QKVRope | native.QKVRope:
        norm_rope = native.NormRope(rope, eps)
        if all(isinstance(p, native.NativeLinear) for p in (wq, wk, wv)):
            return native.QKVRope(native.FusedLinears([wq, wk, wv]), norm_rope, q_norm, k_norm, n_heads, n_kv_heads,
                                  head_dim)
        return NativeQKV(wq, wk, wv, q_norm, k_norm, rope, n_heads, n_kv_heads, head_dim, eps, norm_rope=norm_rope)

    def attention(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  window: int | None) -> NativeAttention:
        return NativeAttention(layer, n_heads, n_kv_heads, head_dim, window)

    def moe(self, router: PackedTensor, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
            renormalize: bool) -> NativeMoE:
        stacks = [ReferenceExperts(w) for w in (gate, up, down)]  # shapes and bytes, for the fused kernel
        fused = make_moe(*stacks)
        if fused is not None and os.environ.get("MOESERVE_FUSED_ROUTER", "1") != "0":
            fused.attach_router(ReferenceLinear(router), top_k, renormalize)
        return NativeMoE(self.linear(router), *(self.experts(w) for w in (gate, up, down)), top_k=top_k,
                         renormalize=renormalize, fused=fused)

    def norm(self, weight: torch.Tensor, eps: float) -> NativeNorm:
        return NativeNorm(weight, eps)

    def embedding(self, w: PackedTensor) -> native.EmbeddingRows | EmbeddingRows:
        return native.EmbeddingRows(w) if native.supports(w) else EmbeddingRows(w)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        out = native.argmax(x)
        return out if out is not None else torch.argmax(x, dim=-1)
