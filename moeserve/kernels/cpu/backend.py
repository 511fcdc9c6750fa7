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

Batch invariance (`CpuBackend(batch_invariant=True)`): the same objects, chosen so that a row's arithmetic never
depends on the other rows of the call — the few-row integer kernels for every quantized linear and for q/k/v
(`native.ROW_INVARIANT`: never the GEMMs, whose 15-bit activations and tiles round differently), the fused MoE
for any number of tokens (each token quantized and summed on its own), the one-query attention kernel for every
row, decode or prefill (`RowAttention`: a row attends to its sequence's keys 0..pos in the pool, so neither the
chunking of a prompt nor the other sequences of the step change its reduction), and one row per call wherever a
torch op would see the whole batch (`PerRow`: float and reference linears, the dense SwiGLU, routing without the
native router). RMSNorm, RoPE, embedding rows and argmax are per-row native loops already. The cost is the
GEMMs' speed on prefill and multi-sequence steps (docs/reliability.md, "Batch invariance").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import dequantize
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.attention import PagedAttention, gqa_attention
from moeserve.kernels.backend import Backend, Linear
from moeserve.kernels.cpu import native
from moeserve.kernels.cpu.moe import FusedMoE, make_moe, supports_moe
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

    def mix(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        # The fused path's threshold is in (token, expert) pairs: an expert-parallel rank sends one row per pair.
        fused = self.fused
        if fused is None or experts.numel() > fused.max_tokens * self.top_k:
            return super().mix(h, weights, experts)
        with stage("experts_fused"):
            return fused(h, weights, experts)


class NativeNorm(RMSNorm):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x, self.weight, self.eps)
        return out if out is not None else super().__call__(x)


# --- batch-invariant kernels (CpuBackend(batch_invariant=True)) ------------------------------------------------

def per_row(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn` applied to each row of x [T, ...] alone, the results stacked: a row's result is then what `fn` gives
    for a [1, ...] input holding that row, whatever T (each row is copied to a fresh, aligned tensor, so even a
    kernel whose path depends on the address sees the same input)."""
    if x.shape[0] == 0:
        return fn(x)
    return torch.cat([fn(x[i:i + 1].clone(memory_format=torch.contiguous_format)) for i in range(x.shape[0])])


class PerRow:
    """A linear (`x [..., in] -> [..., out]`) called one row at a time (`per_row`): for the kernels whose result
    for a row depends on the row count (torch's float32 matmuls: MKL changes its blocking with M)."""

    def __init__(self, linear: Any) -> None:
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = getattr(linear, "weight", None)

    @property
    def nbytes(self) -> int:
        return getattr(self.linear, "nbytes", 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = per_row(self.linear, x.reshape(-1, self.in_features))
        return y.view(*lead, self.out_features)


class PerRowReference(PerRow):
    """A reference linear (quantized, K not a multiple of 256) one row at a time, its matrix dequantized once
    per call rather than once per row."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        weight = dequantize(w.data, w.qtype, w.shape[-1])
        lead = x.shape[:-1]
        y = per_row(lambda r: r.float() @ weight.T, x.reshape(-1, self.in_features))
        return y.view(*lead, self.out_features)


class RowMLP:
    """Dense SwiGLU with the elementwise SiLU one row at a time (torch's vectorised and scalar `exp` may differ in
    the last bit, and which elements take which path depends on the tensor's size and thread split); the linears
    are row-invariant already."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        g, u = self.gate(h), self.up(h)
        return self.down(torch.cat([F.silu(g[i:i + 1]) * u[i:i + 1] for i in range(g.shape[0])]) if g.shape[0] > 1
                         else F.silu(g) * u)


class RowAttention(NativeAttention):
    """Attention with every row — a decode token or a row of a prefill chunk — answered by the one-query kernel
    (`native.attn_decode`) against its own sequence's keys 0..position, read in place from the paged pool after
    the step's k/v are written. A row's scores, softmax and weighted sum are then those of a decode step at its
    position: the same whether its prompt came in one chunk or many, alone or beside other sequences. Without a
    pool (`LLM.logits`) each sequence's own rows serve as its keys, through the same kernel."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        kv = meta.kv
        if kv is None or meta.slot_mapping is None or meta.block_tables is None:
            return self._no_cache(q, k, v, meta)
        kc, vc = kv.k[self.layer], kv.v[self.layer]
        kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        tables = meta.block_tables
        if not meta.decode_only:  # every row gets its sequence's block table
            counts = torch.tensor([meta.query_start[b + 1] - meta.query_start[b] for b in range(meta.num_seqs)],
                                  device=tables.device)
            tables = tables.repeat_interleave(counts, dim=0)
        lens = meta.positions + 1
        out = native.attn_decode(q, kc, vc, lens, self.window, table=tables, block_size=kv.block_size)
        if out is not None:
            return out
        # a pool the kernel does not read (float16 / bfloat16): the reference decode, one row at a time
        return torch.cat([PagedAttention.decode(self, q[i:i + 1], tables[i:i + 1], lens[i:i + 1], int(lens[i]), meta)
                          for i in range(q.shape[0])])

    def _no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        outs = []
        for b in range(meta.num_seqs):
            s, e = meta.query_start[b], meta.query_start[b + 1]
            if e == s:
                continue
            assert meta.context_lens[b] == 0, "without a KV pool a sequence must start at position 0"
            n = e - s  # the sequence's rows are a pool of one block of n slots; row i reads slots 0..i
            table = torch.zeros(n, 1, dtype=torch.long, device=q.device)
            lens = torch.arange(1, n + 1, device=q.device)
            out = native.attn_decode(q[s:e], k[s:e].contiguous(), v[s:e].contiguous(), lens, self.window,
                                     table=table, block_size=n)
            if out is None:
                out = torch.cat([gqa_attention(q[s + i:s + i + 1], k[s:s + i + 1], v[s:s + i + 1], i, self.window)
                                 for i in range(n)])
            outs.append(out)
        return torch.cat(outs) if outs else q.new_empty(0, self.n_heads * self.head_dim)


class RowMoE(NativeMoE):
    """The MoE with each token computed on its own: the fused native kernel for any number of tokens (it
    quantizes each token's activations alone and sums its experts in its top-k order), routing in the same call
    or, without the native router, one token at a time; without the fused kernel (types it does not read), the
    grouped reference dispatch one token at a time."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if fused is None:
            return per_row(lambda r: GroupedMoE.__call__(self, r), h)
        if fused.top_k:
            with stage("moe_fused"):
                return fused.routed(h)[0]
        with stage("router"):
            logits = self.router(h)  # a row-invariant linear
            routed = [route(logits[i:i + 1], self.top_k, self.renormalize) for i in range(logits.shape[0])]
            weights = torch.cat([r[0] for r in routed]) if routed else logits.new_empty(0, self.top_k)
            experts = torch.cat([r[1] for r in routed]) if routed else torch.empty(0, self.top_k, dtype=torch.long)
        with stage("experts_fused"):
            return fused(h, weights, experts)


class RowNorm(NativeNorm):
    """RMSNorm through the native per-row loop always (its input made a plain float32 tensor first)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x.float().contiguous(), self.weight.float().contiguous(), self.eps)
        return out if out is not None else per_row(super().__call__, x)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, device: torch.device | str = "cpu", batch_invariant: bool = False) -> None:
        """`batch_invariant`: hand out the row-invariant kernels (see the module docstring)."""
        super().__init__(device)
        if self.device.type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU, not on {self.device}")
        native.load()  # NativeBuildError with the compiler's message if the kernels do not build
        self.batch_invariant = bool(batch_invariant)
        self._gemm_min_rows = native.ROW_INVARIANT if self.batch_invariant else None

    def _matmul(self, w: PackedTensor, native_cls: type, dense_cls: type, reference_cls: type) -> Any:
        """The kernel for a weight: native for quantized types with K % 256 == 0, dense float32 for float types,
        else the reference (quantized weights whose K is not a multiple of 256, e.g. hidden 576)."""
        qt = QT(w.qtype)
        if native.supports(w):
            return native_cls(w, self._gemm_min_rows)
        if qt in FLOAT_TYPES:
            return dense_cls(dense_weight(w.data, qt, w.shape[-1]))
        return reference_cls(w)

    def linear(self, w: PackedTensor, bias: torch.Tensor | None = None) -> Linear:
        lin = self._matmul(w, native.NativeLinear, DenseLinear, ReferenceLinear)
        if self.batch_invariant and isinstance(lin, DenseLinear):
            lin = PerRow(lin)
        elif self.batch_invariant and isinstance(lin, ReferenceLinear):
            lin = PerRowReference(lin)
        return lin if bias is None else WithBias(lin, bias)

    def experts(self, w: PackedTensor) -> Any:
        """`(e, x) -> x @ W[e].T` for an expert stack (batch-invariant mode: only ever called one token at a time,
        `RowMoE`, when the fused kernel does not apply)."""
        return self._matmul(w, native.NativeExperts, DenseExperts, ReferenceExperts)

    def mlp(self, gate: Linear, up: Linear, down: Linear) -> Any:
        return RowMLP(gate, up, down) if self.batch_invariant else super().mlp(gate, up, down)

    def qkv(self, layer: int, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None,
            k_norm: torch.Tensor | None, rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int,
            eps: float) -> QKVRope | native.QKVRope:
        norm_rope = native.NormRope(rope, eps)
        if all(isinstance(p, native.NativeLinear) for p in (wq, wk, wv)):
            return native.QKVRope(native.FusedLinears([wq, wk, wv]), norm_rope, q_norm, k_norm, n_heads, n_kv_heads,
                                  head_dim)
        return NativeQKV(wq, wk, wv, q_norm, k_norm, rope, n_heads, n_kv_heads, head_dim, eps, norm_rope=norm_rope)

    def attention(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  window: int | None) -> NativeAttention:
        cls = RowAttention if self.batch_invariant else NativeAttention
        return cls(layer, n_heads, n_kv_heads, head_dim, window)

    def moe(self, router: PackedTensor, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
            renormalize: bool) -> NativeMoE:
        stacks = [ReferenceExperts(w) for w in (gate, up, down)]  # shapes and bytes, for the fused kernel
        if self.batch_invariant:  # the fused kernel for any number of tokens (its token threshold is for speed)
            enabled = os.environ.get("MOESERVE_FUSED_MOE", "1") != "0" and supports_moe(*stacks)
            fused = FusedMoE(*stacks, max_tokens=native.ROW_INVARIANT) if enabled else None
        else:
            fused = make_moe(*stacks)
        if fused is not None and os.environ.get("MOESERVE_FUSED_ROUTER", "1") != "0":
            fused.attach_router(ReferenceLinear(router), top_k, renormalize)
        cls = RowMoE if self.batch_invariant else NativeMoE
        return cls(self.linear(router), *(self.experts(w) for w in (gate, up, down)), top_k=top_k,
                   renormalize=renormalize, fused=fused)

    def norm(self, weight: torch.Tensor, eps: float) -> NativeNorm:
        return (RowNorm if self.batch_invariant else NativeNorm)(weight, eps)

    def embedding(self, w: PackedTensor) -> native.EmbeddingRows | EmbeddingRows:
        return native.EmbeddingRows(w) if native.supports(w) else EmbeddingRows(w)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        out = native.argmax(x)
        return out if out is not None else torch.argmax(x, dim=-1)
