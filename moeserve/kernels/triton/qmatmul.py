"""Matrix products on packed GGUF weights (`packing.py`), dequantized in registers: `y = x @ W.T`.

The unit of work is a *group*: 2*SH consecutive weights of a row whose quant bits are SH consecutive
bytes (32 weights / 16 bytes for Q4_0..Q8_0 and IQ4_NL/IQ4_XS, 64 / 32 for Q4_K and Q5_K, 128 / 64 for Q6_K;
F16/BF16 expert stacks: 32 two-byte weights, SH = 16 weights). In every GGUF type the low nibbles of those
bytes are the group's first half and the high nibbles its second half (Q8_0 and the float types: 16 / 16), so
`_dequant_group` loads each byte once and returns both halves as `[BLOCK_N, SH]` tiles (the rows' own layout);
the product takes them, transposed, as two `tl.dot`s against the matching halves of x. Tiles never cross a
group, so a group's scales are one load per row (Q6_K: per 16 weights).

`benchmarks/sass_report.py` compiles these kernels for sm_90 without a GPU and counts the instructions of
their K loops; the layout choices here (the tiles' orientation, `group_dot`'s SWAP for decode) follow it.

Activations are cast to fp16 in the kernel and weights are dequantized exactly in float32 (the
reference's operation order) then rounded to fp16: fp16 x fp16 tensor-core dots, float32 accumulation.
Where activations may pass fp16's range (the SwiGLU product the down projections read) and for BF16 weights,
the dot is TF32 instead (`group_dot`'s WIDE): x rounded to TF32's 10-bit mantissa by its producer or here
(`round_tf32`), the weights as the tensor cores take float32 (truncated to it).
The quant integers become floats without a conversion instruction (`_int_f32`, `_nibbles_f32`, `_i8_f32`: the
integer's bits under the exponent of 2^23, then an exact subtraction): sm_90 converts at an eighth of its
issue rate, and one conversion per weight made the K loops conversion-bound.

A call never synchronises with the host and its launch shapes depend only on the input's shape, so it
can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.backend import Linear
from moeserve.kernels.dense import DenseLinear
from moeserve.kernels.qlinear import ReferenceLinear
from moeserve.kernels.triton.norm import normed_cols, rows_rstd
from moeserve.kernels.triton.packing import PackedWeight, concat_rows, pack_weight, packable
from moeserve.kernels.triton.pdl import (
    PREFETCH_MAX_BYTES,
    pdl,
    pdl_enter,
    pdl_release,
    pdl_wait,
    prefetch_row_range,
    prefetch_span,
)

__all__ = ["TritonEmbedding", "TritonLinear", "dequantize_packed", "k_splits", "qmatmul"]

# QTYPE codes are the GGML type ids.
_Q4_0 = tl.constexpr(int(QT.Q4_0))
_Q4_1 = tl.constexpr(int(QT.Q4_1))
_Q5_0 = tl.constexpr(int(QT.Q5_0))
_Q5_1 = tl.constexpr(int(QT.Q5_1))
_Q8_0 = tl.constexpr(int(QT.Q8_0))
_Q2_K = tl.constexpr(int(QT.Q2_K))
_Q3_K = tl.constexpr(int(QT.Q3_K))
_Q4_K = tl.constexpr(int(QT.Q4_K))
_Q5_K = tl.constexpr(int(QT.Q5_K))
_Q6_K = tl.constexpr(int(QT.Q6_K))
_IQ4_NL = tl.constexpr(int(QT.IQ4_NL))
_IQ4_XS = tl.constexpr(int(QT.IQ4_XS))
_F16 = tl.constexpr(int(QT.F16))
_BF16 = tl.constexpr(int(QT.BF16))

_SMALL_M = 16
"""Up to this many rows one BLOCK_M=16 tile holds every row: the weight is streamed once (decode)."""

PLAN_BLOCK_N = 64
"""Output columns per tile: a head of 64 or 128 dimensions is one or two whole tiles (`qkv.py`)."""

_SPLIT_MAX_M = 256
"""Up to this many rows a product whose tiles leave SMs idle splits K (`k_splits`): 64 decode streams make one
row tile, so o_proj (2048 columns) would otherwise run 32 programs on 132 SMs, each walking all of K."""


def half_group(qtype: QT) -> int:
    """SH: weights per half group = bytes of quant bits per group for the quant types (module docstring)."""
    return {QT.Q2_K: 32, QT.Q3_K: 32, QT.Q4_K: 32, QT.Q5_K: 32, QT.Q6_K: 64}.get(QT(qtype), 16)


def groups_per_step(qtype: QT, n_groups: int, block_m: int) -> int:
    """Groups unrolled per K-loop step: the largest power of two that divides `n_groups` (no step is
    partial, so the K loop needs no masks) and spans at most 256 weights for a 16-row tile (long steps
    keep many weight loads in flight while streaming) or 64 for larger tiles (register pressure)."""
    target_k = 256 if block_m == 16 else 64
    g = max(1, target_k // (2 * half_group(qtype)))
    while n_groups % g:
        g //= 2
    return g


def weight_args(w: PackedWeight) -> tuple:
    """The kernel arguments for `w`: six arrays (missing ones alias `qs`, never read) and four row strides."""
    qs = w.qs
    arrays = tuple(qs if t is None else t for t in (w.qs, w.qh, w.sc, w.mn, w.d, w.dm))
    strides = tuple(t.shape[-1] for t in (arrays[0], arrays[1], arrays[2], arrays[4]))
    return arrays + strides


# --------------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------------


@triton.jit
def _int_f32(q, offset: tl.constexpr):
    """float32(q) - offset for integers 0 <= q < 2^23, exactly, without an int -> float conversion (sm_90 converts
    16 values per clock per SM, an eighth of its float32 rate): q's bits under the exponent of 2^23 make the
    float 2^23 + q, and subtracting 2^23 + offset from it is exact (both are integers below 2^24)."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _i8_f32(q):
    """float32(q) for int8 q, exactly and without a conversion: its byte XOR 0x80 is q + 128, and XOR-ing in the
    exponent of 2^23 as well (no bits in common) makes the float 2^23 + 128 + q in one operation."""
    biased = q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
    return biased.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _nibbles_f32(q):
    """(low nibble, 16 x high nibble) of bytes q (int32 in [0, 256)) as exact float32s, in four integer/float
    operations per byte and no conversion: 2^23 + q and 2^23 + (q & 0xF0) by bits, then two exact subtractions."""
    full = q | 0x4B000000
    high = full & -16
    f_high = high.to(tl.float32, bitcast=True)
    return full.to(tl.float32, bitcast=True) - f_high, f_high - 8388608.0


@triton.jit
def _per16(v):
    """[BN, n] values of 16-weight sub-blocks (scales, mins) -> [BN, 16 n], each repeated over its 16 weights."""
    BN: tl.constexpr = v.shape[0]
    N: tl.constexpr = v.shape[1]
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BN, N, 16)), (BN, N * 16))


_IQ4_BIAS = tl.constexpr(12582912.0)
"""1.5 * 2^23: float32s in [2^23, 2^24) are spaced 1 apart, so a sum landing there is rounded to an integer."""
# `_iq4_grid`'s quartic: the minimax fit to quants.IQ4_VALUES over codes 0..15 with the constant term held at the
# integer -127 (so that it adds exactly to _IQ4_BIAS); max error 0.4397, float32 coefficients.
_IQ4_C1 = tl.constexpr(24.500598907470703)
_IQ4_C2 = tl.constexpr(-1.4385637044906616)
_IQ4_C3 = tl.constexpr(0.03627324849367142)
_IQ4_C4 = tl.constexpr(0.0014480184763669968)


@triton.jit
def _iq4_grid(f, STEP: tl.constexpr):
    """IQ4_VALUES[code] + _IQ4_BIAS, exactly, for f = STEP * code (float32, code 0..15; STEP 16 takes
    `_nibbles_f32`'s high nibble as it is). A table lookup without a table: the kernels' signatures carry no
    pointer for one, and selects among the grid packed into int32 words cost about 10 integer operations a weight.
    Here it is 4 FMAs: a quartic within 0.44 of every grid value, whose last FMA adds the bias (and its integer
    constant term) and so rounds to the nearest integer, the grid value (0.06 to spare: float32's own error is
    ~1e-5, with or without FMAs). STEP's coefficients are divided by STEP^k, powers of two: every intermediate is
    the STEP = 1 one times a power of two, the same roundings (`tests/test_triton_qmatmul.py` checks all 16 codes)."""
    t = tl.fma(f, _IQ4_C4 / (STEP * STEP * STEP * STEP), _IQ4_C3 / (STEP * STEP * STEP))
    t = tl.fma(t, f, _IQ4_C2 / (STEP * STEP))
    t = tl.fma(t, f, _IQ4_C1 / STEP)
    return tl.fma(t, f, _IQ4_BIAS - 127.0)


@triton.jit
def _dequant_group(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, rows, g,
                   QTYPE: tl.constexpr, SH: tl.constexpr):
    """Group `g` of weight rows `rows` (int64 [BN], all valid): float32 ([BN, SH] first half, second half),
    bit-identical to `quants.dequantize` (same float32 operations in the same order).

    The tiles are [rows, k]: a row's quant bytes are contiguous in memory and stay contiguous in a thread's
    registers (wide loads, no per-byte shared-memory traffic); the products take them transposed."""
    j = tl.arange(0, SH)[None, :]
    r = rows[:, None]
    if QTYPE == _F16:
        w = qs_ptr + r * s_qs + g * 32 + j
        lo = tl.load(w).to(tl.float32)
        hi = tl.load(w + 16).to(tl.float32)
    elif QTYPE == _BF16:  # the int16 bits as a float32's top half: exact, and no bfloat16 in the interpreter
        w = qs_ptr + r * s_qs + g * 32 + j
        lo = (tl.load(w).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        hi = (tl.load(w + 16).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif QTYPE == _Q8_0:
        d = tl.load(d_ptr + rows * s_d + g).to(tl.float32)[:, None]
        q = qs_ptr + r * s_qs + g * 32 + j
        lo = _i8_f32(tl.load(q)) * d
        hi = _i8_f32(tl.load(q + 16)) * d
    elif QTYPE == _Q6_K:
        ql = tl.load(qs_ptr + r * s_qs + g * 64 + j).to(tl.int32)
        qh = tl.load(qh_ptr + r * s_qh + g * 32 + j % 32).to(tl.int32)
        # the 2-bit pairs for weight j (bits 2(j//32)..) and j+64 (4 higher) moved to bits 4-5 and 8-9: beside the
        # low nibble, and 16x beside the high one (kept 16x, its scale divided by 16 below: exact)
        u = qh << (4 - 2 * (j // 32))
        q_lo = _int_f32((ql & 0x0F) | (u & 0x30), 32.0)
        q_hi = _int_f32((ql & 0xF0) | (u & 0x300), 512.0)
        d = tl.load(d_ptr + rows * s_d + g // 2).to(tl.float32)[:, None]
        sc = sc_ptr + r * s_sc + g * 8 + tl.arange(0, 4)[None, :]
        lo = _per16(d * tl.load(sc).to(tl.float32)) * q_lo
        hi = _per16(d * tl.load(sc + 4).to(tl.float32) * 0.0625) * q_hi
    elif QTYPE == _Q2_K or QTYPE == _Q3_K:
        # group g: weights 64g..64g+63, bit pairs 4(g%2) (first half) and 4(g%2)+2 (second) of the 32 code bytes
        # of weights 128(g//2).. ; one scale (Q2_K: and min) per 16 weights
        q = tl.load(qs_ptr + r * s_qs + (g // 2) * 32 + j).to(tl.int32)
        shift = 4 * (g % 2)
        c_lo = (q >> shift) & 3
        c_hi = (q >> (shift + 2)) & 3
        sc = sc_ptr + r * s_sc + 4 * g + tl.arange(0, 2)[None, :]
        d = tl.load(d_ptr + rows * s_d + g // 4).to(tl.float32)[:, None]
        if QTYPE == _Q3_K:  # codes -4..3: bit 2(g%4) (and the next) of mask byte j is the third bit, set = no -4
            hm = tl.load(qh_ptr + r * s_qh + (g // 4) * 32 + j).to(tl.int32)
            bit = 2 * (g % 4)
            lo = _per16(d * tl.load(sc).to(tl.float32)) * _int_f32(c_lo | (((hm >> bit) & 1) << 2), 4.0)
            hi = _per16(d * tl.load(sc + 2).to(tl.float32)) * _int_f32(c_hi | (((hm >> (bit + 1)) & 1) << 2), 4.0)
        else:  # Q2_K: a scale byte holds the scale (low nibble) and the min (high)
            dmin = tl.load(dm_ptr + rows * s_d + g // 4).to(tl.float32)[:, None]
            s_lo = tl.load(sc).to(tl.int32)
            s_hi = tl.load(sc + 2).to(tl.int32)
            ml_lo = _per16(dmin * (s_lo >> 4).to(tl.float32))
            ml_hi = _per16(dmin * (s_hi >> 4).to(tl.float32))
            lo = _per16(d * (s_lo & 15).to(tl.float32)) * _int_f32(c_lo, 0.0) - ml_lo
            hi = _per16(d * (s_hi & 15).to(tl.float32)) * _int_f32(c_hi, 0.0) - ml_hi
    elif QTYPE == _IQ4_NL or QTYPE == _IQ4_XS:  # one 32-weight block (IQ4_XS: sub-block, scale d * sc) per group
        f_lo, f_hi = _nibbles_f32(tl.load(qs_ptr + r * s_qs + g * 16 + j).to(tl.int32))
        if QTYPE == _IQ4_XS:
            dl = tl.load(d_ptr + rows * s_d + g // 8).to(tl.float32) * tl.load(sc_ptr + rows * s_sc + g).to(tl.float32)
        else:
            dl = tl.load(d_ptr + rows * s_d + g).to(tl.float32)
        dl = dl[:, None]  # times the exact grid value: the reference's one rounding (and its signed zeros, infs)
        lo = dl * (_iq4_grid(f_lo, 1) - _IQ4_BIAS)
        hi = dl * (_iq4_grid(f_hi, 16) - _IQ4_BIAS)
    elif QTYPE == _Q4_K or QTYPE == _Q5_K:
        # the high nibble stays 16x (not shifted down): its scale is divided by 16 instead, exactly
        q = tl.load(qs_ptr + r * s_qs + g * 32 + j).to(tl.int32)
        if QTYPE == _Q5_K:
            qh = tl.load(qh_ptr + r * s_qh + (g // 4) * 32 + j).to(tl.int32)
            bit = 2 * (g % 4)
            f_lo = _int_f32((q & 15) | (((qh >> bit) & 1) << 4), 0.0)
            f_hi = _int_f32((q & 0xF0) | (((qh >> (bit + 1)) & 1) << 8), 0.0)
        else:
            f_lo, f_hi = _nibbles_f32(q)
        d = tl.load(d_ptr + rows * s_d + g // 4).to(tl.float32)
        dmin = tl.load(dm_ptr + rows * s_d + g // 4).to(tl.float32)
        sc = sc_ptr + rows * s_sc + 2 * g
        mn = mn_ptr + rows * s_sc + 2 * g
        dl_lo = (d * tl.load(sc).to(tl.float32))[:, None]
        dl_hi = (d * tl.load(sc + 1).to(tl.float32) * 0.0625)[:, None]
        ml_lo = (dmin * tl.load(mn).to(tl.float32))[:, None]
        ml_hi = (dmin * tl.load(mn + 1).to(tl.float32))[:, None]
        lo = dl_lo * f_lo - ml_lo
        hi = dl_hi * f_hi - ml_hi
    else:  # Q4_0, Q4_1, Q5_0, Q5_1: one 32-weight block per group
        # the high nibble stays 16x (not shifted down): its scale is divided by 16 instead, exactly
        q = tl.load(qs_ptr + r * s_qs + g * 16 + j).to(tl.int32)
        if QTYPE == _Q5_0 or QTYPE == _Q5_1:
            qh = qh_ptr + r * s_qh + g * 4 + j // 8
            f_lo = _int_f32((q & 15) | (((tl.load(qh).to(tl.int32) >> (j % 8)) & 1) << 4), 0.0)
            f_hi = _int_f32((q & 0xF0) | (((tl.load(qh + 2).to(tl.int32) >> (j % 8)) & 1) << 8), 0.0)
        else:
            f_lo, f_hi = _nibbles_f32(q)
        d = tl.load(d_ptr + rows * s_d + g).to(tl.float32)[:, None]
        if QTYPE == _Q4_1 or QTYPE == _Q5_1:
            m = tl.load(dm_ptr + rows * s_d + g).to(tl.float32)[:, None]
            lo = (d * f_lo) + m
            hi = ((d * 0.0625) * f_hi) + m
        else:
            offset: tl.constexpr = 8.0 if QTYPE == _Q4_0 else 16.0
            lo = d * (f_lo - offset)
            hi = (d * 0.0625) * (f_hi - 16.0 * offset)
    return lo, hi


@triton.jit
def prefetch_weights(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, rows, r0, r1, g0, g1,
                     QTYPE: tl.constexpr, SH: tl.constexpr):
    """Ask L2 for what groups g0..g1-1 of weight rows `rows` (r0..r1) read (`pdl`): the quant bytes of that K range
    row by row, and the scale arrays of the whole rows (a few lines: the K splits of a tile share them)."""
    if QTYPE == _F16 or QTYPE == _BF16:  # 32 two-byte weights per group
        prefetch_row_range(qs_ptr.to(tl.pointer_type(tl.uint8)), rows, 2 * s_qs, g0 * 64, g1 * 64)
    elif QTYPE == _Q2_K or QTYPE == _Q3_K:  # two groups share 32 code bytes
        prefetch_row_range(qs_ptr, rows, s_qs, (g0 // 2) * 32, ((g1 + 1) // 2) * 32)
    else:
        QSB: tl.constexpr = 2 * SH if QTYPE == _Q8_0 else SH  # quant bytes per group
        prefetch_row_range(qs_ptr, rows, s_qs, g0 * QSB, g1 * QSB)
    if QTYPE == _Q6_K:
        prefetch_row_range(qh_ptr, rows, s_qh, g0 * 32, g1 * 32)
    elif QTYPE == _Q5_K or QTYPE == _Q3_K:
        prefetch_row_range(qh_ptr, rows, s_qh, (g0 // 4) * 32, ((g1 + 3) // 4) * 32)
    elif QTYPE == _Q5_0 or QTYPE == _Q5_1:
        prefetch_row_range(qh_ptr, rows, s_qh, g0 * 4, g1 * 4)
    _prefetch_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, s_sc, s_d, r0, r1, QTYPE)


@triton.jit
def prefetch_rows(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, r0, r1,
                  QTYPE: tl.constexpr):
    """Ask L2 for every array's bytes of whole weight rows r0..r1 (contiguous spans)."""
    prefetch_span(qs_ptr, r0 * s_qs, (r1 + 1) * s_qs - 1)
    if QTYPE == _Q5_0 or QTYPE == _Q5_1 or QTYPE == _Q5_K or QTYPE == _Q6_K or QTYPE == _Q3_K:
        prefetch_span(qh_ptr, r0 * s_qh, (r1 + 1) * s_qh - 1)
    _prefetch_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, s_sc, s_d, r0, r1, QTYPE)


@triton.jit
def _prefetch_scales(sc_ptr, mn_ptr, d_ptr, dm_ptr, s_sc, s_d, r0, r1, QTYPE: tl.constexpr):
    """The scale arrays (those `QTYPE` has: none for F16/BF16) of whole rows r0..r1."""
    if QTYPE != _F16 and QTYPE != _BF16:
        prefetch_span(d_ptr, r0 * s_d, (r1 + 1) * s_d - 1)
    if (QTYPE == _Q4_K or QTYPE == _Q5_K or QTYPE == _Q6_K or QTYPE == _Q2_K or QTYPE == _Q3_K
            or QTYPE == _IQ4_XS):
        prefetch_span(sc_ptr, r0 * s_sc, (r1 + 1) * s_sc - 1)
    if QTYPE == _Q4_K or QTYPE == _Q5_K:
        prefetch_span(mn_ptr, r0 * s_sc, (r1 + 1) * s_sc - 1)
    if QTYPE == _Q4_1 or QTYPE == _Q5_1 or QTYPE == _Q4_K or QTYPE == _Q5_K or QTYPE == _Q2_K:
        prefetch_span(dm_ptr, r0 * s_d, (r1 + 1) * s_d - 1)


@triton.jit
def x_group(x_ptr, xoff, g, SH: tl.constexpr, WIDE: tl.constexpr = False, ROUND: tl.constexpr = False):
    """The columns of x that group `g` multiplies, for rows at element offsets `xoff` ([BM] int64): fp16
    ([BM, SH] first half, second half), or float32 with WIDE (`group_dot`), rounded to TF32 here with ROUND
    (else its producer rounded it: two integer operations per element are cheap once, not in every K loop
    that reads it)."""
    p = x_ptr + xoff[:, None] + g * (2 * SH) + tl.arange(0, SH)[None, :]
    if WIDE:
        lo, hi = tl.load(p).to(tl.float32), tl.load(p + SH).to(tl.float32)
        if ROUND:
            lo, hi = round_tf32(lo), round_tf32(hi)
    else:
        lo, hi = tl.load(p).to(tl.float16), tl.load(p + SH).to(tl.float16)
    return lo, hi


@triton.jit
def round_tf32(x):
    """float32 x rounded to TF32's 10-bit mantissa (to nearest, ties away from zero; inf stays inf), in two integer
    operations: the tensor cores would truncate the low 13 bits of a float32 operand instead (about twice the
    error, and biased towards zero). Runs under the interpreter too, which then sees the GPU's x."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def group_dot(acc, x_lo, x_hi, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, rows, g,
              QTYPE: tl.constexpr, SH: tl.constexpr, SWAP: tl.constexpr = False, WIDE: tl.constexpr = False):
    """acc += x[:, group g] @ W[rows, group g].T, the weights dequantized here and rounded to fp16.

    SWAP: acc is the transposed tile, acc += W[rows, group g] @ x[:, group g].T — the weight rows on the MMA's
    M side and the few activation rows on its N side (decode: fewer instructions and registers on sm_90).

    WIDE: x (float32 rounded to TF32, `round_tf32`) and the weights meet in a TF32 product instead — fp16's 10-bit
    mantissa with float32's range — for activations that are not a normed row and may pass fp16's 65,504: the
    SwiGLU product feeding a down projection, where real checkpoints grow their "massive activations" (fp16
    turns them into inf, then NaN logits); and for BF16 weights, which TF32 holds exactly. Dequantized quant
    weights go in as float32, which the tensor cores truncate to TF32 (relative error < 2^-10, against fp16's
    rounding < 2^-11: rounding them here would cost two integer operations per weight in the K loop); the
    interpreter multiplies them unrounded."""
    w_lo, w_hi = _dequant_group(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, rows, g,
                                QTYPE, SH)
    if WIDE:
        if SWAP:
            acc = tl.dot(w_lo, tl.trans(x_lo), acc, input_precision="tf32")
            acc = tl.dot(w_hi, tl.trans(x_hi), acc, input_precision="tf32")
        else:
            acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision="tf32")
            acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision="tf32")
    elif SWAP:
        acc = tl.dot(w_lo.to(tl.float16), tl.trans(x_lo), acc)
        acc = tl.dot(w_hi.to(tl.float16), tl.trans(x_hi), acc)
    else:
        acc = tl.dot(x_lo, tl.trans(w_lo.to(tl.float16)), acc)
        acc = tl.dot(x_hi, tl.trans(w_hi.to(tl.float16)), acc)
    return acc


@triton.jit
def arrive_last(count_ptr, n, mask=None):
    """Count this program in the arrival counter(s) at `count_ptr` (per element under `mask` for a tensor of
    counters) and say whether it is the n-th, i.e. the last, of the programs sharing a reduction.

    The CTA barrier before the atomic makes every thread's partial stores precede the count; the atomic is
    acquire-release at GPU scope, so the last program sees every other program's partials (it reads them with
    `.cg`, through L2). The barrier after it hands the answer to every thread. See `counters`."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, mask=mask, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    return arrived == n - 1


@triton.jit
def reset_count(count_ptr, mask=None):
    """The last program's reset of its counter(s) to zero, for the next launch or CUDA-graph replay."""
    tl.atomic_xchg(count_ptr, 0, mask=mask, sem="relaxed", scope="gpu")


@triton.jit
def acc_init(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """A zero float32 accumulator for `group_dot`: [BLOCK_M, BLOCK_N], or its transpose with SWAP."""
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def acc_final(acc, SWAP: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] result of an `acc_init` accumulator."""
    if SWAP:
        acc = tl.trans(acc)
    return acc


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def tile_product(pid, x_ptr, M, N, stride_xm, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                 groups_per_split,
                 QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr,
                 PREFETCH: tl.constexpr, delta_ptr=None, nw_ptr=None, K=0, eps=0.0, NORM: tl.constexpr = False,
                 HAS_DELTA: tl.constexpr = False, N_ROWS: tl.constexpr = 1, H_PAD: tl.constexpr = 1,
                 WIDE: tl.constexpr = False, ROUND: tl.constexpr = False):
    """The body every `qmatmul`-shaped kernel shares: tile `pid` ([BLOCK_M, BLOCK_N]) of x @ W.T over the K range
    `program_id(1)` (of `groups_per_split` groups). Returns (acc, offs_m, offs_n, pid_m, pid_n).
    With NORM x is the pending RMSNorm of `norm.PendingNorm` (x + delta, weight `nw_ptr`, rows of K floats):
    the program takes the rows' norm after its wait and normalises its activations as it loads them.
    WIDE: x is not a normed row and takes the TF32 product (`group_dot`); ROUND: rounded to TF32 here.

    Tiles are visited GROUP_M row-tiles at a time so a column of weight tiles is reused from L2.
    Out-of-range rows and columns are clamped to the last valid one (loads need no masks; callers mask stores).
    It starts the kernel: with PDL and PREFETCH (few rows: a weight-streaming product) the program asks L2 for its
    weight bytes before it waits for the previous kernel (`pdl`); everything before the wait is program-id
    arithmetic."""
    pdl_release(PDL)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xoff = tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    acc = acc_init(BLOCK_M, BLOCK_N, SWAP)
    g0 = pid_k * groups_per_split
    if PDL and PREFETCH:
        prefetch_weights(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, rows,
                         tl.minimum(pid_n * BLOCK_N, N - 1), tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1, N - 1),
                         g0, g0 + groups_per_split, QTYPE, SH)
    pdl_wait(PDL)
    if NORM:
        rstd = rows_rstd(x_ptr, delta_ptr, stride_xm, offs_m, M, K, eps, HAS_DELTA, N_ROWS, H_PAD)
    for kb in range(g0, g0 + groups_per_split, GPI):
        for gi in tl.static_range(GPI):
            if NORM:
                cols = (kb + gi) * (2 * SH) + tl.arange(0, SH)
                x_lo = normed_cols(x_ptr, delta_ptr, nw_ptr, xoff, cols, rstd, HAS_DELTA).to(tl.float16)
                x_hi = normed_cols(x_ptr, delta_ptr, nw_ptr, xoff, cols + SH, rstd, HAS_DELTA).to(tl.float16)
            else:
                x_lo, x_hi = x_group(x_ptr, xoff, kb + gi, SH, WIDE, ROUND)
            acc = group_dot(acc, x_lo, x_hi, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                            rows, kb + gi, QTYPE, SH, SWAP, WIDE)
    return acc_final(acc, SWAP), offs_m, offs_n, pid_m, pid_n


@triton.jit
def sum_splits(part, stride_ps, mask, SPLIT_K: tl.constexpr):
    """The SPLIT_K partial tiles at `part` (pointers into split 0) added in split order, read through L2 (`.cg`:
    other programs wrote them) — the same float32 sum whichever program arrived last."""
    total = tl.zeros(part.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part + s * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _qmatmul_kernel(x_ptr, y_ptr, part_ptr, lock_ptr, M, N, stride_xm, stride_ym, stride_ps, stride_pm,
                    qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d, groups_per_split,
                    QTYPE: tl.constexpr, SH: tl.constexpr, GPI: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
                    PDL: tl.constexpr, PREFETCH: tl.constexpr, WIDE: tl.constexpr, ROUND: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y (`tile_product`), or with SPLIT_K > 1 its K range `program_id(1)`.
    Split-K without a second launch and without float atomics: each split stores its partial tile, then counts
    itself in the tile's lock (an int32 atomic, acquire-release); the split that arrives last adds the SPLIT_K
    partials in split order — deterministic whichever arrives last — stores y and resets the lock to zero for
    the next launch (or CUDA-graph replay).
    """
    acc, offs_m, offs_n, pid_m, pid_n = tile_product(
        tl.program_id(0), x_ptr, M, N, stride_xm, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
        groups_per_split, QTYPE, SH, GPI, BLOCK_M, BLOCK_N, GROUP_M, SWAP, PDL, PREFETCH, WIDE=WIDE, ROUND=ROUND)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc, mask=mask)
    else:
        part = part_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
        tl.store(part + tl.program_id(1) * stride_ps, acc, mask=mask)
        lock = lock_ptr + tl.program_id(0)
        if arrive_last(lock, SPLIT_K):
            tl.store(y, sum_splits(part, stride_ps, mask, SPLIT_K), mask=mask)
            reset_count(lock)


@triton.jit
def _dequant_kernel(out_ptr, ids_ptr, R, n_out, K, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                    QTYPE: tl.constexpr, SH: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
                    PDL: tl.constexpr):
    """Group `program_id(1)` of BLOCK_N output rows, written as float32: weight rows in order, or (GATHER) the
    rows `ids` names, clamped into [0, R) (an embedding lookup; ids are checked before they get here)."""
    pdl_enter(PDL)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < n_out
    if GATHER:
        rows = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    g = tl.program_id(1)
    lo, hi = _dequant_group(qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, s_qs, s_qh, s_sc, s_d,
                            tl.minimum(tl.maximum(rows, 0), R - 1), g, QTYPE, SH)
    p = out_ptr + offs[:, None].to(tl.int64) * K + g * (2 * SH) + tl.arange(0, SH)[None, :]
    tl.store(p, lo, mask=ok[:, None])
    tl.store(p + SH, hi, mask=ok[:, None])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (1 off the GPU, where the interpreter runs one program at a time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # replaced counter buffers stay alive: a captured graph may still use one


def counters(n: int, device: torch.device, owner: str) -> torch.Tensor:
    """Zeroed int32 arrival counters on `device`, at least `n`, for the kernels that finish a reduction in the
    program that arrives last (`owner` names the kernel family). Every launch leaves them at zero again, so all
    launches of a family on a stream share one buffer (kernels on a stream run one after another)."""
    buf = _COUNTERS.get((device, owner))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[(device, owner)] = torch.zeros(max(4096, n), dtype=torch.int32, device=device)
    return buf


def k_splits(chunks: int, tiles: int, device: torch.device, forced: int | None = None) -> int:
    """K splits for a small-M product: enough programs for two per SM, each a whole number of K steps; or
    `forced` (a caller's or test's choice), which must divide the `chunks` K steps."""
    if forced is not None:
        if chunks % forced:
            raise ValueError(f"split_k={forced} does not divide the {chunks} K steps")
        return forced
    want = max(1, triton.cdiv(2 * _sm_count(device), tiles))
    return max(s for s in range(1, min(want, chunks) + 1) if chunks % s == 0)


@dataclass(frozen=True)
class ProductPlan:
    """How `tile_product` covers an [M, K] x [N, K]^T product: tile shapes, K splits and launch options."""

    tiles: int  # output tiles (row tiles x column tiles): the grid's first axis
    split_k: int  # K ranges per tile: its second axis
    groups: int  # quant groups along K
    chunks: int  # K-loop steps (of constexprs["GPI"] groups): a split is a whole number of them
    constexprs: dict

    @property
    def grid(self) -> tuple[int, int]:
        return self.tiles, self.split_k

    @property
    def groups_per_split(self) -> int:
        return self.groups // self.split_k

    def with_split(self, split_k: int) -> ProductPlan:
        """The same tiles over `split_k` K ranges (a caller that launches several products in one grid)."""
        return replace(self, split_k=split_k, constexprs={**self.constexprs, "SPLIT_K": split_k})


def plan_product(m: int, w: PackedWeight, device: torch.device, split_k: int | None = None) -> ProductPlan:
    """M <= 16 (decode): one BLOCK_M=16 row tile (on the MMA's N side: `group_dot`'s SWAP), narrow column tiles
    and split-K so the weight is read once by enough programs to fill the GPU. Larger M: a tiled GEMM, also
    split over K up to `_SPLIT_MAX_M` rows while its tiles are too few for the SMs. `split_k` overrides the
    automatic choice (tests); it must divide the number of K steps. Column tiles are 64 wide (`PLAN_BLOCK_N`)."""
    return plan_products(m, [w], device, split_k)[0]


def plan_products(m: int, ws: list[PackedWeight], device: torch.device,
                  split_k: int | None = None) -> list[ProductPlan]:
    """`plan_product` for products of the same rows launched in one grid: their tiles side by side, one K split
    for all (a whole number of each one's K steps)."""
    if m <= _SMALL_M:
        block_m, warps = 16, 4
    else:
        block_m = 64 if m <= 256 else 128
        warps = block_m // 16
    plans = []
    for w in ws:
        n, k = w.shape
        sh = half_group(w.qtype)
        n_groups = k // (2 * sh)
        gpi = groups_per_step(w.qtype, n_groups, block_m)
        plans.append(ProductPlan(triton.cdiv(m, block_m) * triton.cdiv(n, PLAN_BLOCK_N), 1, n_groups,
                                 n_groups // gpi, dict(
            QTYPE=int(w.qtype), SH=sh, GPI=gpi, BLOCK_M=block_m, BLOCK_N=PLAN_BLOCK_N, GROUP_M=8, SPLIT_K=1,
            SWAP=m <= _SMALL_M, PREFETCH=m <= _SPLIT_MAX_M and w.nbytes <= PREFETCH_MAX_BYTES, num_warps=warps,
            num_stages=3)))
    if split_k is None and m > _SPLIT_MAX_M:
        split_k = 1  # decode and batched decode (up to 256 rows) fill the SMs by splits; prefill tiles already do
    split = k_splits(math.gcd(*(p.chunks for p in plans)), sum(p.tiles for p in plans), device, split_k)
    return [p.with_split(split) for p in plans]


def activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: unit stride along K; float32 for bf16 off the GPU (the interpreter has no
    bfloat16) and for float64."""
    if x.dtype == torch.float64 or (x.dtype == torch.bfloat16 and x.device.type != "cuda"):
        x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def qmatmul(x: torch.Tensor, w: PackedWeight, split_k: int | None = None, wide: bool = False,
            rounded: bool = False) -> torch.Tensor:
    """float32 `x @ W.T` for x `[M, K]` (any float dtype) and a packed `[N, K]` weight, one launch: tiles and K
    splits as `plan_product` lays them out; the last split of each tile adds the partial sums in a fixed order
    (the kernel's docstring). `split_k` overrides the automatic choice (tests). `wide`: x may leave fp16's
    range (a SwiGLU product), so the product is TF32 (`group_dot`), x rounded to it in the kernel unless
    `rounded` says its producer did (`round_tf32`)."""
    if len(w.shape) != 2:
        raise ValueError(f"qmatmul needs a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    wide = wide or w.tf32
    x = activations(x)
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [M, {k}]")
    if m == 0:
        return torch.zeros(0, n, dtype=torch.float32, device=x.device)
    plan = plan_product(m, w, x.device, split_k)
    split_k = plan.split_k
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    locks = counters(plan.tiles, x.device, "qmatmul") if split_k > 1 else y
    _qmatmul_kernel[plan.grid](
        x, y, part, locks, m, n, x.stride(0), y.stride(0), part.stride(0), part.stride(-2), *weight_args(w),
        plan.groups_per_split, WIDE=wide, ROUND=wide and not rounded, **plan.constexprs, **pdl(x.device))
    return y


def dequantize_packed(w: PackedWeight, ids: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[rows, K]` from the packed arrays with the kernels' own dequantizer (must equal the reference):
    every row, or the rows `ids` names, in that order (one launch either way)."""
    sh = half_group(w.qtype)
    n_out = w.rows if ids is None else ids.numel()
    out = torch.empty(n_out, w.cols, dtype=torch.float32, device=w.qs.device)
    if n_out:
        block_n = min(32, triton.next_power_of_2(n_out))
        _dequant_kernel[(triton.cdiv(n_out, block_n), w.cols // (2 * sh))](
            out, out if ids is None else ids, w.rows, n_out, w.cols, *weight_args(w), QTYPE=int(w.qtype), SH=sh,
            BLOCK_N=block_n, GATHER=ids is not None, **pdl(out.device))
    return out


class TritonEmbedding:
    """`ids [T] -> rows [T, H]` float32 (the Embedding protocol): the step's rows dequantized from the packed
    copy in one launch, bit-identical to the reference's `PackedTensor.rows`."""

    def __init__(self, weight: PackedTensor) -> None:
        self.packed = pack_weight(weight)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_packed(self.packed, ids.reshape(-1)).view(*ids.shape, self.packed.cols)


def _dense(weight: PackedTensor) -> torch.Tensor:
    """A float weight for `F.linear`: its own dtype on the GPU (cuBLAS), float32 elsewhere (exact)."""
    dtype = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[QT(weight.qtype)]
    w = weight.data.contiguous().view(dtype).view(weight.shape)
    return w if w.device.type == "cuda" else w.float()


def _range_scaled(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`matmul(x)` for a product in fp16 (an F16 weight): each row of x divided by the power of two at or above
    its largest magnitude (exact in float32; rows within 1 are left as they are) and the result multiplied back,
    so neither the fp16 operand nor the fp16 output overflows. Device ops only: no host sync, graph-safe."""
    x = x.float()
    scale = torch.exp2(torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True).clamp_min(1.0))))
    return matmul(x / scale) * scale


class TritonLinear:
    """`y = x @ W.T (+ b)` on a packed `[out, in]` weight already on the target device (the Linear protocol).

    Quantized types run `qmatmul` on a repacked copy; F32/F16/BF16 are kept in their dtype and use
    `F.linear` (cuBLAS). A type without a kernel, or a row that is not whole blocks, falls back to
    `ReferenceLinear` (dequantize and multiply), so every loadable weight works.
    """

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None = None) -> None:
        if len(weight.shape) != 2:
            raise ValueError(f"a linear needs a 2-D weight, '{weight.name}' is {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.wide = False  # takes inputs past fp16's range (`widen`)
        qt = QT(weight.qtype)
        self._matmul: Callable[[torch.Tensor], torch.Tensor]
        self.packed: PackedWeight | None = None
        self.dense_weight: torch.Tensor | None = None  # the matrix of a float type, as cuBLAS reads it
        if qt in (QT.F32, QT.F16, QT.BF16):
            self.dense_weight = _dense(weight)
            self._matmul = DenseLinear(self.dense_weight)
        elif packable(weight):
            self.packed = pack_weight(weight)
            self._matmul = functools.partial(qmatmul, w=self.packed)
        else:
            self._matmul = ReferenceLinear(weight)

    @classmethod
    def stacked(cls, linears: list[Linear]) -> TritonLinear | None:
        """One linear whose output is the given ones' outputs side by side (one launch for q/k/v), or None
        when they are not all packed TritonLinears of one quant type without bias."""
        if not all(isinstance(lin, TritonLinear) and lin.packed is not None and lin.bias is None for lin in linears):
            return None
        packed = [lin.packed for lin in linears]  # type: ignore[union-attr]
        if len({p.qtype for p in packed}) != 1 or len({p.shape[1] for p in packed}) != 1:
            return None
        fused = cls.__new__(cls)
        fused.packed = concat_rows(packed)
        fused.out_features, fused.in_features = fused.packed.shape
        fused.bias = None
        fused.wide = False
        fused.dense_weight = None
        fused._matmul = functools.partial(qmatmul, w=fused.packed)
        return fused

    def widen(self, rounded: bool = False) -> None:
        """Take inputs that may leave fp16's range — the SwiGLU product a dense FFN's down projection reads
        (`mlp.TritonMLP`, at load): a packed weight multiplies in TF32 (`group_dot`; `rounded`: its inputs come
        already rounded to TF32), an F16 weight's rows are scaled into range around cuBLAS's fp16 product
        (`_range_scaled`). Once is enough; again, nothing."""
        if self.wide:
            return
        self.wide = True
        if self.packed is not None:
            self._matmul = functools.partial(qmatmul, w=self.packed, wide=True, rounded=rounded)
        elif self.dense_weight is not None and self.dense_weight.dtype == torch.float16:
            self._matmul = functools.partial(_range_scaled, self._matmul)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)
