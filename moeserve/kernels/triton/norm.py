"""RMSNorm as a Triton kernel: one program per row, the whole row in one block, float32 math and output; the
residual add fused in (`add_norm`). The per-head QK-norm of q and k is part of the q/k/v projection (`qkv.py`).

In a decode step of one or two rows (`FUSE_MAX_ROWS`) a norm whose output goes straight into a kernel that can
take it (the q/k/v products, the MoE's routing launch: `TritonBackend.fuse_norm`, at load) launches nothing:
`add_norm` hands back a `PendingNorm`, and every program of that kernel takes the rows' norm itself
(`rows_rstd`: it reads the rows' 2 x H floats again, which costs less than a launch at a row or two) and
multiplies its activations by it as it loads them (`normed_cols`); the consumer also stores the residual stream
`s = x + delta` the caller already holds (`store_normed`). The values are the separate kernel's: the same float32
sum `x + delta`, `1 / sqrt(sum(s * s) / H + eps)` over the whole row, then `s * rstd * w`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.triton.pdl import pdl, pdl_enter


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, s_ptr, o_ptr, w_ptr, stride_x, stride_d, stride_s, stride_o, eps,
                     H: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    """o = rms_norm(s) * w for one row, s = x, or with HAS_DELTA s = x + delta (float32, also stored): the residual
    add and the next norm in one pass."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < H
    s = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        s = s + tl.load(d_ptr + row * stride_d + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * stride_s + c, s, mask=ok)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / H + eps)
    tl.store(o_ptr + row * stride_o + c, s * rstd * w, mask=ok)


FUSE_MAX_ROWS = 2
"""Rows up to which a linked norm is left to its consumer (`PendingNorm`): each of the consumer's programs reads
the rows again for their norm, so it pays for a decode step of a stream or two, not for larger batches."""


@triton.jit
def rows_rstd(x_ptr, d_ptr, stride, rows, M, H, eps, HAS_DELTA: tl.constexpr, N_ROWS: tl.constexpr,
              H_PAD: tl.constexpr):
    """1 / rms of s = x (+ delta) for each of `rows` (clamped to M - 1; M <= N_ROWS): each of the N_ROWS distinct
    rows is summed whole, as `_rms_norm_kernel` sums it."""
    c = tl.arange(0, H_PAD)
    ok = c < H
    clamped = tl.minimum(rows, M - 1)
    out = tl.zeros(rows.shape, dtype=tl.float32)
    for r in tl.static_range(N_ROWS):
        row = tl.minimum(r, M - 1)
        s = tl.load(x_ptr + row * stride + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            s = s + tl.load(d_ptr + row * stride + c, mask=ok, other=0.0).to(tl.float32)
        out = tl.where(clamped == r, 1.0 / tl.sqrt(tl.sum(s * s, 0) / H + eps), out)
    return out


@triton.jit
def normed_cols(x_ptr, d_ptr, w_ptr, xoff, cols, rstd, HAS_DELTA: tl.constexpr):
    """Columns `cols` of the normed rows at element offsets `xoff`: (x (+ delta)) * rstd * w, float32
    [len(xoff), len(cols)], the separate kernel's operations in its order."""
    at = xoff[:, None] + cols[None, :]
    s = tl.load(x_ptr + at).to(tl.float32)
    if HAS_DELTA:
        s = s + tl.load(d_ptr + at).to(tl.float32)
    return s * rstd[:, None] * tl.load(w_ptr + cols).to(tl.float32)[None, :]


@triton.jit
def store_normed(x_ptr, d_ptr, w_ptr, s_ptr, h_ptr, stride, rows, M, c0, c1, rstd, HAS_DELTA: tl.constexpr,
                 STORE_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns c0..c1 of `rows` (those below M): the residual stream s = x + delta (stored when HAS_DELTA; else s
    is x) and, with STORE_H, the normed rows s * rstd * w (`rstd` per row, from `rows_rstd`)."""
    for c in range(c0, c1, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        ok = (rows < M)[:, None] & (cols < c1)[None, :]
        at = rows[:, None] * stride + cols[None, :]
        s = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            s = s + tl.load(d_ptr + at, mask=ok, other=0.0).to(tl.float32)
            tl.store(s_ptr + at, s, mask=ok)
        if STORE_H:
            w = tl.load(w_ptr + cols, mask=cols < c1, other=0.0).to(tl.float32)
            tl.store(h_ptr + at, s * rstd[:, None] * w[None, :], mask=ok)


@dataclass
class PendingNorm:
    """`h = rms_norm(s) * weight`, s = x + delta (delta None: s = x), left to the kernel that consumes it (module
    docstring). x, delta and s are contiguous float32 [T, H] (one row stride); that kernel stores s, the residual
    stream `add_norm` returned beside this. `tensor()` computes h with the separate kernel instead."""

    x: torch.Tensor
    delta: torch.Tensor | None
    s: torch.Tensor
    norm: TritonRMSNorm

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def device(self) -> torch.device:
        return self.x.device

    def tensor(self) -> torch.Tensor:
        """h, by the separate kernel (which also stores s)."""
        return self.norm._run(self.x, self.delta, self.s)[1]


def norm_args(h: torch.Tensor | PendingNorm) -> tuple[torch.Tensor, dict]:
    """A consumer kernel's input rows and norm arguments: for a pending norm x, and delta (x when none), the norm's
    weight, s, eps and the constexprs (NORM on); for a tensor, itself and placeholders never read (NORM off)."""
    if not isinstance(h, PendingNorm):
        return h, dict(delta=h, weight=h, s=h, eps=0.0, NORM=False, HAS_DELTA=False, N_ROWS=1, H_PAD=1)
    return h.x, dict(delta=h.x if h.delta is None else h.delta, weight=h.norm.weight, s=h.s, eps=h.norm.eps,
                     NORM=True, HAS_DELTA=h.delta is not None, N_ROWS=_pow2(h.x.shape[0]), H_PAD=_pow2(h.x.shape[1]))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with a unit last stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class TritonRMSNorm:
    """RMSNorm over the last dim: x [T, H] any float -> float32 [T, H]; `add_norm` fuses the residual add."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps = weight.contiguous(), eps
        self.fuse = False  # set at load when the consumer of h takes a `PendingNorm` (`TritonBackend.fuse_norm`)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`s = x + delta` (float32) and `norm(s)` in one kernel (the Norm protocol); for a linked consumer and a
        step of up to `FUSE_MAX_ROWS` rows, s to be stored and h to be computed by that consumer's own launch."""
        if self.fuse and x.dim() == 2 and 0 < x.shape[0] <= FUSE_MAX_ROWS:
            x = x.float().contiguous()
            if delta is None:
                return x, PendingNorm(x, None, x, self)  # type: ignore[return-value]
            delta = delta.float().contiguous().view(x.shape)
            return (s := torch.empty_like(x)), PendingNorm(x, delta, s, self)  # type: ignore[return-value]
        if delta is None:
            return x, self(x)
        return self._run(x, delta)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)[1]

    def _run(self, x: torch.Tensor, delta: torch.Tensor | None,
             s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = x (returned as given) or x + delta (float32, into `s` when given), one launch."""
        H = x.shape[-1]
        x2 = _rows(x)
        d2 = x2 if delta is None else _rows(delta)
        out = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
        if delta is None:
            s = out
        elif s is None:
            s = torch.empty_like(out)
        if x2.shape[0]:
            block = _pow2(H)
            _rms_norm_kernel[(x2.shape[0],)](x2, d2, s, out, self.weight, x2.stride(0), d2.stride(0), s.stride(0),
                                             out.stride(0), self.eps, H=H, BLOCK=block, HAS_DELTA=delta is not None,
                                             num_warps=min(16, max(1, block // 256)), **pdl(x.device))
        return (x if delta is None else s.view(x.shape)), out.view(x.shape)
