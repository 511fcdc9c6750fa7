"""RMSNorm, and the fused per-head QK-norm + RoPE after the q/k/v projections, as Triton kernels.

`TritonRMSNorm`: one program per row, the whole row in one block, float32 math and output.

`TritonQKV`: the three linears stay whatever the backend made them; then ONE kernel finishes q and k: each
program takes a block of heads of one token (q heads or k heads), applies Qwen3's per-head RMSNorm when its
weight is given and rotates the first `rope_dim` dimensions with the load-time cos/sin tables at the token's
position (NEOX "rotate half" or interleaved pairs); the rest of each head passes through. In a step with a KV
pool the k programs store their heads, and copy the token's v heads, straight into the token's pool slot (cast
to the pool's dtype): the cache write costs no launch of its own. A dimension's
rotation partner is read again from memory (and normalised with the same per-head scale) instead of
shuffled in registers. Positions are read on the device: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.backend import Linear
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.kernels.reference import QKVRope
from moeserve.kernels.rope import Rope
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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with a unit last stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class TritonRMSNorm:
    """RMSNorm over the last dim: x [T, H] any float -> float32 [T, H]; `add_norm` fuses the residual add."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps = weight.contiguous(), eps

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`s = x + delta` (float32) and `norm(s)` in one kernel (the Norm protocol)."""
        if delta is None:
            return x, self(x)
        return self._run(x, delta)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)[1]

    def _run(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = x (returned as given) or x + delta (float32), one launch."""
        H = x.shape[-1]
        x2 = _rows(x)
        d2 = x2 if delta is None else _rows(delta)
        out = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
        s = out if delta is None else torch.empty_like(out)
        if x2.shape[0]:
            block = _pow2(H)
            _rms_norm_kernel[(x2.shape[0],)](x2, d2, s, out, self.weight, x2.stride(0), d2.stride(0), s.stride(0),
                                             out.stride(0), self.eps, H=H, BLOCK=block, HAS_DELTA=delta is not None,
                                             num_warps=min(16, max(1, block // 256)), **pdl(x.device))
        return (x if delta is None else s.view(x.shape)), out.view(x.shape)


@triton.jit
def _norm_rope_heads(x_ptr, o_ptr, w_ptr, token, o_row, pos, cos_ptr, sin_ptr, first_head, stride_xt, stride_xh,
                     stride_ot, stride_oh, stride_cos, n_heads, eps,
                     HAS_NORM: tl.constexpr, NEOX: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr,
                     ROPE_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Norm + rope of heads first_head .. first_head + BLOCK_H of one token ([BLOCK_H, HD_PAD] tile), stored in
    row `o_row` of the output (the token's row, or its pool slot), cast to the output's dtype."""
    HALF: tl.constexpr = ROPE_DIM // 2
    h = first_head + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HD_PAD)
    ok = (h < n_heads)[:, None] & (d < HEAD_DIM)[None, :]
    src = x_ptr + token * stride_xt + h[:, None] * stride_xh
    x = tl.load(src + d[None, :], mask=ok, other=0.0).to(tl.float32)
    # the rotation partner of each dimension and the frequency index it uses
    if NEOX:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        freq = tl.where(d < HALF, d, d - HALF)
        first = d < HALF
    else:
        partner = d ^ 1
        freq = d // 2
        first = (d % 2) == 0
    rot = d < ROPE_DIM
    rot_ok = ok & rot[None, :]
    xp = tl.load(src + partner[None, :], mask=rot_ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)
        w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * w[None, :]
        xp = xp * rstd[:, None] * wp[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + freq, mask=rot, other=1.0)
    sin = tl.load(sin_ptr + pos * stride_cos + freq, mask=rot, other=0.0)
    sign = tl.where(first, -1.0, 1.0)
    y = x * cos[None, :] + sign[None, :] * xp * sin[None, :]
    tl.store(o_ptr + o_row * stride_ot + h[:, None] * stride_oh + d[None, :], y.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vo_ptr, slots_ptr, qw_ptr, kw_ptr, pos_ptr, cos_ptr,
                         sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot,
                         stride_qoh, stride_kot, stride_koh, stride_vot, stride_voh, stride_cos, n_q_heads, n_kv_heads,
                         eps,
                         HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, NEOX: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                         WRITE_KV: tl.constexpr, PDL: tl.constexpr):
    """q and k heads of token `program_id(0)`, a block of heads per program; with WRITE_KV the k heads go
    straight into the KV pool at the token's slot (`ko`/`vo` are the layer's k/v caches) and the k programs copy
    the matching v heads there too."""
    pdl_enter(PDL)
    token = tl.program_id(0)
    blk = tl.program_id(1)
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    pos = tl.load(pos_ptr + token)
    if blk < q_blocks:
        _norm_rope_heads(q_ptr, qo_ptr, qw_ptr, token, token, pos, cos_ptr, sin_ptr, blk * BLOCK_H, stride_qt,
                         stride_qh, stride_qot, stride_qoh, stride_cos, n_q_heads, eps,
                         HAS_QNORM, NEOX, HEAD_DIM, HD_PAD, ROPE_DIM, BLOCK_H)
    else:
        first = (blk - q_blocks) * BLOCK_H
        if WRITE_KV:
            row = tl.load(slots_ptr + token).to(tl.int64)
        else:
            row = token.to(tl.int64)
        _norm_rope_heads(k_ptr, ko_ptr, kw_ptr, token, row, pos, cos_ptr, sin_ptr, first, stride_kt, stride_kh,
                         stride_kot, stride_koh, stride_cos, n_kv_heads, eps,
                         HAS_KNORM, NEOX, HEAD_DIM, HD_PAD, ROPE_DIM, BLOCK_H)
        if WRITE_KV:
            h = first + tl.arange(0, BLOCK_H)[:, None]
            d = tl.arange(0, HD_PAD)[None, :]
            ok = (h < n_kv_heads) & (d < HEAD_DIM)
            v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=ok)
            tl.store(vo_ptr + row * stride_vot + h * stride_voh + d, v.to(vo_ptr.dtype.element_ty), mask=ok)


class TritonQKV(QKVRope):
    """`QKVRope` whose QK-norm and RoPE run as one Triton kernel, which also stores k and v into layer `layer`'s
    pool slots when the step has a pool: (h, meta) -> float32 q (and k, v when there is no pool)."""

    def __init__(self, layer: int, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int,
                 eps: float) -> None:
        super().__init__(wq, wk, wv, q_norm, k_norm, rope, n_heads, n_kv_heads, head_dim, eps)
        self.layer = layer
        assert rope.rope_dim <= head_dim and rope.rope_dim % 2 == 0
        self.cos, self.sin = rope.cos.float().contiguous(), rope.sin.float().contiguous()
        self.qw = None if q_norm is None else q_norm.contiguous()
        self.kw = None if k_norm is None else k_norm.contiguous()
        self.hd_pad = _pow2(head_dim)
        # a [heads, head_dim] tile of up to ~2K elements per program
        self.block_h = min(_pow2(max(n_heads, n_kv_heads)), max(1, 2048 // self.hd_pad))
        self.fused: Linear | None = None  # q|k(|v) in one linear, once `stack` is called
        self.fused_v = False

    def stack(self, fused: Linear, with_v: bool) -> None:
        """Project q and k (and v, `with_v`) with one `fused` linear whose output is theirs side by side; the
        separate ones are dropped (their packed bytes live on in `fused`)."""
        self.fused, self.fused_v = fused, with_v
        self.wq = self.wk = None  # type: ignore[assignment]
        if with_v:
            self.wv = None  # type: ignore[assignment]

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused is None:
            return super().project(h)
        T, nq, nk = h.shape[0], self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        y = self.fused(h)  # views of one [T, nq + nk (+ nv)] output: the kernel below reads them strided
        q, k = y[:, :nq].view(T, self.n_heads, self.head_dim), y[:, nq:nq + nk].view(T, self.n_kv_heads, self.head_dim)
        v = y[:, nq + nk:] if self.fused_v else self.wv(h)
        return q, k, v.reshape(T, self.n_kv_heads, self.head_dim)

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor | None, ...]:
        """float32 q, k, v; in a step with a pool and a slot mapping k and v go straight into the layer's pool
        slots instead, in the same launch, and come back as None (the QKVProjection protocol)."""
        q, k, v = self.project(h)
        T = q.shape[0]
        kv = meta.kv
        write = kv is not None and meta.slot_mapping is not None
        q_out = torch.empty(T, self.n_heads, self.head_dim, dtype=torch.float32, device=q.device)
        if write:
            k_out, v_out = kv.k[self.layer], kv.v[self.layer]
            assert k_out.stride(-1) == 1 and v_out.stride(-1) == 1, "the pool's head_dim must be contiguous"
        else:
            k_out = torch.empty(T, self.n_kv_heads, self.head_dim, dtype=torch.float32, device=q.device)
            v_out = k_out  # unused
        if T:
            q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
            bh = self.block_h
            grid = (T, triton.cdiv(self.n_heads, bh) + triton.cdiv(self.n_kv_heads, bh))
            _qk_norm_rope_kernel[grid](
                q, k, v, q_out, k_out, v_out, meta.slot_mapping if write else meta.positions,
                self.qw if self.qw is not None else q_out, self.kw if self.kw is not None else q_out, meta.positions,
                self.cos, self.sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
                self.cos.stride(0), self.n_heads, self.n_kv_heads, self.eps,
                HAS_QNORM=self.qw is not None, HAS_KNORM=self.kw is not None, NEOX=self.rope.neox,
                HEAD_DIM=self.head_dim, HD_PAD=self.hd_pad, ROPE_DIM=self.rope.rope_dim, BLOCK_H=bh, WRITE_KV=write,
                num_warps=4 if bh * self.hd_pad >= 1024 else 2, **pdl(q.device),
            )
        return (q_out, None, None) if write else (q_out, k_out, v.float())
