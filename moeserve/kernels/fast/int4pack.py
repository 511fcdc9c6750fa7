"""torch's CPU int4 kernel as a target for exact GGUF repacks.

`torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz)` computes `x @ W.T` with
`W[n, k] = (code[n, k] - 8) * scale[g, n] + zero[g, n]`, `g = k // 32`, codes in 0..15. It
dequantizes each weight in float32 (code * scale + (zero - 8 * scale), one FMA) and accumulates
in float32; only the activations, scales, zeros and the output are bf16. It is the only fast
path torch offers on CPU (the fp32/fp16 variants are scalar loops, ~50x slower), so every
quantized GGUF type is mapped onto it:

* a *decoder* (one per GGUF type, in the sibling modules) turns packed rows into 4-bit codes,
  bf16-exact scales and float32 zeros over a "virtual" K' columns (K' = K, or 2K when a weight
  needs two 4-bit planes), such that `x' @ W'.T == x @ W.T` for a cheap activation transform
  `x -> x'` (identity, `[x, x]`, or Q6_K's per-16 `[x, 8 x]`);
* this module packs the codes into torch's CPU layout (which depends on the instruction set,
  so it is built at load time on the machine that runs it, never shipped) and wraps the kernel
  in callables with as little per-call Python as possible (decode calls it ~1000 times/token).

The repacks are exact up to rounding the scales to bf16 (relative 2^-9 per group, random in
sign) and the activations to bf16; the product is accumulated in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

GROUP = 32
"""Weights per (scale, zero) group: the smallest group the kernel accepts."""

Decoder = Callable[[torch.Tensor, int], "Codes"]
"""`decoder(raw_rows uint8 [r, row_bytes], n_cols) -> Codes` for one GGUF type."""


@dataclass
class Codes:
    """A block of rows in the kernel's terms: `W'[n, k'] = (codes - 8) * scale + zero`.

    codes: uint8 `[r, K']` in 0..15; scale, zero: float32 `[r, K'/32]`. `scale` is already
    bf16-representable (rounded by the decoder, which computes `zero` from the exact scale so the
    weight error `(code - 8) * (scale rounding)` stays centred; see q4.py); `zero` is rounded to
    bf16 when stored.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


# --------------------------------------------------------------------------------------------
# activation transforms: x [m, K] (any float dtype) -> x' [m, K'] bf16
# --------------------------------------------------------------------------------------------

PLAIN, TWO_PLANES, Q6K_PAIRS = "plain", "two_planes", "q6k_pairs"
"""How x' is built from x: K' = K; K' = 2K as [x, x]; K' = 2K as [x_16, 8 x_16] per 16."""

_Q6K_MULT = torch.tensor([[1.0], [8.0]], dtype=torch.bfloat16)  # [2, 1]: exact powers of two


def virtual_cols(kind: str, n_cols: int) -> int:
    """K' for a weight with `n_cols` logical columns."""
    return n_cols if kind == PLAIN else 2 * n_cols


def make_transform(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function mapping float `x [m, K]` to the kernel's bf16 `x' [m, K']`.

    Each is one or two tensor ops: it runs on every call, so it must stay cheap.
    """
    if kind == PLAIN:
        return lambda x: x.to(torch.bfloat16)
    if kind == TWO_PLANES:

        def two(x: torch.Tensor) -> torch.Tensor:
            xb = x.to(torch.bfloat16)
            return torch.cat((xb, xb), dim=1)

        return two
    if kind == Q6K_PAIRS:

        def pairs(x: torch.Tensor) -> torch.Tensor:
            m, k = x.shape
            return (x.to(torch.bfloat16).view(m, k // 16, 1, 16) * _Q6K_MULT).view(m, 2 * k)

        return pairs
    raise ValueError(f"unknown activation transform {kind!r}")


# --------------------------------------------------------------------------------------------
# packing codes into torch's CPU int4 layout
# --------------------------------------------------------------------------------------------


def _pack_avx2(codes: torch.Tensor, out: torch.Tensor) -> None:
    """AVX2 layout: per 32 output rows, for each k, 16 bytes `code[d] | code[d + 16] << 4`."""
    r, k = codes.shape
    c = codes.view(r // 32, 2, 16, k)
    p = c[:, 0] | (c[:, 1] << 4)  # [r/32, 16, k]
    out.view(r // 32, k, 16).copy_(p.transpose(1, 2))


def _pack_avx512(codes: torch.Tensor, out: torch.Tensor) -> None:
    """AVX-512 layout: per 64 rows and k, 32 bytes: rows (d, d+32) then (d+16, d+48) per byte."""
    r, k = codes.shape
    c = codes.view(r // 64, 4, 16, k)
    p = torch.stack((c[:, 0] | (c[:, 2] << 4), c[:, 1] | (c[:, 3] << 4)), dim=1)  # [r/64, 2, 16, k]
    out.view(r // 64, k, 2, 16).copy_(p.permute(0, 3, 1, 2))


def _pack_op(codes: torch.Tensor, out: torch.Tensor) -> None:
    """torch's own converter: needs an int32 copy (4 B/weight), so only for odd shapes/ISAs."""
    out.copy_(torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))


_PACKERS: dict[str, tuple[int, Callable[[torch.Tensor, torch.Tensor], None]]] = {
    "avx512": (64, _pack_avx512),
    "avx2": (32, _pack_avx2),
}


@functools.cache
def packer() -> tuple[int, Callable[[torch.Tensor, torch.Tensor], None]]:
    """(row block, pack function) matching this machine's torch build.

    The layout torch expects is chosen by the CPU capability at run time; rather than trusting a
    capability string, pack a random probe both ways and compare with torch's converter. The
    vectorised packers are ~10x faster than the converter and need no int32 copy. Falls back to
    the converter (row block 1) if no known layout matches.
    """
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=gen)
    want = torch._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for block, fn in _PACKERS.values():
        got = torch.empty(128, 32, dtype=torch.uint8)
        fn(probe, got)
        if want.shape == got.shape and torch.equal(want, got):
            return block, fn
    return 1, _pack_op


def pack_rows(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Pack codes `[r, K']` into `out` uint8 `[r, K'/2]` (rows of a whole weight, r0 aligned).

    Row blocks that do not fill the ISA's block (a tail of < 32/64 rows) go through torch's
    converter, which handles partial blocks.
    """
    block, fn = packer()
    r = codes.shape[0]
    full = r - r % block
    if full:
        fn(codes[:full], out[:full])
    if full < r:
        _pack_op(codes[full:], out[full:])


# --------------------------------------------------------------------------------------------
# repacking whole weights
# --------------------------------------------------------------------------------------------

_CHUNK_WEIGHTS = 1 << 22
"""Weights decoded per step: temporaries stay ~10 MB (cache-friendly) however big the tensor."""


def _chunk_rows(n_rows: int, n_cols: int) -> int:
    """Rows per step: a multiple of 64 (any ISA's row block) near _CHUNK_WEIGHTS weights."""
    rows = max(64, (_CHUNK_WEIGHTS // max(n_cols, 1)) // 64 * 64)
    return min(rows, n_rows)


def repack(raw: torch.Tensor, n_cols: int, decode: Decoder, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack a 2-D or 3-D packed GGUF tensor into (packed uint8 `[..., N, K'/2]`, sz bf16 `[..., G', N, 2]`).

    Works in row chunks straight from the (memory-mapped) bytes into preallocated outputs, so the
    peak extra memory is the result plus a few MB of temporaries.
    """
    lead = raw.shape[:-1]
    n = lead[-1]
    kv = virtual_cols(kind, n_cols)
    groups = kv // GROUP
    stacks = raw.reshape(-1, n, raw.shape[-1])
    packed = torch.empty(stacks.shape[0], n, kv // 2, dtype=torch.uint8)
    sz = torch.empty(stacks.shape[0], groups, n, 2, dtype=torch.bfloat16)
    step = _chunk_rows(n, kv)
    for e in range(stacks.shape[0]):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            c = decode(stacks[e, r0:r1], n_cols)
            pack_rows(c.codes, packed[e, r0:r1])
            sz[e, :, r0:r1, 0].copy_(c.scale.T)
            sz[e, :, r0:r1, 1].copy_(c.zero.T)
            del c
    return packed.view(*lead, kv // 2), sz.view(*lead[:-1], groups, n, 2)


# --------------------------------------------------------------------------------------------
# callables
# --------------------------------------------------------------------------------------------

_mm = torch._weight_int4pack_mm_for_cpu


class Int4Linear:
    """`fast(x) -> x @ W.T` (float32) for one repacked `[N, K]` weight.

    `mm_bf16(x)` returns the kernel's bf16 output without the float32 cast, for callers that
    feed the result straight into another bf16 kernel.
    """

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, n_cols: int, kind: str) -> None:
        self.packed, self.sz, self.in_features, self.kind = packed, sz, n_cols, kind
        self.out_features = packed.shape[0]
        self._x = make_transform(kind)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.sz.numel()

    def mm_bf16(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _mm(self._x(x.reshape(-1, self.in_features)), self.packed, GROUP, self.sz)
        return y.view(*lead, self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm_bf16(x).float()


class Int4Experts:
    """`fast(e, x) -> x @ W[e].T` (float32) for a repacked `[E, N, K]` expert stack.

    The per-expert packed weights and scales are pre-split into Python lists of views, so a call
    is one list lookup, the activation cast and the kernel: no tensor indexing per call.
    """

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, n_cols: int, kind: str) -> None:
        self.packed, self.sz, self.in_features, self.kind = packed, sz, n_cols, kind
        self.n_experts, self.out_features = packed.shape[0], packed.shape[1]
        self._w = list(packed.unbind(0))
        self._s = list(sz.unbind(0))
        self._x = make_transform(kind)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.sz.numel()

    def mm_bf16(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return _mm(self._x(x), self._w[e], GROUP, self._s[e])

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return _mm(self._x(x), self._w[e], GROUP, self._s[e]).float()
