"""Q6_K on the int4 kernel: each 16-weight sub-block becomes one 32-wide group.

Q6_K stores `w = d sc (q - 32)` with q = l + 16 h (l: 4 bits, h: 2 bits) and a separate int8
scale `sc` per 16 weights (REFERENCE.md §3). torch's kernel has one (scale, zero) per >= 32
columns, and no column permutation can fit 16-weight scales into 32-wide groups. Instead each
sub-block j becomes one 32-column virtual group holding its 16 low codes and then 16 high codes,
and the activation is expanded the same way, `x' = [x_j, 8 x_j]` per sub-block (x8 is exact):

    (l - 8) s x + (2 h + 5 - 8) s (8 x)  =  s x (l + 16 h - 32)  =  s x (q - 32)

So scale = bf16(d sc), zero = 0, codes `l` and `2 h + 5` (5, 7, 9, 11), one kernel call over
K' = 2K. The only error beyond the kernel's bf16 activations/outputs is the bf16 rounding of the
scale, `(q - 32) * ds`, centred on the code range.

Memory: 1 byte + 4 bytes of (scale, zero) per 16 weights = 1.25 B/weight (file: 0.82). This is
the int4 *fallback*; the default backend (native.c) runs on the file's Q6_K bytes directly.
"""

from __future__ import annotations

import torch

from moeserve.gguf.quants import _f16_field, _nibbles
from moeserve.kernels.fast.int4pack import Codes
from moeserve.kernels.fast.q4 import bf16_round

_QH_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def q6k_fields(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks `[n, 210]` -> (low 4 bits `[n, 16, 16]`, high 2 bits `[n, 16, 16]`, scale `[n, 16]` f32).

    Same unpacking as the reference dequantizer: each 128-weight half uses 64 ql bytes (low
    nibbles = weights 0-63, high nibbles = 64-127) and 32 qh bytes (2-bit fields at shifts
    0, 2, 4, 6 for the four 32-weight quarters).
    """
    n = b.shape[0]
    lo = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 16, 16)
    hi = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _QH_SHIFTS) & 3).reshape(n, 16, 16)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return lo, hi, _f16_field(b, 208) * sc


def decode_q6_k(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 210)
    lo, hi, scale = q6k_fields(b)
    codes = torch.stack((lo, (hi << 1) + 5), dim=2).view(r, 2 * n_cols)  # [n, 16 sub-blocks, (lo, hi), 16]
    scale = bf16_round(scale).view(r, -1)
    return Codes(codes, scale, torch.zeros_like(scale))
