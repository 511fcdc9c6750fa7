"""The native GGUF kernels (`csrc/`, AVX2 + FMA + F16C CPUs) as kernel objects over `torch.ops.moeserve.*`.

Why native kernels: on AVX2-only machines torch's int4 kernel is instruction-bound at decode (~0.35
cycles per weight) and rounds activations and outputs to bf16. The kernels run integer dot products
straight on the file's GGUF blocks with 16-bit activations: no repack (zero load time, zero extra
memory), float32 output, ~1e-5 relative error. For larger batches (`mk_gemm`) each thread decodes
tiles of weight rows once in its cache and multiplies them with all the rows: for the K-quants as
int16 code x scale against 15-bit activations (`pmaddwd`, ~5e-5), for the other types as exact
float32 with an FMA micro-kernel.

The library is built and loaded by `build.load()` on first use (see build.py). `available()` is
False only on a CPU without AVX2/FMA/F16C; on a capable CPU a failed build raises
`NativeBuildError` instead of silently falling back.

Every object here holds only immutable references (the weight bytes, type ids, sizes) and every
call allocates its own outputs: two threads may call the same object at once. RoPE tables are
fixed: `rope.cos` / `rope.sin` float32 `[max_pos, rope_dim / 2]`; a position outside them raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.cpu import build
from moeserve.kernels.metadata import AttentionMetadata

NATIVE_TYPES = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
                          QT.IQ4_NL, QT.IQ4_XS})

GEMM_MIN_ROWS = 12
"""From this many activation rows on, `mk_gemm` replaces the few-row integer kernel, whose cost grows with
every row (it decodes each block once per group of up to 4 rows). For Q4_0..Q8_0 and IQ4_NL `mk_gemm` dequantizes a
tile of weight rows to exact float32 in L2 and runs a float32 FMA micro-kernel; measured on the 2-core
AVX2 machine, 2 threads, integer vs tiled: Q4_K 768x2048 m=8 0.28 vs 0.29 ms, m=12 0.39 vs 0.38, m=16
0.51 vs 0.40 (the K-quants have their own threshold below)."""

GEMM_MIN_ROWS_KQUANT = 4
"""The same for the K-quants (Q2_K..Q6_K) and IQ4_XS, whose `mk_gemm` is the integer GEMM (a tile decoded once to int16
q * scale, pmaddwd against 15-bit activations). Integer dots vs integer GEMM, 2 threads: Q4_K 768x2048
m=2 0.079 vs 0.120 ms, m=4 0.130 vs 0.123, m=8 0.27 vs 0.18, m=16 0.55 vs 0.31; Q6_K lm_head
151936x2048 m=4 29 vs 28 ms, m=8 60 vs 37, m=16 114 vs 61 (the float32 GEMM: 72 at m=16)."""

KQUANTS = frozenset({QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS})
"""The types of 256-weight super-blocks, whose `mk_gemm` is the integer GEMM: the K-quants and IQ4_XS."""

DOT_CHUNK_BYTES = 1 << 20
"""The few-row integer kernel quantizes all its m activation rows (2 bytes a value) and dots every weight row with
each of them: past ~1 MiB of quantized activations they no longer stay in L2 while a thread walks its weight rows,
so a call of more rows is split into calls of `max_rows` rows (each row's result is the same either way). Measured
on the 2-core Xeon, m = 512 with row-invariant dots (`ROW_INVARIANT`), Q4_K 4096x2048: one call 201 ms, chunks of
64 / 128 / 256 rows 176 / 155 / 144 ms; Q4_K 2048x4096: one call 329 ms, chunks of 64 / 128 / 256 rows 170 / 152 /
206 ms (the integer GEMM: 126 and 124 ms)."""

ROW_INVARIANT = 1 << 62
"""`gemm_min_rows` of the batch-invariant matmuls: never reached, so every call takes the few-row integer kernel,
whose result for a row is the same whatever the other rows (each activation row is quantized on its own and
dotted with every weight row in one fixed order; up to 4 rows share a pass over a weight row, each with its own
accumulators)."""


def available() -> bool:
    """True if this CPU runs the native kernels (AVX2, FMA, F16C); then the library is built and loaded
    here, and a failed build raises `NativeBuildError`."""
    if not build.cpu_ok():
        return False
    build.load()
    return True


def load() -> Path:
    """Build (if needed) and load the kernel library (`build.load`); NativeBuildError with the compiler's command
    and output when it does not build."""
    return build.load()


def ops() -> Any:
    """`torch.ops.moeserve`, the library loaded (NativeBuildError when it cannot be)."""
    if build._loaded is None:
        build.load()
    return torch.ops.moeserve


def supports(w: PackedTensor) -> bool:
    """True if `w` can use the native kernels (type, layout, CPU, K a multiple of 256)."""
    return (
        QT(w.qtype) in NATIVE_TYPES
        and w.data.device.type == "cpu"
        and w.shape[-1] % 256 == 0
        and w.data.is_contiguous()
        and available()
    )


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()


def _plain(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_contiguous() and t.device.type == "cpu"


class NativeMatmul:
    """Shared state of the matmul objects: small m -> integer kernel on the GGUF bytes; larger m -> `mk_gemm`
    (`torch.ops.moeserve.qmatmul` picks by `gemm_min_rows`: the type's threshold, or the one given, e.g.
    `ROW_INVARIANT` for the batch-invariant mode)."""

    def __init__(self, w: PackedTensor, gemm_min_rows: int | None = None) -> None:
        self._op = ops().qmatmul.default
        self.weight = w
        self.qtype = int(w.qtype)
        self.out_features, self.in_features = w.shape[-2], w.shape[-1]
        self.row_bytes = w.data.shape[-1]
        self._data = w.data
        self.gemm_min_rows = gemm_min_rows or (GEMM_MIN_ROWS_KQUANT if QT(w.qtype) in KQUANTS else GEMM_MIN_ROWS)
        self.max_rows = max(8, DOT_CHUNK_BYTES // (2 * self.in_features))  # per few-row kernel call

    @property
    def nbytes(self) -> int:
        return 0  # runs on the mapped file bytes: nothing extra is allocated


class NativeLinear(NativeMatmul):
    """`linear(x) -> x @ W.T` (float32) on a 2-D GGUF weight; x of any float dtype and shape [..., K]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.dim() != 2:
            x = x.reshape(-1, self.in_features)
        x, m, step = _f32(x), x.shape[0], self.max_rows
        if step < m < self.gemm_min_rows:  # the few-row kernel on slices of rows that stay in L2
            y = torch.cat([self._op(x[i:i + step], self._data, self.qtype, self.in_features, self.gemm_min_rows)
                           for i in range(0, m, step)])
        else:
            y = self._op(x, self._data, self.qtype, self.in_features, self.gemm_min_rows)
        return y.view(*lead, self.out_features)


class NativeExperts(NativeMatmul):
    """`experts(e, x) -> x @ W[e].T` (float32) on a 3-D expert stack; x [m, K]."""

    def __init__(self, w: PackedTensor, gemm_min_rows: int | None = None) -> None:
        super().__init__(w, gemm_min_rows)
        self.n_experts = w.shape[0]

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            x = x.reshape(-1, self.in_features)
        return self._op(_f32(x), self._data, self.qtype, self.in_features, self.gemm_min_rows, int(e))


class FusedLinears:
    """`fused(x) -> (x @ W_1.T, x @ W_2.T, ...)` for native linears sharing their input (an attention
    layer's q, k, v projections). Below `gemm_min_rows` (the smallest of the linears' GEMM thresholds) it
    is one `qmatmul_multi` call: the input is quantized once and one parallel region covers every row,
    instead of three calls each paying ~15-20 us of call, quantization and fork/join at decode. Larger
    inputs take each linear's own path, so the outputs are always those of the separate calls."""

    def __init__(self, linears: list[NativeLinear]) -> None:
        if not linears or len(linears) > 8:
            raise ValueError(f"FusedLinears takes 1 to 8 linears, got {len(linears)}")
        if len({lin.in_features for lin in linears}) != 1:
            raise ValueError("fused linears must share their input size")
        self._op = ops().qmatmul_multi.default
        self.linears = list(linears)
        self.in_features = linears[0].in_features
        self.gemm_min_rows = min(lin.gemm_min_rows for lin in linears)
        self.max_rows = min(lin.max_rows for lin in linears)
        self._datas = [lin._data for lin in linears]
        self._qtypes = [lin.qtype for lin in linears]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dim() != 2 or x.shape[0] >= self.gemm_min_rows:
            return tuple(lin(x) for lin in self.linears)
        x, step = _f32(x), self.max_rows
        if x.shape[0] > step:  # slices of rows that stay in L2 (see DOT_CHUNK_BYTES)
            parts = [self._op(x[i:i + step], self._datas, self._qtypes, self.in_features)
                     for i in range(0, x.shape[0], step)]
            return tuple(torch.cat(ys) for ys in zip(*parts, strict=True))
        return tuple(self._op(x, self._datas, self._qtypes, self.in_features))


class NormRope:
    """`(x [T, nh, hd], norm_weight | None, positions [T]) -> x`, in place: per-head RMSNorm then RoPE
    in one native call (`norm_rope_`); the same math as `rms_norm` + `Rope.__call__`. `rope` has fixed
    tables: `rope_dim`, `neox`, `cos`, `sin` (float32 [max_pos, rope_dim / 2]); a position outside them
    raises."""

    def __init__(self, rope: Any, eps: float) -> None:
        self._op = ops().norm_rope_.default
        self.rope, self.eps = rope, eps

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rope
        if not _plain(x) or (weight is not None and not _plain(weight)) or x.dim() != 3:
            if weight is not None:  # the reference formula (kernels.reference.rms_norm)
                xf = x.float()
                x = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight
            return rope(x, positions)
        if positions.dtype is not torch.int64 or not positions.is_contiguous():
            positions = positions.long().contiguous()
        return self._op(x, weight, positions, rope.cos, rope.sin, self.eps, rope.rope_dim, bool(rope.neox))


class QKVRope:
    """`(h [T, H], meta) -> (q [T, nh, hd], k [T, nkv, hd], v [T, nkv, hd])`: an attention layer's
    projections, per-head q/k RMSNorm and RoPE. At decode (< `fused.gemm_min_rows` rows) one native call
    (`qkv_rope`, per `fused.max_rows` rows) does all of it; larger inputs take `FusedLinears` (tiled GEMMs) and
    `NormRope`."""

    def __init__(self, fused: FusedLinears, norm_rope: NormRope, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        if len(fused.linears) != 3:
            raise ValueError(f"QKVRope needs the q, k and v linears, got {len(fused.linears)}")
        self._op = ops().qkv_rope.default
        self.fused, self.norm_rope, self.q_norm, self.k_norm = fused, norm_rope, q_norm, k_norm
        self.nh, self.nkv, self.hd = n_heads, n_kv_heads, head_dim

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        T, positions = h.shape[0], meta.positions
        native_ok = (h.dim() == 2 and 0 < T < self.fused.gemm_min_rows and h.shape[1] == self.fused.in_features
                     and _plain(h) and positions.dtype is torch.int64
                     and positions.is_contiguous() and all(w is None or _plain(w) for w in (self.q_norm, self.k_norm)))
        if not native_ok:
            q, k, v = self.fused(h)
            q, k = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd)
            return self.norm_rope(q, self.q_norm, positions), self.norm_rope(k, self.k_norm, positions), \
                v.view(T, self.nkv, self.hd)
        step = self.fused.max_rows
        if T > step:  # slices of rows that stay in L2 (see DOT_CHUNK_BYTES)
            parts = [self._call(h[i:i + step], positions[i:i + step]) for i in range(0, T, step)]
            return tuple(torch.cat(ys) for ys in zip(*parts, strict=True))
        return self._call(h, positions)

    def _call(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rope = self.norm_rope.rope
        return self._op(h, self.fused._datas, self.fused._qtypes, self.q_norm, self.k_norm, positions, rope.cos,
                        rope.sin, self.nh, self.nkv, self.hd, self.norm_rope.eps, rope.rope_dim, bool(rope.neox))


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, window: int | None = None,
                scale: float | None = None, table: torch.Tensor | None = None,
                block_size: int = 0) -> torch.Tensor | None:
    """One query per sequence (`attn_decode`): q [B, nh, hd], lens [B] int64 -> [B, nh*hd]; the same
    result as `decode_attention` / `gqa_attention` for one query. k/v are either padded per sequence,
    [B, L, nkv, hd] (rows past `lens[b]` are ignored), or, with `table` [B, nb] int64 block ids and
    `block_size`, the paged pool's slots [n_blocks * block_size, nkv, hd], read in place (row j of
    sequence b is slot table[b, j // block_size] * block_size + j % block_size).
    None when the inputs do not fit the kernel (the caller falls back): wrong dtypes or shapes here, or
    a length outside 1..L or a block id outside the pool (the kernel checks every block it would read)."""
    B, nh, hd = q.shape
    paged = table is not None
    if (q.device.type != "cpu" or k.dtype is not torch.float32 or v.dtype is not torch.float32
            or q.dtype is not torch.float32 or hd % 8 or hd > 256 or k.dim() != (3 if paged else 4)
            or (k.shape[0] != B and not paged) or k.shape != v.shape or k.shape[-1] != hd or k.shape[-2] < 1
            or nh % k.shape[-2] or lens.numel() != B or B < 1):
        return None
    if paged and (block_size < 1 or table.dim() != 2 or table.shape[0] != B):
        return None
    lens = lens.to(torch.int64).reshape(-1).contiguous()
    if paged:
        table = table.to(torch.int64).contiguous()
    out = ops().attn_decode.default(q.contiguous(), k.contiguous(), v.contiguous(), lens, table,
                                    block_size if paged else 0, window or 0, scale if scale is not None else hd ** -0.5)
    return out if out.numel() else None


class EmbeddingRows:
    """`rows(ids) -> [*ids.shape, K]` float32: an embedding lookup dequantizing only the rows asked for
    (`dequant_rows`, bit-exact with the reference dequantizer, ~1 us per row instead of ~0.3 ms per call
    through the numpy reference)."""

    def __init__(self, w: PackedTensor) -> None:
        self._op = ops().dequant_rows.default
        self.weight, self.qtype, self.K = w, int(w.qtype), w.shape[-1]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        raw = self.weight.data[ids.reshape(-1)].contiguous()  # the rows' GGUF bytes (bad ids: an index error)
        return self._op(raw, self.qtype, self.K).view(*ids.shape, self.K)


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """`torch.argmax(x, dim=-1)` for a float32 CPU matrix [R, V] (same ties and NaN rule), or None
    when it does not apply."""
    if x.dim() != 2 or not _plain(x) or x.shape[1] < 1:
        return None
    return ops().argmax.default(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`kernels.reference.rms_norm` over the last dim in one native call (new tensor), or None if it does not apply."""
    if not (_plain(x) and _plain(weight)) or x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        return None
    return ops().rms_norm.default(x, weight, eps)
