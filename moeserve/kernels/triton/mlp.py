"""The dense SwiGLU FFN on the GPU: `down(silu(gate(x)) * up(x))` in three launches.

* gate and up as one product when they stack (same quant type, no bias: `TritonLinear.stacked`), as vLLM's
  merged `gate_up_proj` does; else two.
* SiLU·mul in one kernel (`_silu_mul_kernel`), instead of torch's two, writing the product in float32: it may
  pass fp16's 65,504 in real checkpoints ("massive activations"), so the down projection takes it in TF32
  (`qmatmul.group_dot`'s WIDE), and this kernel rounds it to TF32 once (`round_tf32`) so that no K loop has to.
* down, widened (`TritonLinear.widen`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.backend import Linear
from moeserve.kernels.triton.pdl import pdl, pdl_enter
from moeserve.kernels.triton.qmatmul import TritonLinear, round_tf32

__all__ = ["TritonMLP", "silu_mul"]


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, F, stride_g, stride_u, BLOCK: tl.constexpr, ROUND: tl.constexpr,
                     PDL: tl.constexpr):
    """out[row, cols] = silu(g) * u in float32 (rounded to TF32 with ROUND) for one row and BLOCK columns."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    if ROUND:
        y = round_tf32(y)
    tl.store(out_ptr + row * F + cols, y, mask=ok)


def silu_mul(g: torch.Tensor, u: torch.Tensor, to_tf32: bool) -> torch.Tensor:
    """float32 `silu(g) * u` for [T, F] g and u (rows may be strided, as halves of one gate|up product); with
    `to_tf32` rounded to TF32 for a WIDE product."""
    T, F = g.shape
    out = torch.empty(T, F, dtype=torch.float32, device=g.device)
    if T:
        block = min(1024, triton.next_power_of_2(F))
        _silu_mul_kernel[(T, triton.cdiv(F, block))](g, u, out, F, g.stride(0), u.stride(0), BLOCK=block,
                                                    ROUND=to_tf32, num_warps=4, **pdl(g.device))
    return out


class TritonMLP:
    """The MLPBlock of the triton backend (module docstring): built from the backend's own linears at load."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        self.gate, self.up, self.down = gate, up, down
        self.gate_up = TritonLinear.stacked([gate, up])  # one launch for both, or None
        self.inter = gate.out_features  # type: ignore[attr-defined]
        # a packed down multiplies in TF32: round its input here, once (an F16 or F32 down takes it unrounded)
        self.round = isinstance(down, TritonLinear) and down.packed is not None
        if isinstance(down, TritonLinear):
            down.widen(rounded=self.round)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])
        if self.gate_up is not None:
            gu = self.gate_up(h)
            g, u = gu[:, : self.inter], gu[:, self.inter:]
        else:
            g, u = self.gate(h), self.up(h)
        y = self.down(silu_mul(g, u, self.round))
        return y.view(*lead, y.shape[-1])
