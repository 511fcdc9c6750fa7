"""F32 / F16 / BF16 weights: plain dense matmuls, exact weights.

In quantized MoE files only small tensors are float (the router `ffn_gate_inp` [E, H], norms),
and float models are test fixtures, so exactness beats bytes here:

* F32 is used in place (a zero-copy view of the mapped file) with float32 `F.linear` (MKL).
* F16 has no fast CPU matmul; it is widened to float32 once at load (exact, 2x its bytes).
* BF16 is kept as is and multiplied with bf16 activations (weights exact, activations rounded)
  when large; small BF16 weights are widened to float32 like F16, since
  bf16 GEMM has no speed advantage on small shapes and the fp32 product is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

_WIDEN_LIMIT = 1 << 24
"""BF16 weights up to this many elements (64 MB as float32) are widened to exact float32."""


def dense_weight(raw: torch.Tensor, qtype: QT, n_cols: int) -> torch.Tensor:
    """The weight `[..., N, K]` as a float32 or bf16 tensor (F32: a view of `raw`, no copy)."""
    lead = raw.shape[:-1]
    if qtype == QT.F32:
        return raw.contiguous().view(torch.float32).view(*lead, n_cols)
    if qtype == QT.F16:
        return raw.contiguous().view(torch.float16).view(*lead, n_cols).float()
    if qtype == QT.BF16:
        w = raw.contiguous().view(torch.bfloat16).view(*lead, n_cols)
        return w.float() if w.numel() <= _WIDEN_LIMIT else w
    raise ValueError(f"{qtype!r} is not a float type")


class DenseLinear:
    """`x @ W.T` in float32 (bf16 product if W is bf16)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.dtype = weight.dtype
        self.out_features, self.in_features = weight.shape[-2], weight.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight).float()


class DenseExperts:
    """`(e, x) -> x @ W[e].T` for a float `[E, N, K]` stack (per-expert views pre-split)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.dtype = weight.dtype
        self.n_experts, self.out_features, self.in_features = weight.shape
        self._w = list(weight.unbind(0))

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self._w[e]).float()
