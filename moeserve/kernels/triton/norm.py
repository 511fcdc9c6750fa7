"""RMSNorm as a Triton kernel: one program per row, the whole row in one block, float32 math and output; the
residual add fused in (`add_norm`). The per-head QK-norm of q and k is part of the q/k/v projection (`qkv.py`).
"""

from __future__ import annotations

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
