"""Q4_0, Q4_1 and Q4_K as one int4 plane: the GGUF nibbles are the kernel's codes as they are.

Per 32 weights the kernel computes `(q - 8) * scale + zero`, so (REFERENCE.md §3):

* Q4_0 `d (q - 8)`:        scale = d,      zero = 0
* Q4_1 `d q + m`:          scale = d,      zero = m + 8 d
* Q4_K `d sc q - dmin m`:  scale = d sc,   zero = 8 d sc - dmin m   (per 32-weight sub-block)

`zero` is computed from the exact float32 scale, then both are rounded to bf16. The weight error
is then `(q - 8) * (scale rounding) + (zero rounding)`, centred on the code range; deriving the
zero from the rounded scale instead would give `q * (scale rounding)`, up to twice as large and
not centred (measured: 4.2e-3 vs ~2e-3 max relative error on random Q4_1/Q4_K blocks).
"""

from __future__ import annotations

import torch

from moeserve.gguf.quants import _f16_field, _k_scale_min, _nibbles
from moeserve.kernels.fast.int4pack import Codes


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to the nearest bf16 (what the kernel's scale tensor will hold)."""
    return t.to(torch.bfloat16).float()


def decode_q4_0(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 18)
    d = _f16_field(b, 0).view(r, -1)
    codes = _nibbles(b[:, 2:18]).view(r, n_cols)
    return Codes(codes, bf16_round(d), torch.zeros_like(d))


def decode_q4_1(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 20)
    d = _f16_field(b, 0).view(r, -1)
    m = _f16_field(b, 2).view(r, -1)
    codes = _nibbles(b[:, 4:20]).view(r, n_cols)
    return Codes(codes, bf16_round(d), m + 8.0 * d)


def decode_q4_k(raw: torch.Tensor, n_cols: int) -> Codes:
    r = raw.shape[0]
    b = raw.reshape(-1, 144)
    n = b.shape[0]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = d * sc  # [n, 8]
    zero = 8.0 * scale - dmin * mn
    codes = _nibbles(b[:, 16:144].reshape(n, 4, 32)).view(r, n_cols)
    return Codes(codes, bf16_round(scale).view(r, -1), zero.view(r, -1))
