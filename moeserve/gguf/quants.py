"""GGML block quantization formats: sizes, a reference torch dequantizer, and test-data helpers.

Everything that has to know how a GGML block is laid out lives here, so the loader, the fast
kernels and the tests share one definition (layouts: REFERENCE.md §3, ggml-quants.c).

* :func:`dequantize` is the *reference* dequantizer. It is written in plain vectorised torch so it
  runs on any device, and it reproduces ``gguf.quants.dequantize`` bit for bit: the f16 scale
  fields are widened to float32 first and the products are formed in exactly the order ggml /
  gguf-py use (e.g. Q4_K ``(d*sc)*q - dmin*m``). Faster kernels are validated against it, so any
  drift here would silently become the ground truth.
* :func:`random_quant_bytes` makes valid random blocks without ever materialising float weights,
  so synthetic multi-GB model files can be written in chunks (K-quants have no quantizer in
  gguf-py, so random blocks are the only way to produce them).
* :func:`quantize_np` wraps gguf-py's quantizers for the types it supports.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as gguf_quantize

from moeserve.errors import UnsupportedQuantError

__all__ = [
    "SUPPORTED_QTYPES",
    "block_info",
    "dequantize",
    "quantize_np",
    "random_quant_bytes",
    "row_bytes",
]

SUPPORTED_QTYPES: frozenset[QT] = frozenset(
    {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K,
     QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS}
)
"""The tensor types moeserve can dequantize; anything else is rejected at load time."""

_FLOAT_QTYPES: frozenset[QT] = frozenset({QT.F32, QT.F16, QT.BF16})
_GGUF_QUANTIZABLE: frozenset[QT] = frozenset({QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0})

_QK_K = 256  # weights per K-quant super-block
_K_SCALE_SIZE = 12  # bytes of packed 6-bit (scale, min) pairs in Q4_K / Q5_K

# Byte offsets of the f16 scale fields inside one block. random_quant_bytes overwrites exactly
# these, so every other byte (nibbles, high bits, int8s, 6-bit scales) may be random.
_F16_FIELD_OFFSETS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,),  # d
    QT.Q4_1: (0, 2),  # d, m
    QT.Q5_0: (0,),  # d
    QT.Q5_1: (0, 2),  # d, m
    QT.Q8_0: (0,),  # d
    QT.Q2_K: (80, 82),  # d, dmin (after 16 B scale/min nibbles, 64 B 2-bit codes)
    QT.Q3_K: (108,),  # d (after 32 B high-bit mask, 64 B 2-bit codes, 12 B 6-bit scales)
    QT.Q4_K: (0, 2),  # d, dmin
    QT.Q5_K: (0, 2),  # d, dmin
    QT.Q6_K: (208,),  # d (after 128 B ql, 64 B qh, 16 B scales)
    QT.IQ4_NL: (0,),  # d
    QT.IQ4_XS: (0,),  # d (then 2 B high scale bits, 4 B low scale nibbles, 128 B codes)
}

IQ4_VALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""The sixteen int8 weights a 4-bit IQ4_NL / IQ4_XS code stands for (ggml's `kvalues_iq4nl`): a non-uniform grid,
denser near zero where trained weights cluster."""


def _check_qtype(qtype: QT) -> QT:
    """Normalise ``qtype`` (ints are accepted, as read from a file) and reject unsupported ones."""
    try:
        qt = QT(qtype)
    except ValueError:
        raise UnsupportedQuantError(f"unknown GGML quantization type id {qtype!r}") from None
    if qt not in SUPPORTED_QTYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_QTYPES))
        raise UnsupportedQuantError(
            f"quantization type {qt.name} is not supported by moeserve (supported: {supported})"
        )
    return qt


def block_info(qtype: QT) -> tuple[int, int]:
    """Return ``(weights per block, bytes per block)`` for ``qtype``.

    Taken from ``gguf.GGML_QUANT_SIZES`` so the numbers cannot drift from the file format.
    Float types count as blocks of one weight.
    """
    qt = _check_qtype(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return int(block_size), int(type_size)


def row_bytes(qtype: QT, n_cols: int) -> int:
    """Bytes taken by one row of ``n_cols`` weights of type ``qtype``.

    Raises ValueError if ``n_cols`` is negative or not a whole number of blocks: a row can never
    end in a partial block, so such a shape means a corrupt file or a caller bug.
    """
    block_size, type_size = block_info(qtype)
    if n_cols < 0 or n_cols % block_size != 0:
        raise ValueError(
            f"row of {n_cols} weights is not a whole number of {QT(qtype).name} blocks "
            f"(block size {block_size})"
        )
    return n_cols // block_size * type_size


# --------------------------------------------------------------------------------------------
# dequantization (torch reference)
# --------------------------------------------------------------------------------------------


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Read the little-endian f16 at byte ``offset`` of every block as a float32 ``[n, 1]``.

    Converting f16 -> f32 is exact, so all later arithmetic happens in float32 like ggml's.
    The slice is copied to be contiguous because ``view(dtype)`` needs aligned strides.
    """
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Split bytes ``[..., k]`` into ``[..., 2k]``: the k low nibbles first, then the k high ones.

    That is the ggml order within each group of packed bytes (Q4_0/Q4_1/Q5_* per block, Q4_K /
    Q5_K per 32-byte group, Q6_K per 64-byte group).
    """
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """Unpack bytes ``[n, k]`` to bits ``[n, 8k]``; bit ``i`` is bit ``i % 8`` of byte ``i // 8``.

    This equals bit ``i`` of the little-endian uint32 ``qh`` of Q5_0/Q5_1, without needing
    uint32 shifts (poorly supported in torch) or 4-byte aligned views.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 8 * qh.shape[1])  # no -1: n may be 0


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into eight 6-bit scales and eight 6-bit mins (float32).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16_field(b, 0)
    q = _nibbles(b[:, 2:18]).float() - 8.0
    return d * q


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16_field(b, 0), _f16_field(b, 2)
    q = _nibbles(b[:, 4:20]).float()
    return (d * q) + m


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16_field(b, 0)
    q = (_nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4)).float() - 16.0
    return d * q


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16_field(b, 0), _f16_field(b, 2)
    q = (_nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4)).float()
    return (d * q) + m


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16_field(b, 0)
    q = b[:, 2:34].contiguous().view(torch.int8).float()
    return q * d


def _two_bits(qs: torch.Tensor) -> torch.Tensor:
    """64 bytes of 2-bit fields ``[n, 64]`` -> ``[n, 256]``: per 128 weights, 32 bytes whose bit pairs 2j..2j+1
    are weights 32j..32j+31 (Q2_K/Q3_K's codes, Q6_K's high bits)."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, _QK_K)


def q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes ``[n, 12]`` -> its sixteen 6-bit scales (uint8, 0..63; the weight scale is ``s - 32``):
    scale s has its low 4 bits in byte s % 8 (low nibble for s < 8, high for s >= 8) and its top 2 bits at
    bits 2(s // 4).. of byte 8 + s % 4."""
    n = scales.shape[0]
    low = (scales[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                          device=scales.device).view(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                             device=scales.device).view(1, 4, 1)).reshape(n, 16)
    return (low & 0x0F) | ((high & 3) << 4)


def _deq_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16_field(b, 80), _f16_field(b, 82)
    dl = (d * (b[:, :16] & 0x0F).float()).unsqueeze(-1)  # [n, 16, 1]: one scale and one min per 16 weights
    ml = (dmin * (b[:, :16] >> 4).float()).unsqueeze(-1)
    q = _two_bits(b[:, 16:80]).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, _QK_K)


def _deq_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16_field(b, 108)
    dl = (d * (q3_k_scales(b[:, 96:108]).float() - 32.0)).unsqueeze(-1)  # [n, 16, 1]
    # the third bit of weight 32i + l is bit i of hmask byte l; a clear bit subtracts 4 (codes -4..3)
    hbit = _bits(b[:, :32]).reshape(n, 32, 8).transpose(1, 2).reshape(n, _QK_K)
    q = _two_bits(b[:, 32:96]).float() - 4.0 * (1 - hbit).float()
    return (dl * q.reshape(n, 16, 16)).reshape(n, _QK_K)


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc).unsqueeze(-1)  # [n, 8, 1]
    ml = (dmin * mn).unsqueeze(-1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, _QK_K)


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc).unsqueeze(-1)
    ml = (dmin * mn).unsqueeze(-1)
    ql = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    # Sub-block g takes its 5th bit from bit g of qh[j], j = position within the sub-block.
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    qh = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # [n, 8, 32]
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, _QK_K)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16_field(b, 208)
    dl = (d * sc).unsqueeze(-1)  # [n, 16, 1]
    # Each half of the block (128 weights) uses 64 ql bytes (low nibbles = weights 0-63, high
    # nibbles = 64-127) and 32 qh bytes (2-bit fields at shifts 0,2,4,6 -> 4 groups of 32).
    ql = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = _two_bits(b[:, 128:192]).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float() - 32.0
    return (dl * q.reshape(n, 16, 16)).reshape(n, _QK_K)


def iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS blocks ``[n, 136]`` -> the eight 6-bit sub-block scales (uint8, 0..63; the weight scale is ``s - 32``):
    scale s has its low 4 bits in byte 4 + s // 2 (low nibble for even s) and its top 2 bits at bits 2s.. of the
    little-endian uint16 at byte 2."""
    n = b.shape[0]
    low = (b[:, 4:8].reshape(n, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2))
    high = b[:, 2:4].reshape(n, 2, 1) >> torch.tensor(
        [0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4)
    return (low.reshape(n, 8) & 0x0F) | ((high.reshape(n, 8) & 3) << 4)


def _iq4_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8) -> their IQ4 grid values as float32."""
    table = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def _deq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16_field(b, 0)
    return d * _iq4_values(_nibbles(b[:, 2:18]))


def _deq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16_field(b, 0)
    dl = (d * (iq4_xs_scales(b).float() - 32.0)).unsqueeze(-1)  # [n, 8, 1]: one scale per 32 weights
    q = _iq4_values(_nibbles(b[:, 8:136].reshape(n, 8, 16)))  # per 32 weights 16 bytes, low nibbles first
    return (dl * q).reshape(n, _QK_K)


_DEQUANT_BLOCKS = {
    QT.Q4_0: _deq_q4_0,
    QT.Q4_1: _deq_q4_1,
    QT.Q5_0: _deq_q5_0,
    QT.Q5_1: _deq_q5_1,
    QT.Q8_0: _deq_q8_0,
    QT.Q2_K: _deq_q2_k,
    QT.Q3_K: _deq_q3_k,
    QT.Q4_K: _deq_q4_k,
    QT.Q5_K: _deq_q5_k,
    QT.Q6_K: _deq_q6_k,
    QT.IQ4_NL: _deq_iq4_nl,
    QT.IQ4_XS: _deq_iq4_xs,
}


def dequantize(raw: torch.Tensor, qtype: QT, n_cols: int) -> torch.Tensor:
    """Dequantize packed rows ``raw`` (uint8 ``[..., row_bytes]``) to float32 ``[..., n_cols]``.

    Leading dimensions are arbitrary (``[rows]``, ``[experts, rows]``, ...); every block of every
    row is processed in one vectorised pass, on whatever device ``raw`` lives on. The result is
    bit-identical to ``gguf.quants.dequantize`` so it can serve as ground truth for fast kernels.
    The result never shares memory with ``raw`` (which is often a read-only memory map).
    """
    qt = _check_qtype(qtype)
    if raw.dtype != torch.uint8:
        raise ValueError(f"dequantize expects uint8 bytes, got a {raw.dtype} tensor")
    nbytes = row_bytes(qt, n_cols)
    if raw.dim() == 0 or raw.shape[-1] != nbytes:
        raise ValueError(
            f"{qt.name} rows of {n_cols} weights take {nbytes} bytes, "
            f"but the byte tensor has shape {tuple(raw.shape)}"
        )
    lead = tuple(raw.shape[:-1])
    raw = raw.contiguous()
    if qt == QT.F32:
        return raw.view(torch.float32).clone()
    if qt == QT.F16:
        return raw.view(torch.float16).float()
    if qt == QT.BF16:
        return raw.view(torch.bfloat16).float()
    _, type_size = block_info(qt)
    blocks = raw.reshape(-1, type_size)
    return _DEQUANT_BLOCKS[qt](blocks).reshape(*lead, n_cols)


# --------------------------------------------------------------------------------------------
# random valid blocks
# --------------------------------------------------------------------------------------------

# Standard deviation of a dequantized weight in units of d, when every byte other than the f16
# fields is uniformly random and the offset field (m / dmin) is chosen as below so weights are
# zero-mean. Derived from the uniform moments of the integer fields:
#   Q4_0: q-8 in [-8,7];  Q5_0: q-16 in [-16,15];  Q8_0: int8;  Q4_1 / Q5_1: q in [0,15] / [0,31]
#   Q4_K / Q5_K: sc, m ~ U[0,63], q ~ U[0,15] / U[0,31], dmin = d*E[q]  -> Var(sc*q) + E[q]^2 Var(m)
#   Q6_K: sc ~ int8, q-32 in [-32,31]
_UNIFORM_VAR_6BIT = (64**2 - 1) / 12  # 341.25
_STD_PER_D: dict[QT, float] = {
    QT.Q4_0: math.sqrt((16**2 - 1) / 12 + 0.25),
    QT.Q4_1: math.sqrt((16**2 - 1) / 12),
    QT.Q5_0: math.sqrt((32**2 - 1) / 12 + 0.25),
    QT.Q5_1: math.sqrt((32**2 - 1) / 12),
    QT.Q8_0: math.sqrt((256**2 - 1) / 12 + 0.25),
    QT.Q4_K: math.sqrt(1333.5 * 77.5 - 31.5**2 * 7.5**2 + 7.5**2 * _UNIFORM_VAR_6BIT),
    QT.Q5_K: math.sqrt(1333.5 * 325.5 - 31.5**2 * 15.5**2 + 15.5**2 * _UNIFORM_VAR_6BIT),
    QT.Q6_K: math.sqrt(5461.5 * 341.5),
    # Q2_K: sc, m ~ U[0,15], q ~ U[0,3], dmin = d*E[q] -> Var(sc*q) + E[q]^2 Var(m)
    QT.Q2_K: math.sqrt(77.5 * 3.5 - 7.5**2 * 1.5**2 + 1.5**2 * (16**2 - 1) / 12),
    # Q3_K: sc-32 ~ U[-32,31], q ~ U[-4,3]: E[(sc-32)^2] E[q^2]
    QT.Q3_K: math.sqrt(341.5 * 5.5),
    # IQ4_NL: a uniform pick of the sixteen grid values; IQ4_XS: times sc-32 ~ U[-32,31]
    QT.IQ4_NL: math.sqrt(sum(v * v for v in IQ4_VALUES) / 16),
    QT.IQ4_XS: math.sqrt(sum(v * v for v in IQ4_VALUES) / 16 * 341.5),
}
# For affine types, the offset field in units of d that centres the weights on zero.
_OFFSET_PER_D: dict[QT, float] = {
    QT.Q4_1: -7.5,  # m = -E[q] * d
    QT.Q5_1: -15.5,
    QT.Q2_K: 1.5,  # dmin = E[q] * d, so E[d*sc*q] = E[dmin*m]
    QT.Q4_K: 7.5,
    QT.Q5_K: 15.5,
}


def _random_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random uint8 array of ``shape``.

    Drawn as uint64 words and reinterpreted: several times faster than ``integers(dtype=uint8)``,
    which matters when filling multi-GB files.
    """
    n = math.prod(shape)
    words = rng.integers(0, 2**64, size=(n + 7) // 8, dtype=np.uint64, endpoint=False)
    return words.view(np.uint8)[:n].reshape(shape)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round finite float32 to bfloat16 bits (nearest even, as ggml_compute_fp32_to_bf16).

    Done in uint32, which cannot overflow for finite inputs (only NaN bit patterns could), and
    is ~10x faster than widening to uint64 on large tensors.
    """
    u = x.astype(np.float32, copy=False).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")


def random_quant_bytes(
    qtype: QT, shape: tuple[int, ...], rng: np.random.Generator, scale: float = 0.02
) -> np.ndarray:
    """Random but valid packed bytes for a tensor of logical ``shape`` (last dim = columns).

    Returns uint8 ``[*shape[:-1], row_bytes(qtype, shape[-1])]``. For quantized types all
    integer fields are random bytes and only the f16 scale fields are set: d to ``scale``
    divided by the std of the integer part (jittered +-25% per block), and the offset field
    (m / dmin) so that weights are zero-mean; dequantized weights are then finite with a
    standard deviation of about ``scale``. No float weights are materialised, so memory and
    time stay proportional to the output bytes. Float types get ``normal * scale`` values.
    Synthetic models need this because gguf-py cannot quantize K-quants at all.
    """
    qt = _check_qtype(qtype)
    if len(shape) == 0:
        raise ValueError("random_quant_bytes needs a shape with at least one (column) dimension")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    n_cols = shape[-1]
    nbytes = row_bytes(qt, n_cols)
    lead = tuple(shape[:-1])

    if qt in _FLOAT_QTYPES:
        values = rng.standard_normal(size=shape, dtype=np.float32)
        values *= np.float32(scale)
        if qt == QT.F32:
            bits = values.astype("<f4", copy=False)
        elif qt == QT.F16:
            bits = values.astype("<f2")
        else:
            bits = _f32_to_bf16_bits(values)
        return np.ascontiguousarray(bits).view(np.uint8).reshape(*lead, nbytes)

    block_size, type_size = block_info(qt)
    n_blocks = n_cols // block_size
    out = _random_bytes(rng, (*lead, n_blocks, type_size))
    base = scale / _STD_PER_D[qt]
    d = base * rng.uniform(0.75, 1.25, size=(*lead, n_blocks)).astype(np.float32)
    fields = [d]
    if qt in _OFFSET_PER_D:
        fields.append(d * np.float32(_OFFSET_PER_D[qt]))
    for offset, value in zip(_F16_FIELD_OFFSETS[qt], fields, strict=True):
        out[..., offset : offset + 2] = value.astype("<f2")[..., None].view(np.uint8)
    return out.reshape(*lead, nbytes)


# --------------------------------------------------------------------------------------------
# quantization (via gguf-py)
# --------------------------------------------------------------------------------------------


def quantize_np(values: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize float32 ``[..., n_cols]`` to packed uint8 ``[..., row_bytes]``.

    F32/F16 are plain little-endian casts; BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 delegate to
    ``gguf.quants.quantize`` so the bytes match what gguf-py / llama.cpp's converter would write.
    K-quants and IQ4 raise ValueError: gguf-py has no quantizer for them and a home-grown one would be
    an unverified second implementation; use :func:`random_quant_bytes` for test data instead.
    """
    qt = _check_qtype(qtype)
    if qt not in (QT.F32, QT.F16) and qt not in _GGUF_QUANTIZABLE:
        raise ValueError(f"no quantizer for {qt.name} in gguf-py; use random_quant_bytes")
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError("quantize_np needs an array with at least one (column) dimension")
    n_cols = values.shape[-1]
    nbytes = row_bytes(qt, n_cols)
    lead = values.shape[:-1]
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qt == QT.F32:
        packed = values.astype("<f4", copy=False)
    elif qt == QT.F16:
        packed = values.astype("<f2")
    else:
        packed = gguf_quantize(values, qt)
    return np.ascontiguousarray(packed).view(np.uint8).reshape(*lead, nbytes)
