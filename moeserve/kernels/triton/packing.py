"""Repack GGUF blocks into per-field arrays (structure of arrays) that GPU kernels load with plain strides.

A GGUF row interleaves each block's scales with its quant bits (e.g. Q4_K: 2+2+12+128 bytes per 256
weights), so a tile of one field is a strided gather and the 6-bit scales need bit surgery per load.
Here every field becomes its own row-major `[rows, ...]` array, one row per output row (experts
stacked: row `r` of expert `e` is `e * N + r`), with the same bits as the file:

* Q4_0 / Q4_1 / Q5_0 / Q5_1: `d` (and `dm` = m) fp16 `[rows, K/32]`; `qs` uint8 `[rows, K/2]` (the
  block's nibbles as in the file: byte j holds weights j and j+16); Q5: `qh` uint8 `[rows, K/8]`
  (bit i of the block's 4 bytes is weight i's 5th bit).
* Q8_0: `d` fp16 `[rows, K/32]`, `qs` int8 `[rows, K]`.
* Q4_K / Q5_K: `d`, `dm` (= dmin) fp16 `[rows, K/256]`; the 12 packed 6-bit scale/min bytes decoded to
  `sc`, `mn` uint8 `[rows, K/32]`; `qs` uint8 `[rows, K/2]` (per 64 weights: 32 bytes, low nibbles are
  weights 0-31, high 32-63); Q5_K: `qh` uint8 `[rows, K/8]` (per 256: byte j bit s -> weight 32s+j).
* Q6_K: `d` fp16 `[rows, K/256]`, `sc` int8 `[rows, K/16]`, `ql` as `qs` uint8 `[rows, K/2]` (per 128
  weights: 64 bytes, low nibbles weights 0-63, high 64-127), `qh` uint8 `[rows, K/4]` (per 128: 32
  bytes, bits 2s..2s+1 of byte j -> weight 32s+j).
* Q2_K: `d`, `dm` (= dmin) fp16 `[rows, K/256]`; `sc` uint8 `[rows, K/16]` as in the file (low nibble the scale,
  high the min of 16 weights); `qs` uint8 `[rows, K/4]` (per 128 weights: 32 bytes, bit pair j of byte l ->
  weight 32j+l).
* Q3_K: `d` fp16 `[rows, K/256]`; the 12 packed 6-bit scale bytes decoded to `sc` int8 `[rows, K/16]` (scale - 32);
  `qs` as Q2_K's; `qh` uint8 `[rows, K/8]` (per 256: the 32 mask bytes, bit i of byte l -> weight 32i+l's third
  bit).
* IQ4_NL: `d` fp16 `[rows, K/32]`, `qs` uint8 `[rows, K/2]` as Q4_0's (the 4-bit codes index `quants.IQ4_VALUES`).
* IQ4_XS: `d` fp16 `[rows, K/256]`; the 6-bit sub-block scales (split over 2 + 4 bytes) decoded to `sc` int8
  `[rows, K/32]` (scale - 32); `qs` uint8 `[rows, K/2]` (per 32 weights 16 bytes as IQ4_NL's).
* F16 / BF16 (expert stacks of float GGUF files; float matrices go to cuBLAS instead): `qs` `[rows, K]`, the
  file's values as fp16, or BF16's bits as int16 (the interpreter has no bfloat16); no scales. K is a multiple
  of 32, the kernels' group.

Only Q4_K/Q5_K/Q3_K/IQ4_XS grow (decoded scales: 148/144, 180/176, 114/110 and 138/136 bytes per block); the
rest keep the file's size. The repack is exact (bits are moved, never rounded), is vectorised torch on whatever
device the bytes are on, and never makes a float copy of the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import block_info, iq4_xs_scales, q3_k_scales
from moeserve.gguf.reader import PackedTensor

__all__ = ["PACKED_QTYPES", "PackedWeight", "pack_weight", "packable"]

PACKED_QTYPES: frozenset[QT] = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K,
                                          QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS, QT.F16, QT.BF16})

GROUP = 32
"""Weights per group of the kernels' K loop; a float type's rows must be whole groups."""


@dataclass(frozen=True)
class PackedWeight:
    """A quantized `[N, K]` matrix or `[E, N, K]` expert stack as per-field arrays (module docstring).

    Fields a type does not have are None.
    """

    qtype: QT
    shape: tuple[int, ...]
    qs: torch.Tensor  # low bits (Q8_0: the int8 weights; F16/BF16: the weights)
    d: torch.Tensor | None = None  # fp16 block scale (none for F16/BF16)
    dm: torch.Tensor | None = None  # fp16 block offset: m (Q4_1, Q5_1) or dmin (Q4_K, Q5_K)
    sc: torch.Tensor | None = None  # sub-block scales (uint8 for Q4_K/Q5_K, Q2_K: scale|min, int8 for Q6_K/Q3_K/IQ4_XS)
    mn: torch.Tensor | None = None  # sub-block mins (Q4_K, Q5_K)
    qh: torch.Tensor | None = None  # high bits (Q5_*, Q6_K, Q3_K)

    @property
    def tf32(self) -> bool:
        """Products of this weight run in TF32 (`qmatmul.group_dot`'s WIDE): BF16 is exact there, not in fp16."""
        return self.qtype == QT.BF16

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (for checking the repack against the file's size)."""
        tensors = (getattr(self, f.name) for f in fields(self) if f.name not in ("qtype", "shape"))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _f16(blocks: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """The little-endian f16 at byte `offset` of every block, as fp16 `[rows, blocks per row]`."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).reshape(rows, -1)


def _bytes(blocks: torch.Tensor, start: int, end: int, rows: int) -> torch.Tensor:
    """Bytes `start:end` of every block, concatenated per row: a contiguous uint8 `[rows, ...]` copy."""
    return blocks[:, start:end].reshape(rows, -1).contiguous()


def _k_scales(blocks: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes (at offset 4) decoded to eight 6-bit scales and eight 6-bit mins (uint8).

    The bit layout is `quants._k_scale_min`'s: bytes 0-3 scales 0-3 and the top bits of scales 4-7,
    bytes 4-7 the same for mins, bytes 8-11 the low nibbles of scales (low) and mins (high) 4-7.
    """
    d, m, md = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.reshape(rows, -1), mn.reshape(rows, -1)


def _row_unit(qt: QT) -> int:
    """Columns a packed row is a whole number of: the type's block, at least the kernels' group."""
    return max(block_info(qt)[0], GROUP)


def packable(w: PackedTensor) -> bool:
    """Whether `pack_weight` takes `w`'s type and its rows are whole blocks (else a kernel falls back)."""
    qt = QT(w.qtype)
    return qt in PACKED_QTYPES and w.shape[-1] % _row_unit(qt) == 0


def pack_weight(w: PackedTensor) -> PackedWeight:
    """The repacked copy of `w` (a 2-D matrix or 3-D expert stack of a type in PACKED_QTYPES), on `w`'s device."""
    qt = QT(w.qtype)
    if qt not in PACKED_QTYPES:
        raise ValueError(f"'{w.name}': no packed layout for {qt.name}")
    if len(w.shape) not in (2, 3):
        raise ValueError(f"'{w.name}': expected a 2-D or 3-D weight, got shape {w.shape}")
    block_size, type_size = block_info(qt)
    rows, k = math.prod(w.shape[:-1]), w.shape[-1]
    if k % _row_unit(qt):
        raise ValueError(f"'{w.name}': {k} columns are not a whole number of {qt.name} blocks")
    shape = tuple(w.shape)
    if qt in (QT.F16, QT.BF16):
        values = w.data.reshape(rows, 2 * k).contiguous()
        return PackedWeight(qt, shape, qs=values.view(torch.float16 if qt == QT.F16 else torch.int16))
    b = w.data.reshape(rows * (k // block_size), type_size)
    if qt in (QT.Q4_0, QT.IQ4_NL):
        return PackedWeight(qt, shape, qs=_bytes(b, 2, 18, rows), d=_f16(b, 0, rows))
    if qt == QT.Q4_1:
        return PackedWeight(qt, shape, qs=_bytes(b, 4, 20, rows), d=_f16(b, 0, rows), dm=_f16(b, 2, rows))
    if qt == QT.Q5_0:
        return PackedWeight(qt, shape, qs=_bytes(b, 6, 22, rows), d=_f16(b, 0, rows), qh=_bytes(b, 2, 6, rows))
    if qt == QT.Q5_1:
        return PackedWeight(qt, shape, qs=_bytes(b, 8, 24, rows), d=_f16(b, 0, rows), dm=_f16(b, 2, rows),
                            qh=_bytes(b, 4, 8, rows))
    if qt == QT.Q8_0:
        return PackedWeight(qt, shape, qs=_bytes(b, 2, 34, rows).view(torch.int8), d=_f16(b, 0, rows))
    if qt in (QT.Q4_K, QT.Q5_K):
        sc, mn = _k_scales(b, rows)
        qs, qh = (_bytes(b, 16, 144, rows), None) if qt == QT.Q4_K else (_bytes(b, 48, 176, rows),
                                                                         _bytes(b, 16, 48, rows))
        return PackedWeight(qt, shape, qs=qs, d=_f16(b, 0, rows), dm=_f16(b, 2, rows), sc=sc, mn=mn, qh=qh)
    if qt == QT.Q2_K:
        return PackedWeight(qt, shape, qs=_bytes(b, 16, 80, rows), d=_f16(b, 80, rows), dm=_f16(b, 82, rows),
                            sc=_bytes(b, 0, 16, rows))
    if qt == QT.Q3_K:
        sc = (q3_k_scales(b[:, 96:108]).view(torch.int8) - 32).reshape(rows, -1)
        return PackedWeight(qt, shape, qs=_bytes(b, 32, 96, rows), d=_f16(b, 108, rows), sc=sc,
                            qh=_bytes(b, 0, 32, rows))
    if qt == QT.IQ4_XS:
        sc = (iq4_xs_scales(b).view(torch.int8) - 32).reshape(rows, -1)
        return PackedWeight(qt, shape, qs=_bytes(b, 8, 136, rows), d=_f16(b, 0, rows), sc=sc)
    return PackedWeight(qt, shape, qs=_bytes(b, 0, 128, rows), d=_f16(b, 208, rows),  # Q6_K
                        sc=_bytes(b, 192, 208, rows).view(torch.int8), qh=_bytes(b, 128, 192, rows))


def concat_rows(ws: list[PackedWeight]) -> PackedWeight:
    """One `[sum N, K]` weight from 2-D weights of one type and width: their rows stacked, field by field (exact).

    The q, k and v projections of a layer then run as one matmul launch instead of three.
    """
    first = ws[0]
    if any(w.qtype != first.qtype or len(w.shape) != 2 or w.shape[1] != first.shape[1] for w in ws):
        raise ValueError("only 2-D weights of one quant type and width can be stacked")
    arrays = {f.name: None if getattr(first, f.name) is None else torch.cat([getattr(w, f.name) for w in ws])
              for f in fields(first) if f.name not in ("qtype", "shape")}
    return PackedWeight(first.qtype, (sum(w.shape[0] for w in ws), first.shape[1]), **arrays)
