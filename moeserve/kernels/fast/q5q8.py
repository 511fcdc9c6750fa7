"""Q5_0, Q5_1, Q5_K and Q8_0 as two int4 planes summed in one kernel call.

A 5- or 8-bit code q is split as `q = l + 16 h` (l = low nibble, h = the rest) and the weight as
`W = W_lo + W_hi`, W_lo on codes l (scale s), W_hi on codes derived from h. Both planes go into
ONE kernel call over K' = 2K virtual columns `[lo plane | hi plane]` with the activation
duplicated, `x' = [x, x]`: then `x' @ W'.T = x @ W_lo.T + x @ W_hi.T = x @ W.T`. One call
instead of two halves the per-call overhead.

The kernel's weight is `(code - 8) * scale + zero` per 32 columns. The high plane is chosen so
that the sum is `(q - c) * s + zero` with c the centre of q's range (the scale's bf16 rounding
then causes an error `(q - c) * ds`, as small and as centred as it can be):

* Q5 types, h in {0, 1}: code `2 h + 7`, scale `8 s`  ->  `(l - 8) s + (2 h - 1) 8 s = (q - 16) s`
* Q8_0, h = q >> 4 in -8..7 (arithmetic): code `h + 8`, scale `16 s`  ->  `(q - 8) s`

and the low plane's zero carries the type's offset (computed from the exact scale, see q4.py):

* Q5_0 `d (q - 16)`:        s = d,      zero = 0
* Q5_1 `d q + m`:           s = d,      zero = m + 16 d
* Q5_K `d sc q - dmin m`:   s = d sc,   zero = 16 d sc - dmin m
* Q8_0 `d q`:               s = d,      zero = 8 d

Multipliers are powers of two, so the high plane's bf16 scale is exactly 8x or 16x the low one's.
Cost: 1 byte + 8 bytes of scales per 32 weights (1.25 B/weight) vs 0.69-1.06 in the file; these
types are rare in the MoE files we target (Q4_K_M), so exactness and simplicity win here.
"""

from __future__ import annotations

import torch

from moeserve.gguf.quants import _bits, _f16_field, _k_scale_min, _nibbles
from moeserve.kernels.fast.int4pack import Codes
from moeserve.kernels.fast.q4 import bf16_round


def _planes(
    lo: torch.Tensor, hi: torch.Tensor, hi_mult: float, scale: torch.Tensor, zero: torch.Tensor, r: int, n_cols: int
) -> Codes:
    """Assemble `[lo | hi]` codes for r rows: low plane (scale, zero), high plane (hi_mult * scale, 0)."""
    scale, zero = bf16_round(scale.reshape(r, -1)), zero.reshape(r, -1)
    codes = torch.cat((lo.reshape(r, n_cols), hi.reshape(r, n_cols)), dim=1)
    return Codes(codes, torch.cat((scale, hi_mult * scale), dim=1), torch.cat((zero, torch.zeros_like(zero)), dim=1))


def _q5_hi(bits: torch.Tensor) -> torch.Tensor:
    """High-plane codes `2 h + 7` for 5th bits h in {0, 1}."""
    return (bits << 1) + 7


def decode_q5_0(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 22)
    d = _f16_field(b, 0)
    return _planes(_nibbles(b[:, 6:22]), _q5_hi(_bits(b[:, 2:6])), 8.0, d, torch.zeros_like(d), r, n_cols)


def decode_q5_1(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 24)
    d, m = _f16_field(b, 0), _f16_field(b, 2)
    return _planes(_nibbles(b[:, 8:24]), _q5_hi(_bits(b[:, 4:8])), 8.0, d, m + 16.0 * d, r, n_cols)


def decode_q8_0(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 34)
    d = _f16_field(b, 0)
    u = b[:, 2:34]
    # int8 q = 16 h + l with h = q >> 4 in -8..7; on the raw byte u, h + 8 == (u >> 4) ^ 8.
    return _planes(u & 0x0F, (u >> 4) ^ 8, 16.0, d, 8.0 * d, r, n_cols)


def decode_q5_k(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 176)
    n = b.shape[0]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = d * sc  # [n, 8]
    lo = _nibbles(b[:, 48:176].reshape(n, 4, 32))
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    bits = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # sub-block g takes bit g of qh[j]
    return _planes(lo, _q5_hi(bits), 8.0, scale, 16.0 * scale - dmin * mn, r, n_cols)
